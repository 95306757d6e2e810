"""gpumix.kernels._launch.run_parallel: the slices cover every item exactly once,
errors in any slice reach the caller, and concurrent callers share the pool
without deadlock (two pipelines, or a pipeline and the training loop)."""

import threading

import numpy as np
import pytest

from gpumix.kernels._launch import CHUNKS_PER_WORKER, _pool, cpu_workers, run_parallel, scratch


@pytest.fixture
def several_workers(monkeypatch):
    """At least four workers, whatever this machine has: with one, run_parallel
    runs inline and a concurrency test would prove nothing."""
    monkeypatch.setenv("GPUMIX_NUM_THREADS", "4")
    assert cpu_workers() == 4


def slices_of(n_items, **options):
    seen = []
    lock = threading.Lock()

    def record(tag, lo, hi):
        with lock:
            seen.append((tag, lo, hi))

    run_parallel(record, n_items, "t", **options)
    return sorted((lo, hi) for _, lo, hi in seen)


@pytest.mark.parametrize("n_items", [0, 1, 2, 3, 7, 64, 1001])
def test_slices_cover_every_item_once(n_items):
    slices = slices_of(n_items)
    covered = np.zeros(n_items, int)
    for lo, hi in slices:
        assert lo < hi
        covered[lo:hi] += 1
    assert np.all(covered == 1)
    assert len(slices) <= cpu_workers() * CHUNKS_PER_WORKER


def test_min_items_bounds_the_number_of_slices():
    slices = slices_of(10, min_items=4)
    assert len(slices) <= 2 and all(hi - lo >= 4 for lo, hi in slices)
    assert all(hi - lo >= 3 for lo, hi in slices_of(1000, min_items=3))
    assert slices_of(3, min_items=4) == [(0, 3)]


def test_a_batch_of_little_data_runs_in_one_slice(several_workers, monkeypatch):
    from gpumix.kernels import _launch

    monkeypatch.setattr(_launch, "MIN_PARALLEL_BYTES", 64 * 1000)
    assert slices_of(64, item_bytes=999) == [(0, 64)]  # just under the bound in all
    at_bound = slices_of(64, item_bytes=1000)
    assert len(at_bound) == 4 * CHUNKS_PER_WORKER  # as without item_bytes
    assert at_bound == slices_of(64)


def test_an_error_in_any_slice_reaches_the_caller():
    def fail_on_last(lo, hi):
        if hi == 50:
            raise ValueError("slice failed")

    with pytest.raises(ValueError, match="slice failed"):
        run_parallel(fail_on_last, 50)


def test_concurrent_callers_each_get_their_own_result(several_workers):
    results = {}

    def fill(out, lo, hi):
        out[lo:hi] += 1

    def caller(tag):
        out = np.zeros(5000, int)
        for _ in range(50):
            run_parallel(fill, out.size, out)
        results[tag] = out

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert all(np.all(out == 50) for out in results.values()) and len(results) == 4
    assert len(slices_of(5000)) > 1  # each call was split over the pool


def test_a_busy_pool_does_not_stall_the_caller(several_workers):
    """Slices are claimed, not assigned: with every pool thread held by
    another caller's long task, the caller runs all the slices itself and
    returns (an assigned slice would wait for the release)."""
    release = threading.Event()
    pool = _pool()
    blockers = [pool.submit(release.wait, 60) for _ in range(pool._max_workers)]
    try:
        done = threading.Event()
        out = np.zeros(1000, int)

        def fill(lo, hi):
            out[lo:hi] += 1

        caller = threading.Thread(target=lambda: (run_parallel(fill, out.size), done.set()))
        caller.start()
        assert done.wait(30), "run_parallel waited for a busy pool thread"
        assert np.all(out == 1)
    finally:
        release.set()
        for blocker in blockers:
            blocker.result(timeout=60)


def test_a_call_from_inside_a_slice_runs_inline(several_workers):
    outer_threads, inner_threads = {}, {}
    lock = threading.Lock()
    out = np.zeros((12, 100), int)

    def inner(row, lo, hi):
        with lock:
            inner_threads.setdefault(row, set()).add(threading.get_ident())
        out[row, lo:hi] += 1

    def outer(lo, hi):
        for row in range(lo, hi):
            with lock:
                outer_threads[row] = threading.get_ident()
            run_parallel(inner, out.shape[1], row)

    run_parallel(outer, out.shape[0])
    assert np.all(out == 1)
    assert len(slices_of(out.shape[0])) > 1  # the outer call was really split
    assert all(inner_threads[row] == {outer_threads[row]} for row in range(out.shape[0]))


def test_scratch_is_reused_per_thread_and_grows():
    a = scratch("test.buffer", (4, 5), np.float32)
    b = scratch("test.buffer", (2, 3), np.int16)
    assert b.__array_interface__["data"][0] == a.__array_interface__["data"][0]
    assert b.shape == (2, 3) and b.dtype == np.int16
    grown = scratch("test.buffer", (1000,), np.float64)
    assert grown.shape == (1000,) and grown.nbytes == 8000
    other = {}
    worker = threading.Thread(target=lambda: other.setdefault(
        "address", scratch("test.buffer", (4, 5), np.float32).__array_interface__["data"][0]))
    worker.start()
    worker.join()
    assert other["address"] != scratch("test.buffer", (4, 5), np.float32).__array_interface__[
        "data"][0]


def test_thread_count_follows_the_environment(monkeypatch):
    monkeypatch.setenv("GPUMIX_NUM_THREADS", "1")
    assert cpu_workers() == 1 and slices_of(100) == [(0, 100)]
    monkeypatch.setenv("GPUMIX_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="GPUMIX_NUM_THREADS must be a positive integer"):
        cpu_workers()


def _fill_in_child(queue):
    out = np.zeros(1000, int)

    def fill(lo, hi):
        out[lo:hi] += 1

    run_parallel(fill, out.size)
    queue.put(int(out.sum()))


def test_a_forked_child_gets_its_own_pool():
    import multiprocessing

    run_parallel(lambda lo, hi: None, 64)  # the parent's pool exists and has idled
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_fill_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the forked child hung or failed"
    assert queue.get(timeout=5) == 1000


def test_scratch_in_an_owners_store_is_shared_across_threads():
    store = {}
    here = scratch("owned", (8,), np.float64, store)
    there = {}
    worker = threading.Thread(target=lambda: there.setdefault(
        "array", scratch("owned", (8,), np.float64, store)))
    worker.start()
    worker.join()
    assert there["array"].__array_interface__["data"][0] == here.__array_interface__["data"][0]
    assert list(store) == ["owned"]


@pytest.mark.cuda
def test_upload_many_gives_back_every_array_exactly():
    import cupy as cp

    from gpumix.kernels._launch import STAGING_SLOTS, upload_many

    rng = np.random.default_rng(0)
    for call in range(2 * STAGING_SLOTS + 1):  # every staging buffer reused twice
        host = [rng.integers(-5, 5, 7), rng.random(3).astype(np.float32), np.zeros(0, np.int64),
                rng.integers(0, 9, (call + 1, 4)), np.array([True, False])]
        dtypes = [np.int64, None, np.int64, np.int64, None]
        device = upload_many(list(zip(host, dtypes)), cp.cuda.Stream())
        for h, d, dtype in zip(host, device, dtypes):
            assert d.dtype == (dtype or h.dtype) and d.shape == h.shape
            np.testing.assert_array_equal(d.get(), h)
