"""The peak of live activation memory of a computation on the CPU, as a device's allocator would see it.

`LiveBytes` is a TorchDispatchMode: every tensor an operation makes inside it is tracked by its storage (views share
one), and after each operation the storages still referenced are summed; the peak of that sum is the activation
memory the computation needed at once. Tensors made before the block (weights, inputs) are not counted. The tests
hold lib/engine/memory.py's estimates against it on the tiny models (same architectures, fewer channels)."""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self._storages.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        live = 0
        for key, (ref, nbytes) in list(self._storages.items()):
            if ref.expired():
                del self._storages[key]
            else:
                live += nbytes
        self.peak = max(self.peak, live)
        return out
