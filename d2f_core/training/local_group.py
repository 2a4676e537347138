"""One torch.distributed group on this machine for one run: this process is rank 0, ranks 1…N-1 are worker
processes it spawns (DESIGN §7, "launching from the ComfyUI server"). Pure torch and the standard library; what a
worker runs is the host's business (a bootstrap source and a job per worker).

Contract of :class:`LocalGroup` (rank 0's side):

* :meth:`LocalGroup.start` makes a TCP store on 127.0.0.1 (a free port, this run only), spawns the workers with
  the ``spawn`` start method of :mod:`torch.multiprocessing` (tensors in a job travel through shared memory, not
  copied through a pipe), hands each worker its job, waits until every worker says it is ready (its slow setup,
  e.g. loading a model, done) and then initialises torch.distributed's default group over the store: gloo or
  NCCL, with a bounded timeout. A worker that dies or fails while getting ready, or ``should_abort()``, ends the
  start with :class:`WorkerFailed` / :class:`Aborted`, every worker stopped and no group left behind.
* While the group runs, a thread watches the workers. A worker that ends without saying it is done is recorded
  as the run's failure (:meth:`LocalGroup.failure`, naming the rank and how it ended); under NCCL the thread also
  aborts the group so that rank 0 does not wait out the timeout (gloo raises on rank 0 by itself as soon as a
  peer's connection closes).
* :meth:`LocalGroup.close` always runs: after a good run it waits for the workers to finish, else it tears the
  group down first (which releases workers waiting in a collective), then stops what still runs (SIGTERM, then
  SIGKILL). Afterwards no worker process is left and torch.distributed has no default group: the host can start
  another run.

A worker (:func:`watch_parent`, :func:`report`, :func:`join`, :func:`leave`) exits by itself when rank 0's process
goes away, and says ``ready`` / ``done`` / ``error`` through the results queue.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import multiprocessing.spawn
from multiprocessing.reduction import ForkingPickler
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

# How long a collective may wait for a slow rank before the group gives up: the backstop for a hang no peer's
# death reveals. It must outlast what rank 0 alone does between two collectives (a preview, a save, loading its
# model while the workers wait in the first collective).
GROUP_TIMEOUT = timedelta(minutes=10)
# After rank 0's run failed: how long a worker that died on its own may take to be seen dead (its sockets close a
# moment before its exit status is there), and how long the others get to leave after the group is torn down.
SEEN_DEAD_S = 3.0
LEAVE_S = 15.0
# After a good run the workers only have to return from their last collective and exit.
FINISH_S = 60.0

# multiprocessing's spawn re-runs the parent's ``__main__`` script in every child (as ``__mp_main__``). The parent
# here is a host's server (ComfyUI's main.py parses arguments, runs custom nodes' start-up scripts, sets up logging
# at import): a worker must not repeat any of that, so its preparation data leaves ``__main__`` out. Held while
# spawning, as the patched function is multiprocessing's own.
_SPAWN_LOCK = threading.Lock()


class WorkerFailed(RuntimeError):
    """A worker ended before its run was done: ``rank``, and ``how`` in words."""

    def __init__(self, rank: int, how: str):
        super().__init__(f"rank {rank} {how}")
        self.rank, self.how = rank, how


class Aborted(Exception):
    """``should_abort()`` said stop while the workers were getting ready."""


@dataclass
class _Worker:
    rank: int
    process: Any
    jobs: Any
    ready: bool = False
    done: bool = False
    error: str | None = None
    stopped_by_us: bool = False


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class LocalGroup:
    """Rank 0 and ``world_size - 1`` spawned workers in one default process group (see the module's contract).

    ``bootstrap``: Python source each worker executes first (with the name ``ARGS`` bound to its arguments:
    ``rank``, ``world_size``, ``backend``, ``port``, ``timeout_s``, ``jobs``, ``results``, ``device_index``,
    ``threads`` and the host's own ``extra``); it must end by calling the host's worker function, which takes its
    job with :func:`job` and uses :func:`report` / :func:`join` / :func:`leave`. ``device_indices``: the CUDA
    device of each worker rank 1…N-1 (None: CPU).
    """

    def __init__(self, world_size: int, backend: str, bootstrap: str, extra: dict, device_indices: list,
                 timeout: timedelta = GROUP_TIMEOUT, threads: int | None = None):
        if world_size < 2 or len(device_indices) != world_size - 1:
            raise ValueError("a local group has rank 0 and at least one worker, each with a device entry")
        self.world_size, self.backend, self.timeout = world_size, backend, timeout
        self.bootstrap, self.extra, self.device_indices = bootstrap, extra, device_indices
        self.threads = threads if threads is not None else max(1, torch.get_num_threads() // world_size)
        self.workers: list[_Worker] = []
        self._failure: WorkerFailed | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None
        self._store = None
        self._results = None

    # --- rank 0 ---------------------------------------------------------------------------------
    def start(self, jobs: list, should_abort: Callable[[], bool] = lambda: False) -> None:
        """Spawn the workers, give worker r ``jobs[r - 1]``, wait until all are ready, form the group. On any
        failure everything started is stopped again before the exception leaves."""
        if dist.is_initialized():
            raise RuntimeError("torch.distributed already has a default group in this process")
        try:
            self._spawn(jobs)
            self._wait_ready(should_abort)
            dist.init_process_group(self.backend, store=self._store, rank=0, world_size=self.world_size,
                                    timeout=self.timeout)
        except BaseException:
            self.close(ok=False)
            raise
        self._watcher = threading.Thread(target=self._watch, name="d2f-local-group-watch", daemon=True)
        self._watcher.start()

    def _spawn(self, jobs: list) -> None:
        ctx = tmp.get_context("spawn")
        self._store = dist.TCPStore("127.0.0.1", 0, self.world_size, is_master=True, timeout=self.timeout,
                                    wait_for_workers=False)
        self._results = ctx.Queue()
        with _SPAWN_LOCK, _without_main():
            for rank in range(1, self.world_size):
                args = {"rank": rank, "world_size": self.world_size, "backend": self.backend,
                        "port": self._store.port, "timeout_s": self.timeout.total_seconds(),
                        "results": self._results, "jobs": ctx.Queue(), "device_index": self.device_indices[rank - 1],
                        "threads": self.threads, "extra": self.extra}
                # exec of a source string: the worker unpickles nothing of the host's before its bootstrap has
                # imported the host's modules (under the names the parent uses).
                proc = ctx.Process(target=exec, args=(self.bootstrap, {"ARGS": args}), name=f"d2f-rank-{rank}")
                proc.start()
                self.workers.append(_Worker(rank, proc, args["jobs"]))
        for w in self.workers:
            # Pickled here, not in the queue's feeder thread: a job that cannot be sent fails the start with its
            # error instead of leaving the worker waiting. Once per worker: a tensor's shared-memory handle can be
            # taken only once.
            w.jobs.put(bytes(ForkingPickler.dumps(jobs[w.rank - 1])))

    def _drain(self, timeout: float) -> None:
        """Take the workers' messages waiting in the results queue (waiting up to ``timeout`` for the first)."""
        while True:
            try:
                kind, rank, text = self._results.get(timeout=timeout)
            except (queue.Empty, OSError, EOFError, ValueError):
                return
            timeout = 0
            w = self.workers[rank - 1]
            if kind == "ready":
                w.ready = True
            elif kind == "done":
                w.done = True
            elif kind == "error":
                w.error = text

    def _wait_ready(self, should_abort: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not all(w.ready for w in self.workers):
            self._drain(0.2)
            for w in self.workers:
                if not w.ready and w.process.exitcode is not None:
                    self._drain(0.5)  # its error message, if it managed to send one
                    raise self._failed(w)
            if should_abort():
                raise Aborted("stopped while the worker processes were starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker processes were not ready within {self.timeout}")

    def _failed(self, w: _Worker) -> WorkerFailed:
        how = describe_exit(w.process.exitcode)
        return WorkerFailed(w.rank, f"{how}: {w.error}" if w.error else how)

    def _watch(self) -> None:
        """Record the first worker that ends before it is done; under NCCL, abort the group for rank 0."""
        pending = {w.process.sentinel: w for w in self.workers}
        while pending and not self._closing.is_set():
            ended = multiprocessing.connection.wait(list(pending), timeout=0.5)
            for sentinel in ended:
                w = pending.pop(sentinel)
                w.process.join(0)
                self._drain(0.2)
                if not w.done and not self._closing.is_set():
                    self._record(self._failed(w))
                    if self.backend == "nccl":
                        _abort_group()

    def _record(self, failure: WorkerFailed) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = failure
                logging.error(f"Diff2Flow: worker {failure}")

    def failure(self) -> WorkerFailed | None:
        """The first worker that ended before it was done, if any (rank 0's own errors are not recorded here)."""
        return self._failure

    def close(self, ok: bool) -> None:
        """End the group (see the module's contract). ``ok``: rank 0's run ended normally. After a failure of
        rank 0, a worker that died on its own just before is still recorded as the failure."""
        if not ok and self._failure is None:
            # Rank 0's error may be the echo of a worker's death (gloo: "connection closed by peer"): give the dead
            # worker's exit status a moment to arrive, so the cause is named rather than the echo.
            sentinels = [w.process.sentinel for w in self.workers if w.process.exitcode is None]
            if sentinels:
                multiprocessing.connection.wait(sentinels, timeout=SEEN_DEAD_S)
            self._drain(0)
            for w in self.workers:
                if w.process.exitcode not in (None, 0) and not w.done:
                    self._record(self._failed(w))
                    break
        self._closing.set()
        if not ok and dist.is_initialized():
            _destroy_group()  # workers waiting in a collective now fail and leave
        deadline = time.monotonic() + (FINISH_S if ok else LEAVE_S)
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
        for sig_name in ("terminate", "kill"):
            alive = [w for w in self.workers if w.process.exitcode is None]
            for w in alive:
                w.stopped_by_us = True
                getattr(w.process, sig_name)()
            for w in alive:
                w.process.join(5.0)
        if self._watcher is not None:
            self._watcher.join(2.0)
        if dist.is_initialized():
            _destroy_group()
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.jobs.close()
                w.jobs.join_thread()
        if self._results is not None:
            with contextlib.suppress(Exception):
                self._results.close()
        self._store = None


@contextlib.contextmanager
def _without_main():
    original = multiprocessing.spawn.get_preparation_data

    def preparation_data(name):
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data
    multiprocessing.spawn.get_preparation_data = preparation_data
    try:
        yield
    finally:
        multiprocessing.spawn.get_preparation_data = original


def _destroy_group() -> None:
    try:
        dist.destroy_process_group()
    except Exception as exc:  # a group broken by a dead peer may fail to shut down cleanly; it is gone either way
        logging.debug(f"Diff2Flow: destroying the process group: {exc}")


def _abort_group() -> None:
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None and dist.is_initialized():
        with contextlib.suppress(Exception):
            abort()


# --- worker side ----------------------------------------------------------------------------------
def watch_parent() -> None:
    """End this worker (exit status 1) as soon as the process that spawned it is gone."""
    parent = tmp.parent_process()
    if parent is None:
        return

    def wait():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)
    threading.Thread(target=wait, name="d2f-watch-parent", daemon=True).start()


def job(args: dict):
    """This worker's job, as rank 0 gave it (call once, after the modules it refers to can be imported)."""
    return ForkingPickler.loads(args["jobs"].get())


def report(args: dict, kind: str, text: str | None = None) -> None:
    """Tell rank 0 ``ready`` (set up, about to join the group), ``done`` or ``error`` (with ``text``)."""
    args["results"].put((kind, args["rank"], text))


def join(args: dict) -> None:
    """Join rank 0's group as ``args["rank"]`` (blocks until every rank has)."""
    timeout = timedelta(seconds=args["timeout_s"])
    store = dist.TCPStore("127.0.0.1", args["port"], args["world_size"], is_master=False, timeout=timeout)
    dist.init_process_group(args["backend"], store=store, rank=args["rank"], world_size=args["world_size"],
                            timeout=timeout)


def leave() -> None:
    if dist.is_initialized():
        _destroy_group()
