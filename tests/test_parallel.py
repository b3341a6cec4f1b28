"""The threading helpers: order, bounded look-ahead, errors and early stops."""

from __future__ import annotations

import threading
import time

import pytest

from mergehub.storage.parallel import LoadWatch, background, ordered_map


def test_ordered_map_keeps_order_with_uneven_work():
    def slow_square(i: int) -> int:
        time.sleep(0.002 * (7 - i % 7))
        return i * i

    assert list(ordered_map(slow_square, range(30), workers=3)) == [i * i for i in range(30)]


def test_background_yields_everything_in_order_on_another_thread():
    threads = set()

    def items():
        for i in range(100):
            threads.add(threading.current_thread().name)
            yield i

    assert list(background(items(), depth=3)) == list(range(100))
    assert threads == {"mergehub-producer"}


def test_background_runs_at_most_depth_ahead():
    produced = []

    def items():
        for i in range(50):
            produced.append(i)
            yield i

    stream = background(items(), depth=2)
    assert next(stream) == 0
    time.sleep(0.1)  # let the producer run as far as it may
    # one taken, two queued, one more produced and blocked on the full queue
    assert len(produced) <= 4
    stream.close()


def test_background_reraises_the_producers_error_after_earlier_items():
    def items():
        yield 1
        yield 2
        raise ValueError("tensor 'w': bad")

    got = []
    with pytest.raises(ValueError, match="tensor 'w': bad"):
        for x in background(items()):
            got.append(x)
    assert got == [1, 2]


def test_background_early_stop_ends_the_producer():
    produced = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    stream = background(items(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    n = len(produced)
    time.sleep(0.05)
    assert len(produced) == n < 10  # the producer stopped instead of running to the end
    assert not any(t.name == "mergehub-producer" for t in threading.enumerate())


def test_load_watch_sets_and_restores_even_on_error():
    import torch

    before = torch.get_num_threads()
    seen = []
    with pytest.raises(RuntimeError):
        with LoadWatch(busy=True):
            worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            worker.start()
            worker.join()
            seen.append(torch.get_num_threads())
            raise RuntimeError("boom")
    assert seen == [1, 1] and torch.get_num_threads() == before


def test_load_watch_follows_other_processes_load(monkeypatch):
    """One thread while others use at least half a core over the last interval (the busy
    core-seconds less this process's own CPU seconds), torch's setting otherwise; no look
    before the interval has passed."""
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    clock = {"busy": 0.0, "own": 0.0, "now": 0.0}
    watch = LoadWatch(busy=False, interval=1.0, clock=lambda: clock["now"],
                      sample=lambda: (clock["busy"], clock["own"], clock["now"]))
    with watch:
        for busy, own, elapsed, want in [
                (1.9, 1.6, 1.0, 4),  # others 0.3 core: not busy
                (1.2, 0.5, 1.0, 1),  # others 0.7 core: busy
                (3.0, 0.0, 0.5, 1),  # before the interval: no look
                (3.0, 2.0, 2.0, 1),  # others 1.6 cores over the 2.5 s since the last look
                (2.0, 1.9, 1.0, 4)]:  # others 0.1 core: back to torch's setting
            clock["busy"] += busy
            clock["own"] += own
            clock["now"] += elapsed
            watch.check()
            assert watch.busy == (want == 1)
            assert threads[-1] == want
    assert threads[-1] == 4


def test_busy_machine_sees_a_spinning_core():
    from mergehub.storage.parallel import busy_machine

    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    worker = threading.Thread(target=spin)
    worker.start()
    try:
        assert busy_machine(sample=0.3)
    finally:
        stop.set()
        worker.join()


def _by_size_run(sizes: list[int], budget: int, workers: int) -> tuple[list[int], int]:
    """ordered_map_by_size over items 0..n-1 of ``sizes``: the order they started in and the
    most that ran at once, checking the results' order and the budget as it goes."""
    from mergehub.storage.parallel import ordered_map_by_size

    lock = threading.Lock()
    started, held, yielded = [], set(), []
    running, peak = [0], [0]

    def work(i: int) -> int:
        with lock:
            started.append(i)
            held.add(i)
            # those started ahead of their turn (all held but the next in order) fit the budget
            assert sum(sizes[j] for j in held if j != len(yielded)) <= budget, (i, held)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.005 * sizes[i] ** 0.5)
        with lock:
            running[0] -= 1
        return -i

    for r in ordered_map_by_size(work, list(range(len(sizes))), lambda i: sizes[i], budget,
                                 workers):
        with lock:
            yielded.append(-r)
            held.discard(-r)
    assert yielded == list(range(len(sizes)))
    assert sorted(started) == list(range(len(sizes)))
    return started, peak[0]


def test_ordered_map_by_size_starts_the_largest_first_within_the_budget():
    """Results come in input order; items start largest first, the sizes of those started
    ahead of their turn stay within the budget (the next item in order always starts); no
    more than ``workers`` run at once."""
    started, peak = _by_size_run([5, 1, 1, 1, 40, 1, 1, 30, 1, 1], 50, workers=2)
    assert started[:2] == [0, 4]  # the next in order, then the largest that fits (40)
    assert peak <= 2
    started, _ = _by_size_run([1] * 9 + [30], 50, workers=2)
    assert started[:2] == [0, 9]  # the large last item does not run alone at the end
    started, _ = _by_size_run([1] * 9 + [30], 20, workers=2)
    assert started[-1] == 9  # it does where it does not fit
    started, _ = _by_size_run([30, 1, 30] + [1] * 6, 30, workers=2)
    assert started[:2] == [0, 2]  # the next in order is not counted against the budget


def test_ordered_map_by_size_reraises_and_stops_starting():
    from mergehub.storage.parallel import ordered_map_by_size

    ran = []

    def work(i: int) -> int:
        ran.append(i)
        if i == 2:
            raise ValueError("tensor 'w2': bad")
        time.sleep(0.01)
        return i

    got = []
    with pytest.raises(ValueError, match="tensor 'w2': bad"):
        for r in ordered_map_by_size(work, list(range(200)), lambda i: 1, 10, workers=2):
            got.append(r)
    assert got == [0, 1]
    assert len(ran) < 20  # what had not started was dropped
    assert not any(t.name.startswith("mergehub_") for t in threading.enumerate())


def test_ordered_map_by_size_scales_to_many_items():
    """A model of tens of thousands of small tensors (a mixture of experts): each step looks
    at a few waiting items, not all of them (a scan of every waiting item per step took
    minutes here)."""
    from mergehub.storage.parallel import ordered_map_by_size

    n = 30_000
    start = time.perf_counter()
    out = list(ordered_map_by_size(lambda i: i, list(range(n)), lambda i: 1 + i % 7, 1 << 20,
                                   workers=2))
    assert out == list(range(n))
    assert time.perf_counter() - start < 30
