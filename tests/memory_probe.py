"""TorchDispatchModes for structural memory bounds: the largest tensor any aten op produces (forward,
backward, optimizer), e.g. "nothing of C x (pixels) elements"; the ops that allocate a tensor of a
given size (views and in-place ops excluded)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0
        self.op = None
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


def allocates(func) -> bool:
    """Whether an aten op returns new storage (not a view, not in place)."""
    schema = func._schema
    return not schema.is_mutable and all(r.alias_info is None for r in schema.returns)


class TableSizedAllocations(TorchDispatchMode):
    """Names of the ops that allocate a tensor of at least `numel` elements (views and in-place ops
    allocate nothing and are not counted)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if allocates(func) and any(isinstance(t, torch.Tensor) and t.numel() >= self.numel for t in tree_flatten(out)[0]):
            self.ops.append(str(func.overloadpacket))
        return out


class LiveTableSized(TorchDispatchMode):
    """The tensors of at least `numel` elements that ops allocate while the mode is on, followed through
    weak references to their storages: `most` is the largest number alive at once while `measuring`
    is true, `at_most` their ops then. Under a dispatch mode autograd's in-place accumulation is off
    (a gather's backward index-adds out of place, two gradients of one tensor are summed into a new
    one), so the counts are upper bounds of what runs without the mode hold."""

    def __init__(self, numel: int):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.numel, self.live, self.most, self.at_most, self.measuring = numel, [], 0, [], True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if allocates(func):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                    self.live.append((self._ref(t.untyped_storage()), str(func.overloadpacket)))
        self.live = [(ref, op) for ref, op in self.live if not ref.expired()]
        if self.measuring and len(self.live) > self.most:
            self.most, self.at_most = len(self.live), [op for _, op in self.live]
        return out
