"""Counting the moments the host waits for the device, for the claim that a training step
never does (tests/test_train.py, the GPU check).

`HostReads` counts, outside data loading: calls of the tensor methods that read a value on the
host (item, tolist, bool(), ...), reads inside operators (aten._local_scalar_dense), and on CUDA
every synchronizing call that `torch.cuda.set_sync_debug_mode("warn")` reports.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# How the host reads a tensor's value; on a GPU each one waits for the device.
READ_METHODS = {"item", "tolist", "numpy", "__array__", "__bool__", "__int__", "__float__",
                "__index__", "__format__", "cpu"}
DATA_LOADING = ("torch/utils/data/", "torchdata/", "train/data/")


def _loading_data() -> bool:
    """Whether data loading is on the stack: it runs on the host by design."""
    frame = sys._getframe()
    while frame is not None:
        if any(part in frame.f_code.co_filename.replace(os.sep, "/") for part in DATA_LOADING):
            return True
        frame = frame.f_back
    return False


class _ReadMethods(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READ_METHODS and not _loading_data():
            self.count += 1
        return func(*args, **(kwargs or {}))


class _OperatorReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not _loading_data():
            self.count += 1
        return func(*args, **(kwargs or {}))


class HostReads:
    """with HostReads() as reads: ...; reads.count (and reads.cuda_syncs on CUDA)."""

    def __enter__(self):
        self.methods, self.operators = _ReadMethods(), _OperatorReads()
        self.methods.__enter__()
        self.operators.__enter__()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            self._warnings = warnings.catch_warnings(record=True)
            self.caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            self.cuda_syncs = sum("synchronizing" in str(w.message) for w in self.caught)
        self.operators.__exit__(*exc)
        self.methods.__exit__(*exc)
        self.count = self.methods.count + self.operators.count
        return False
