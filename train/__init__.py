"""Distributed training with Accelerate: fast-transformers sequence models and torchvision
classifiers, one loop for every task."""

import os

# OpenMP threads that spin between parallel regions take the cores from whatever shares them
# (data-loader workers, other ranks, other jobs). With 2 threads on 2 cores shared with 4 busy
# processes, a demo LM step took 5-10 s spinning and 3.1-3.7 s sleeping, at no cost measured
# on idle cores. libgomp reads this when torch loads it, so it is set here, before any import
# of torch by the entry points; a value the user sets wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
