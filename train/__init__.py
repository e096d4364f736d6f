"""Distributed training with Accelerate: fast-transformers sequence models and torchvision
classifiers, one loop for every task."""

__version__ = "0.1.0"
