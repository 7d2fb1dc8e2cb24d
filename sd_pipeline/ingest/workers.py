"""Per-input work on all cores, results in input order.

Reading (local files, URL downloads), caption and image checks, decoding, resizing,
encoding and hashing run in worker processes, a chunk of inputs per task, while this
process lists inputs, reads S3 objects, records decisions and writes shards. A bounded
window of chunks is in flight, so workers never wait for this process between batches and
memory holds at most ``window`` chunks of raw images. Results come back in the order
inputs went in, which keeps every decision downstream (duplicates, shard contents, the
version id) independent of how many workers ran.

With ``read_ahead`` > 1 (URL lists), a worker starts all the reads of its chunk at once on
that many threads of its own and checks each input as soon as it and those before it have
arrived: the downloaded bytes never cross a process boundary, and this process's GIL is
not shared with dozens of download threads.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

log = logging.getLogger("sd_pipeline.ingest")

T = TypeVar("T")
CHUNK = 8  # inputs per worker task: amortises the hand-over, small enough to balance
POOL_AFTER_S = 0.5  # auto mode: start the pool once in-process work is expected to take this long


def process_chunk(jobs: list[Any], fn: Callable[[Any], Any]) -> list[Any]:
    """Run ``fn`` on each job of a chunk (in a worker process)."""
    return [fn(job) for job in jobs]


_READERS: dict[int, ThreadPoolExecutor] = {}  # this process's read threads, by count
_READERS_LOCK = threading.Lock()


def _readers(threads: int) -> ThreadPoolExecutor:
    """This process's pool of ``threads`` read threads, kept between chunks."""
    with _READERS_LOCK:
        pool = _READERS.get(threads)
        if pool is None:
            pool = _READERS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="sd-read")
        return pool


def _read(job: tuple[Any, Any]) -> tuple[Any, Any]:
    tag, pending = job
    return tag, (pending() if callable(pending) else pending)


def process_chunk_read_ahead(
    jobs: list[tuple[Any, Any]], fn: Callable[[Any], Any], threads: int
) -> list[Any]:
    """``process_chunk`` for jobs ``(tag, deferred read)``: every read of the chunk starts at
    once on ``threads`` threads; ``fn`` then runs on each job, in order, as it arrives."""
    pool = _readers(threads)
    reads = [pool.submit(_read, job) for job in jobs]
    try:
        return [fn(read.result()) for read in reads]
    finally:
        for read in reads:  # after a failure: drop reads not started
            read.cancel()


class _Done(Generic[T]):
    """A finished result, standing in for a Future."""

    def __init__(self, value: T) -> None:
        self.value = value

    def result(self) -> T:
        return self.value


@contextmanager
def _parent_main_hidden() -> Iterator[None]:
    """Spawned workers must not re-run the parent's ``__main__``.

    In an Airflow task that is the ``airflow`` CLI, whose import initialises a metadata
    database a task process has no access to (found by the end-to-end test under the real
    scheduler); a worker needs only this module and the job's function, which live in
    importable modules. While processes start, spawn sees a ``__main__`` without a file.
    """
    main = sys.modules.get("__main__")
    saved: dict[str, Any] = {
        name: main.__dict__[name] for name in ("__file__", "__spec__") if main and name in main.__dict__
    }
    if main is not None:
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size


def _widen_pipes(pool: ProcessPoolExecutor) -> None:
    """Give the pool's task and result pipes 1 MiB instead of 64 KiB (Linux).

    A chunk of processed images (1-3 MB), or of raw ones read from S3 here, then crosses in
    a few writes instead of dozens, each of which made the sender wait until the other side
    was scheduled and, in this process, held the GIL: on a busy machine workers sat idle.
    Best effort: where the pipes cannot grow, they stay as they are.
    """
    try:
        import fcntl
    except ImportError:  # not a Unix
        return
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setpipe is None:
        return
    for queue in (getattr(pool, "_call_queue", None), getattr(pool, "_result_queue", None)):
        end = getattr(queue, "_reader", None)
        try:
            if end is not None:
                fcntl.fcntl(end.fileno(), setpipe, PIPE_BYTES)
        except OSError:  # above the system's limit for an unprivileged user
            pass


class Workers:
    """A pool of worker processes running one picklable function, shared by an ingest's units.

    ``workers``: 1 runs everything in this process; N >= 2 starts N processes at the first
    job; 0 means one per CPU, started once the first chunk, run here, shows the whole input
    would take ``POOL_AFTER_S`` or more (small inputs never pay the start-up of about 0.1 s
    per process; real images start the pool after one chunk).
    Processes are spawned, not forked: the caller may be an Airflow task with threads and
    sockets.
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int = 0) -> None:
        self.fn = fn
        self.auto = workers == 0
        self.workers = (os.cpu_count() or 1) if self.auto else workers
        self.pool: Executor | None = None
        self.inline_seconds = 0.0
        self.inline_jobs = 0
        self.expected = 0  # jobs still to come, as far as the caller knows
        self.window = 4 * max(self.workers, 1)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None

    def _executor(self) -> Executor | None:
        projected = self.inline_seconds / max(self.inline_jobs, 1) * self.expected
        wanted = not self.auto or self.inline_seconds + projected >= POOL_AFTER_S
        if self.pool is None and self.workers > 1 and wanted:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"))
            _widen_pipes(self.pool)
            with _parent_main_hidden():  # N jobs at once start all N processes (one per submit)
                started = [self.pool.submit(process_chunk, [], self.fn) for _ in range(self.workers)]
                for future in started:
                    future.result()
            log.info("image workers: %d processes", self.workers)
        return self.pool

    def _submit(self, jobs: list[Any], read_ahead: int = 0) -> Future[list[Any]] | _Done[list[Any]]:
        if not jobs:
            return _Done([])
        pool = self._executor()
        if pool is not None:
            if read_ahead > 1:
                return pool.submit(process_chunk_read_ahead, jobs, self.fn, read_ahead)
            return pool.submit(process_chunk, jobs, self.fn)
        started = time.perf_counter()
        done = (
            process_chunk_read_ahead(jobs, self.fn, read_ahead)
            if read_ahead > 1
            else process_chunk(jobs, self.fn)
        )
        self.inline_seconds += time.perf_counter() - started
        self.inline_jobs += len(jobs)
        return _Done(done)

    def ordered(
        self, entries: Iterable[tuple[T, Any]], expected: int = 0, read_ahead: int = 0
    ) -> Iterator[tuple[T, Any]]:
        """For each ``(tag, job)`` in order, ``(tag, fn(job))``; a job of None passes through
        as ``(tag, None)`` at its place in the order. ``expected``: how many entries will
        come (a hint for starting the pool). ``read_ahead`` > 1: jobs are ``(tag, deferred
        read)`` pairs whose reads a worker runs concurrently on that many threads, in chunks
        of at least that many jobs (``process_chunk_read_ahead``)."""
        chunk = max(CHUNK, read_ahead)
        window: deque[tuple[list[tuple[T, bool]], Future[list[Any]] | _Done[list[Any]]]] = deque()
        tags: list[tuple[T, bool]] = []
        jobs: list[Any] = []

        def drain(limit: int) -> Iterator[tuple[T, Any]]:
            while len(window) > limit:
                chunk_tags, future = window.popleft()
                results = iter(future.result())
                for tag, has_job in chunk_tags:
                    yield tag, next(results) if has_job else None

        self.expected = expected
        try:
            for tag, job in entries:
                self.expected -= 1
                tags.append((tag, job is not None))
                if job is not None:
                    jobs.append(job)
                if len(jobs) >= chunk or len(tags) >= 4 * chunk:
                    window.append((tags, self._submit(jobs, read_ahead)))
                    tags, jobs = [], []
                    yield from drain(self.window)
            window.append((tags, self._submit(jobs, read_ahead)))
            yield from drain(0)
        finally:
            for _, future in window:  # the consumer stopped early or failed
                if isinstance(future, Future):
                    future.cancel()
