"""The composer's device-side copies of merge inputs: :class:`DeltaCache` (decoded input
tensors within a byte budget, keyed by the store's blob ids), :class:`CachedReader` (a merge
input's reader that reads through it and through the composer's pinned base tensors) and the
default budget."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable

import torch

from mergehub.storage.checkpoint import Checkpoint
from mergehub.storage.safetensors_format import TensorSpec
from mergehub.storage.store import StoredModel


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class DeltaCache:
    """Tensors read for merges, kept on the composer's device within ``budget`` bytes; the
    least recently used go first, but never one used by the current apply (:meth:`new_apply`):
    when the rest of an apply's tensors do not fit, they are used and not kept. So an apply
    whose inputs are larger than the budget keeps the first budget's worth of them and the next
    apply of it finds those, where a plain LRU would have evicted each tensor before its next
    use (a cyclic scan) and found none. A tensor larger than the budget is used but not kept.
    Thread-safe (the fused path reads inputs on threads)."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Hashable, tuple[torch.Tensor, int]] = OrderedDict()
        self._apply = 0
        self._lock = threading.Lock()

    def new_apply(self) -> None:
        """Start an apply: the tensors it uses from now on are kept over older ones."""
        with self._lock:
            self._apply += 1

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items[key] = (item[0], self._apply)
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def used_keys(self) -> list[Hashable]:
        """The keys the current apply has used (see :meth:`new_apply`)."""
        with self._lock:
            return [key for key, (_, used) in self._items.items() if used == self._apply]

    def touch(self, keys: Iterable[Hashable]) -> None:
        """Count ``keys`` as used by the current apply, as :meth:`get` would (an apply that
        launches recorded merges again gets nothing)."""
        with self._lock:
            for key in keys:
                item = self._items.get(key)
                if item is not None:
                    self._items[key] = (item[0], self._apply)
                    self._items.move_to_end(key)

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        size = _nbytes(tensor)
        with self._lock:
            if size > self.budget or key in self._items:
                return
            older = [k for k, (_, used) in self._items.items() if used < self._apply]
            free = self.budget - self.bytes
            evict = []
            for k in older:  # least recently used first
                if free >= size:
                    break
                evict.append(k)
                free += _nbytes(self._items[k][0])
            if free < size:  # only this apply's tensors would make room: not kept
                return
            for k in evict:
                self.bytes -= _nbytes(self._items.pop(k)[0])
            self._items[key] = (tensor, self._apply)
            self.bytes += size

    def pop(self, key: Hashable) -> None:
        """Forget ``key`` (its tensor is kept elsewhere)."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is not None:
                self.bytes -= _nbytes(item[0])

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class CachedReader:
    """A merge input's reader (a stored model or a checkpoint) whose whole tensors come from
    a composer: its pinned bind-time copies of base tensors on its device, its
    :class:`DeltaCache`, or else the reader (then kept in the cache). It holds those, not the
    composer, so that the plans a composer remembers do not keep it alive."""

    def __init__(self, reader: StoredModel | Checkpoint, device: torch.device, cache: DeltaCache,
                 pinned: dict[Hashable, torch.Tensor]):
        self.reader = reader
        self.device, self.cache, self.pinned = device, cache, pinned
        self._blobs: dict[str, Hashable] = {}  # a store entry's tensors never change

    def specs(self) -> list[TensorSpec]:
        return self.reader.specs()

    def content_key(self, name: str) -> Hashable:
        """What identifies the tensor's decoded value: a store blob id, or a file range with the
        file's size and modification time."""
        if isinstance(self.reader, StoredModel):
            key = self._blobs.get(name)
            if key is None:
                key = self._blobs[name] = ("blob", self.reader.blob(name))
            return key
        info = self.reader.tensors[name]
        path = self.reader.local_file(info.file).resolve()
        stat = path.stat()
        return ("file", str(path), stat.st_mtime_ns, stat.st_size, info.offset)

    def resident(self, name: str, device: torch.device) -> bool:
        """Whether :meth:`load` of ``name`` on ``device`` reads nothing (pinned or cached)."""
        content = self.content_key(name)
        return ((device == self.device and content in self.pinned)
                or (content, str(device)) in self.cache)

    def load(self, name: str, device: str | torch.device | None = None) -> torch.Tensor:
        dev = torch.device(device or "cpu")
        content = self.content_key(name)
        if dev == self.device and content in self.pinned:
            return self.pinned[content]
        key = (content, str(dev))
        tensor = self.cache.get(key)
        if tensor is None:
            if isinstance(self.reader, StoredModel):
                tensor = self.reader.load(name, device=dev)
            else:
                tensor = self.reader.load(name).to(dev)
            self.cache.put(key, tensor)
        return tensor


def default_budget(device: torch.device) -> int:
    """Half the free memory of a CUDA device, a quarter of the available host memory for the
    CPU: Linux's ``MemAvailable``, which counts the page cache the kernel would give back (the
    free pages alone are small on a machine that has just read or written models), else the
    free pages, else 1 GiB."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError):
        return 1 << 30
