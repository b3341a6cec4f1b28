"""Run per-tensor work on a few threads, in order, with bounded memory.

Hashing (hashlib), zstd and numpy's elementwise kernels release the GIL, so encoding and
decoding tensors on threads uses every core without copying tensors between processes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """One thread per core, at most 4 (beyond that the disk is the limit)."""
    return max(1, min(4, os.cpu_count() or 1))


_DONE = object()


def busy_machine(sample: float = 0.2) -> bool:
    """Whether other processes keep the cores busy right now: at least half a core in use
    during a short sample (``/proc/stat``, Linux); elsewhere, the 1-minute load average + 1 >=
    the number of cores. Then streamed work should run on one intra-op thread (:class:`LoadWatch`)."""
    cores = os.cpu_count() or 1

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    try:
        total0, idle0 = ticks()
        time.sleep(sample)
        total1, idle1 = ticks()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0] + 1 >= cores
        except OSError:
            return False
    elapsed = total1 - total0
    return elapsed > 0 and (1 - (idle1 - idle0) / elapsed) * cores >= 0.5


def _cpu_sample() -> tuple[float, float, float] | None:
    """(cores busy since boot in core-seconds as ``/proc/stat`` counts them, this process's
    CPU seconds, a monotonic clock), or ``None`` where ``/proc/stat`` cannot be read."""
    try:
        import resource

        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    except (ImportError, OSError, ValueError, IndexError):
        return None
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy, own.ru_utime + own.ru_stime, time.monotonic()


class LoadWatch:
    """Torch's intra-op threads for streamed CPU work, chosen again as the work goes on: one
    while other processes keep at least half a core busy (``busy`` to start with, e.g. from
    :func:`busy_machine`), torch's own setting otherwise; restored on leaving. A context
    manager; :meth:`check` between pieces of work looks at the cores' use since the last look
    (at most every ``interval`` seconds, without waiting): the busy core-seconds of
    ``/proc/stat`` less this process's own CPU time.

    Streamed work is many small operations (a chunk of ~1 MB each): splitting each of them
    across every core costs a barrier per operation, and when other processes keep the cores
    busy one descheduled thread stalls every barrier. Measured on 2 cores, 1B-parameter
    merges: busy, task arithmetic took 213-292 s with two intra-op threads and 26 s with one;
    idle, one thread made TIES 1.5x slower (106 s against 72 s) and task arithmetic 1.1x. A
    load that starts after the merge has started matters as much as one before it (a task
    arithmetic merge of 211M parameters on a 2-core machine other processes kept busy: 55-60 s
    with two threads, 2.9-3.9 s with one), and a choice made once at the start cannot see it.
    """

    def __init__(self, busy: bool, interval: float = 1.0,
                 sample: Callable[[], tuple[float, float, float] | None] = _cpu_sample,
                 clock: Callable[[], float] = time.monotonic):
        import torch

        self.default = torch.get_num_threads()
        self.busy = busy
        self.interval = interval
        self._sample, self._clock = sample, clock
        self._last = sample()

    def __enter__(self) -> LoadWatch:
        self._apply()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.default)

    def _apply(self) -> None:
        import torch

        torch.set_num_threads(1 if self.busy else self.default)

    def check(self) -> None:
        """Look again if ``interval`` has passed since the last look, and set the threads."""
        if (self._last is None or self.default == 1
                or self._clock() - self._last[2] < self.interval):
            return
        now = self._sample()
        if now is None:
            return
        elapsed = now[2] - self._last[2]
        others = (now[0] - self._last[0]) - (now[1] - self._last[1])
        self._last = now
        busy = others / elapsed >= 0.5
        if busy != self.busy:
            self.busy = busy
            self._apply()


def background(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` on a thread of its own, at most ``depth`` items ahead of the consumer.

    Lets producing the next items (reading, merging) overlap with consuming this one (writing
    it to disk). Exceptions from ``items`` are re-raised in the consumer, in order; if the
    consumer stops early, the producer stops at its next item.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put((item, None))
            slots.put((_DONE, None))
        except BaseException as err:  # handed to the consumer, raised there
            slots.put((_DONE, err))

    thread = threading.Thread(target=produce, name="mergehub-producer", daemon=True)
    thread.start()
    try:
        while True:
            item, err = slots.get()
            if err is not None:
                raise err
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, yielding results in input order.

    At most ``workers + 1`` items are in flight, so memory stays at a few tensors. If the
    consumer stops early or ``fn`` raises, pending work is cancelled.
    """
    workers = workers or default_workers()
    if workers == 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="mergehub")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_map_by_size(fn: Callable[[T], R], items: Sequence[T], size: Callable[[T], int],
                        budget: int, workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, yielding results in input order, the items
    started largest ``size`` first wherever the sizes of the items started ahead of their turn
    (not yet yielded, the next in order aside) stay within ``budget``; the next item in order
    always starts.

    For work whose items differ widely in size (a model's embedding is a quarter of it): in
    input order with a window of a few items, one large item keeps the consumer waiting while
    the other threads run out of work, and a large item last runs alone. ``budget`` bounds
    what finished results wait for their turn (e.g. bytes of merged tensors). If the consumer
    stops early or ``fn`` raises, work not started is dropped (what runs is waited for)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    sizes = [size(item) for item in items]
    waiting = sorted(range(len(items)), key=lambda i: -sizes[i])  # not started: largest first
    started: dict[int, Future[R]] = {}  # not yet yielded
    running: list[Future[R]] = []  # started and not done (at most workers + 1)
    ahead = 0  # sizes of the items started ahead of their turn and not yet yielded

    def submit(i: int) -> None:
        started[i] = future = pool.submit(fn, items[i])
        running.append(future)

    def start_more(next_out: int) -> None:
        """Start ``next_out`` if it waits, then the largest that fit while threads would
        idle (one queued beside each running: none waits for the consumer). Started items
        leave ``waiting`` as the scan meets them, so a scan passes over those that do not fit
        and little else (a model of 10^4 tensors costs no 10^8 steps)."""
        nonlocal ahead
        if next_out not in started:
            submit(next_out)
        running[:] = [f for f in running if not f.done()]
        gone = []
        for pos, i in enumerate(waiting):
            if len(running) > workers:
                break
            if i <= next_out or i in started:  # started already (yielded, or at its turn)
                gone.append(pos)
            elif ahead + sizes[i] <= budget:
                submit(i)
                ahead += sizes[i]
                gone.append(pos)
        for pos in reversed(gone):
            del waiting[pos]

    pool = ThreadPoolExecutor(workers, thread_name_prefix="mergehub")
    try:
        for i in range(len(items)):
            start_more(i)
            while not started[i].done():
                wait(running, return_when=FIRST_COMPLETED)
                start_more(i)
            result = started.pop(i).result()
            if i + 1 in started:  # its turn now: no longer ahead
                ahead -= sizes[i + 1]
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
