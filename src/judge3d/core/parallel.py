"""Ordered process pools for the per-mesh CPU work (decode, oracle scoring, validity, rendering).

That work is single-threaded numpy/scipy/trimesh, so on a 2-core machine one process leaves a core
idle (measured: two scoring processes each run at ~0.85-0.95x the speed of one alone). Results
never depend on the worker count: every item is computed by the same function from the same
inputs (all randomness is keyed by names, see :mod:`judge3d.core.seeding`), and results come back in
input order, so manifests and metrics are byte-identical for any ``JUDGE3D_WORKERS``.

Workers are forked, so they inherit the parent's imports and loaded objects for free; they must
not call into torch (a forked child that enters torch's OpenMP pool can hang), which is why only
numpy-side work is sent to them.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

WORKERS_ENV = "JUDGE3D_WORKERS"


def worker_count() -> int:
    """Processes for per-item CPU work: ``$JUDGE3D_WORKERS`` if set (1 = inline, no pool), else the
    CPUs this process may run on. Not a DVC param on purpose: it changes speed, never results."""
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"{WORKERS_ENV}={raw!r} is not an integer; set it to 1 (no pool) or more") from None
        if n < 1:
            raise ValueError(f"{WORKERS_ENV}={n}: use 1 (no pool) or more")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None,
                initializer: Callable[[], None] | None = None, max_in_flight: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` over ``workers`` forked processes, yielding results in input order.

    ``items`` is consumed lazily, at most ``max_in_flight`` (default 32 per worker) ahead of the
    results handed back, so a producer (a sampler) keeps working while workers score, and a caller
    can log each result as it comes and resume after a crash. Inline when workers <= 1 or where fork
    is unavailable. An exception in a worker is re-raised here with its original type; a worker that
    dies outright (killed, crashed) raises ``BrokenProcessPool`` instead of hanging the map.
    """
    workers = worker_count() if workers is None else int(workers)
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        if initializer is not None:
            initializer()
        yield from map(fn, items)
        return
    limit = max(workers, max_in_flight or 32 * workers)
    global _FN, _INIT
    previous, _FN, _INIT = (_FN, _INIT), fn, initializer  # forked workers see these as globals: closures work
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_start_worker)
    try:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(_call, item))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        _FN, _INIT = previous


_FN: Callable | None = None
_INIT: Callable[[], None] | None = None


def _start_worker() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the pool, so a worker must not die
    # of SIGINT mid-task.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _INIT is not None:
        _INIT()


def _call(item):
    try:
        return _FN(item)
    except Exception:
        raise
    except BaseException as exc:  # KeyboardInterrupt/SystemExit would kill the worker: report it instead
        raise RuntimeError(f"worker stopped by {type(exc).__name__}: {exc}") from None
