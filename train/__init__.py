"""Distributed training with Accelerate: fast-transformers sequence models and torchvision
classifiers, one loop for every task."""

import os

# How PyTorch's OpenMP threads wait between parallel regions. Spinning takes the cores from
# whatever shares them (data-loader workers, other ranks, other jobs): with 2 threads on 2 cores
# shared with 4 busy processes a demo LM step took 5-10 s spinning, 1.7 s otherwise. Sleeping
# at once makes every short op pay a wake-up: the chunked attention's forward + backward at
# 2048 tokens took 0.19-0.22 s instead of 0.12-0.13 s on idle cores. So threads spin briefly
# (GOMP_SPINCOUNT 3000, ~30 us by libgomp's own estimate, longer than the gap between two ops)
# and then sleep; PASSIVE also makes oversubscribed threads sleep at once. libgomp reads these
# when torch loads it, so they are set here, before any import of torch by the entry points.
# A value the user sets for either wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "3000"

__version__ = "0.1.0"
