"""A worker pool over the shared directory: ``rpc.Pool``, a ``concurrent.futures.Executor``.

The side that has the work serves: the pool runs an RPC server on its tunnel
directory, and workers (``python -m rpc worker``, ``worker.py``) are RPC clients
that pull tasks. A worker first calls ``attach``, a call that stays open for as
long as the worker lives: when its connection is lost (the worker was killed, its
node died), the server cancels that call, and the pool knows at once which tasks
were lost. Between them, ``take`` long-polls for one task, ``done`` returns its
outcome and takes the next one in the same round trip, ``leave`` stops a worker's
takes (SIGTERM) and ``give_back`` requeues what it could not finish; ``progress``
carries a running task's ``rpc.report_progress`` to its future. ``pool_info`` is
for ``python -m rpc status --pool``, a client that never attaches.

Every piece of the pool's state lives on its event loop thread (the server's loop):
user threads only queue tasks there, and futures are resolved there.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures as cf
import itertools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import cloudpickle

from .errors import RemoteTraceback, RPCError, SerializationError
from .frames import describe_error, dumps, loads, unpack_error
from .cache import ResultCache
from .progress import MapProgress
from .server import RPCServer, start_server
from .taskprogress import Progress, checked_progress
from .transports import DEFAULT_LIVENESS_TIMEOUT

log = logging.getLogger(__name__)

#: Where a pool and its workers meet unless told otherwise.
DEFAULT_POOL_DIR = Path("~/.cache/fileforward/pool")
#: ``cache`` values: use stored results, or compute again (and store the new ones).
CACHE_MODES = ("use", "refresh")
#: Seconds to wait for the pool's server thread to start or stop.
LOOP_TIMEOUT = 60.0
#: Seconds a pool shut down at exit (never shut down by the program) waits for
#: its workers to leave: the program is ending, it must not hang.
EXIT_RELEASE_TIMEOUT = 2.0


class WorkerLost(RPCError):
    """The worker running a task was lost (killed, its node or job ended) and the
    pool's ``retries`` did not allow running the task again."""


class PoolClosed(RPCError):
    """Raised by ``take`` to a worker: the pool is closing, the worker should leave."""


class _Worker:
    """One attached worker, as the pool sees it."""

    def __init__(self, worker_id: str, info: Dict[str, Any]) -> None:
        self.id = worker_id
        self.info = dict(info)
        self.tasks: Dict[int, "_Task"] = {}
        self.leaving = False
        self.gone = False

    def __str__(self) -> str:
        where = f"{self.info.get('host')} pid {self.info.get('pid')}"
        return f"{where}, {describe_job(self.info)}"


def describe_job(info: Dict[str, Any]) -> str:
    """A worker's SLURM job as people know it: ``SLURM job 58 (array 57_1)``."""
    job = info.get("job")
    if not job:
        return "no SLURM job"
    if info.get("array_job"):
        return f"SLURM job {job} (array {info['array_job']}_{info.get('array_task')})"
    return f"SLURM job {job}"


class PoolFuture(cf.Future):
    """The future of a pool task. ``progress`` is the latest value the task gave
    ``rpc.report_progress`` (None until it does), ``progress_updated`` when it came
    (``time.monotonic()`` of the pool's process)."""

    def __init__(self) -> None:
        super().__init__()
        self.progress: Optional[Progress] = None
        self.progress_updated = 0.0


class _Task:
    """A submitted call, pickled once, and the future of its outcome."""

    def __init__(self, task_id: int, payload: bytes, future: PoolFuture,
                 cache_key: Optional[str]) -> None:
        self.id = task_id
        self.payload = payload
        self.future = future
        self.attempts = 0
        self.cache_key = cache_key  # where its result is stored, if the pool caches


class _Board:
    """The pool's books and the functions its workers call (all on the loop thread)."""

    def __init__(self, retries: int, where: str,
                 keep: Optional[Callable[[str, bytes], None]] = None) -> None:
        self.retries = retries
        #: Stores a result (cache key, pickled value) off the loop, if the pool caches.
        self.keep = keep
        self.where = where
        self.workers: Dict[str, _Worker] = {}
        self.queue: Deque[_Task] = collections.deque()
        #: Takes waiting for a task, oldest first: (worker, the future of its task).
        self.takers: Deque[Tuple[_Worker, "asyncio.Future[Optional[_Task]]"]] = collections.deque()
        self.said_waiting = False
        self.closing = False
        #: Set when the last worker is gone (made by :meth:`release_workers`).
        self.emptied: "Optional[asyncio.Event]" = None
        self.completed = 0
        self.failed = 0

    def functions(self) -> Dict[str, Callable[..., Any]]:
        """What the pool serves to its workers."""
        return {"attach": self.attach, "take": self.take, "done": self.done,
                "leave": self.leave, "give_back": self.give_back,
                "progress": self.progress, "pool_info": self.pool_info}

    # -------------------------------------------------------------- the pool's side

    def add(self, task: _Task) -> None:
        """Queue a submitted task (its future not yet running)."""
        self.queue.append(task)
        if not self.workers and not self.said_waiting:
            self.said_waiting = True
            log.info("waiting for a worker to join: run `python -m rpc worker --pool %s`",
                     self.where)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand queued tasks to waiting takes, oldest first on both sides."""
        while self.queue and self.takers:
            worker, waiter = self.takers.popleft()
            if waiter.done() or worker.gone or worker.leaving:
                continue
            task = self.queue.popleft()
            if not task.future.running() and not task.future.set_running_or_notify_cancel():
                self.takers.appendleft((worker, waiter))  # cancelled while queued
                continue
            task.attempts += 1
            worker.tasks[task.id] = task
            waiter.set_result(task)

    def info(self) -> Dict[str, Any]:
        """Workers, their jobs and what they run; the queue and the counters."""
        return {
            "tunnel_dir": self.where,
            "workers": [dict(w.info, running=sorted(w.tasks), leaving=w.leaving,
                             progress={i: t.future.progress for i, t in sorted(w.tasks.items())
                                       if t.future.progress is not None})
                        for w in self.workers.values()],
            "queued": len(self.queue),
            "running": sum(len(w.tasks) for w in self.workers.values()),
            "completed": self.completed,
            "failed": self.failed,
        }

    async def release_workers(self, timeout: float) -> None:
        """The pool closes: every worker's take raises :class:`PoolClosed`, and the
        pool waits (at most ``timeout``) until they have disconnected, so that they
        leave cleanly, with no call in flight."""
        self.closing = True
        self.emptied = asyncio.Event()
        for taker, waiter in self.takers:
            if not waiter.done():
                waiter.set_exception(PoolClosed())
        if self.workers:
            try:
                await asyncio.wait_for(self.emptied.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("%d worker(s) did not leave within %g s of the pool closing",
                            len(self.workers), timeout)

    def census(self) -> Tuple[int, int]:
        """Workers online, and how many of them run a task."""
        return len(self.workers), sum(1 for w in self.workers.values() if w.tasks)

    def running_futures(self) -> List[PoolFuture]:
        """The futures of the tasks that workers hold now."""
        return [t.future for w in self.workers.values() for t in w.tasks.values()]

    def fail_all(self, error: BaseException) -> None:
        """The pool is closing: nothing left will run."""
        tasks = list(self.queue) + [t for w in self.workers.values() for t in w.tasks.values()]
        self.queue.clear()
        for task in tasks:
            if task.future.cancel() or task.future.done():
                continue
            task.future.set_exception(error)

    # -------------------------------------------------------------- the workers' calls

    async def attach(self, worker_id: str, info: Dict[str, Any]) -> None:
        """Open for as long as the worker is connected: its cancellation means that
        the worker left, or was lost."""
        worker = self.workers[worker_id] = _Worker(worker_id, info)
        self.said_waiting = False
        log.info("worker %s joined (%d threads); %d worker(s) now", worker,
                 info.get("threads", 1), len(self.workers))
        try:
            await asyncio.get_running_loop().create_future()  # never set: ends by cancel
        finally:
            self.lose(worker)

    async def take(self, worker_id: str, timeout: float) -> Optional[Tuple[int, bytes]]:
        """Long-poll for one task: ``(task id, pickled (fn, args, kwargs))`` or None;
        raises :class:`PoolClosed` once the pool closes."""
        if self.closing:
            raise PoolClosed()
        worker = self.workers.get(worker_id)
        if worker is None or worker.leaving:
            return None
        waiter: "asyncio.Future[Optional[_Task]]" = asyncio.get_running_loop().create_future()
        self.takers.append((worker, waiter))
        self.dispatch()
        try:
            if not waiter.done():  # a busy pool's take is served at once, without a wait
                await asyncio.wait({waiter}, timeout=timeout)
        finally:
            if not waiter.done():
                waiter.cancel()  # skipped by dispatch(); also when this call is cancelled
        task = None if waiter.cancelled() else waiter.result()  # cancelled: timed out
        return None if task is None else (task.id, task.payload)

    async def done(self, worker_id: str, task_id: int, ok: bool, payload: bytes,
                   then_take: Optional[float]) -> Optional[Tuple[int, bytes]]:
        """A worker's outcome of a task (a pickled value, or a packed exception); with
        ``then_take``, the same as a :meth:`take` that follows (one round trip less)."""
        self.settle(worker_id, task_id, ok, payload)
        return None if then_take is None else await self.take(worker_id, then_take)

    def settle(self, worker_id: str, task_id: int, ok: bool, payload: bytes) -> None:
        """Resolve a task's future with the outcome a worker sent."""
        worker = self.workers.get(worker_id)
        task = worker.tasks.pop(task_id, None) if worker is not None else None
        if task is None or task.future.done():
            log.debug("ignoring the outcome of task %d from worker %s", task_id, worker_id)
            return
        if ok:
            try:
                task.future.set_result(loads(payload))
                if task.cache_key is not None and self.keep is not None:
                    self.keep(task.cache_key, payload)
            except Exception as exc:
                self._fail(task, SerializationError(
                    f"cannot unpickle the result of task {task_id} from worker {worker}: "
                    f"{describe_error(exc)}"))
                return
            self.completed += 1
            return
        exc = unpack_error(payload)
        exc.__cause__ = RemoteTraceback(f"on worker {worker}:\n{exc.__cause__.text}")
        self._fail(task, exc)

    async def progress(self, worker_id: str, task_id: int, value: Progress) -> None:
        """A running task's ``rpc.report_progress`` (late ones, for a task no longer
        held by that worker, are dropped)."""
        worker = self.workers.get(worker_id)
        task = worker.tasks.get(task_id) if worker is not None else None
        if task is not None:
            task.future.progress = checked_progress(value)
            task.future.progress_updated = time.monotonic()

    async def pool_info(self) -> Dict[str, Any]:
        """:meth:`info`, for ``python -m rpc status --pool`` (which is no worker)."""
        return self.info()

    async def leave(self, worker_id: str) -> None:
        """The worker takes no new task (it got SIGTERM): its waiting takes return None."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        worker.leaving = True
        log.info("worker %s is leaving: it takes no new task", worker)
        for taker, waiter in self.takers:
            if taker is worker and not waiter.done():
                waiter.set_result(None)

    async def give_back(self, worker_id: str, task_ids: List[int]) -> None:
        """A leaving worker could not finish these tasks: they run elsewhere."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        tasks = [worker.tasks.pop(i) for i in task_ids if i in worker.tasks]
        for task in reversed(tasks):
            task.attempts -= 1  # handed back, not lost: it does not use up a retry
            self.queue.appendleft(task)
        if tasks:
            log.warning("worker %s handed back %d unfinished task(s); they run elsewhere",
                        worker, len(tasks))
        self.dispatch()

    # -------------------------------------------------------------- losing a worker

    def lose(self, worker: _Worker) -> None:
        """The worker's connection ended: its tasks are retried, or fail WorkerLost."""
        worker.gone = True
        self.workers.pop(worker.id, None)
        lost = sorted((t for t in worker.tasks.values() if not t.future.done()),
                      key=lambda t: t.id)  # done: failed by the pool's shutdown
        worker.tasks.clear()
        if self.emptied is not None and not self.workers:
            self.emptied.set()
        if not lost:
            log.info("worker %s left; %d worker(s) now", worker, len(self.workers))
            return
        for task in reversed(lost):
            if task.attempts <= self.retries:
                log.warning("worker %s was lost while running task %d; running it again "
                            "(attempt %d of %d)", worker, task.id, task.attempts + 1,
                            self.retries + 1)
                self.queue.appendleft(task)
            else:
                log.warning("worker %s was lost while running task %d; not retried "
                            "(retries=%d)", worker, task.id, self.retries)
                self._fail(task, WorkerLost(
                    f"task {task.id} was lost with its worker {worker} "
                    f"after {task.attempts} attempt(s) (retries={self.retries})"))
        self.dispatch()

    def _fail(self, task: _Task, error: BaseException) -> None:
        self.failed += 1
        task.future.set_exception(error)


class Pool(cf.Executor):
    """Runs functions on workers that join through the shared directory ``tunnel_dir``.

    A drop-in ``concurrent.futures.Executor`` (``submit``, ordered ``map``,
    ``shutdown``, a context manager). Functions and arguments travel by value
    (cloudpickle). Workers run ``python -m rpc worker --pool DIR`` and may join and
    leave at any time. A task whose worker is lost runs again up to ``retries``
    times, then fails with :class:`WorkerLost`; a task's own exception is re-raised
    with its type and remote traceback, and never retried. With ``cache_dir``, a
    result is stored there (``cache.py``) and a call made again returns it without
    running (``cache="refresh"``: run again, and store the new result). ``ship``
    lists local modules whose functions travel by value too (they are registered
    with cloudpickle for the whole process), so workers need not import them.
    A pool the program never shuts down is shut down at exit, without waiting for
    its tasks (queued ones are cancelled, a WARNING counts them).
    """

    def __init__(self, tunnel_dir: Any = None, *, retries: int = 0, key_file: Any = None,
                 liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT, force: bool = False,
                 cache_dir: Any = None, cache: str = "use",
                 ship: Sequence[ModuleType] = (), coherence: Optional[str] = None) -> None:
        if retries < 0:
            raise ValueError(f"retries must be at least 0, got {retries}")
        self.tunnel_dir = Path(tunnel_dir if tunnel_dir is not None else DEFAULT_POOL_DIR).expanduser()
        for module in ship:  # process-wide: cloudpickle keeps one registry
            cloudpickle.register_pickle_by_value(module)
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
        self._cache = ResultCache(cache_dir) if cache_dir is not None else None
        self._cache_mode = cache
        #: Writes cache entries: never on the loop (a hung mount must not stall it).
        self._cache_writer = (ThreadPoolExecutor(1, thread_name_prefix="rpc-pool-cache")
                              if self._cache is not None else None)
        self._board = _Board(retries, str(self.tunnel_dir),
                             self._keep if self._cache is not None else None)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._shutdown = False
        self._release_timeout = liveness_timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rpc-pool-loop",
                                        daemon=True)
        self._thread.start()
        try:
            self._server: RPCServer = self._run(start_server(
                self._board.functions(), tunnel_dir=self.tunnel_dir, key_file=key_file,
                workers=1, force=force, liveness_timeout=liveness_timeout, coherence=coherence))
        except BaseException:
            self._stop_loop()
            raise
        self._pid = os.getpid()
        atexit.register(self._shutdown_at_exit)  # unregistered by shutdown()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> PoolFuture:
        """Queue ``fn(*args, **kwargs)`` for a worker; returns its future (whose
        ``progress`` shows what the task reports with ``rpc.report_progress``)."""
        try:
            payload = dumps((fn, args, kwargs))
        except Exception as exc:
            raise SerializationError(f"cannot pickle the task {getattr(fn, '__name__', fn)!r}: "
                                     f"{describe_error(exc)}") from exc
        cache_key = None
        if self._cache is not None:
            cache_key = self._cache.key(fn, args, kwargs)
            if self._cache_mode == "use":
                hit, value = self._cache.load(cache_key)
                if hit:
                    future = PoolFuture()
                    future.set_result(value)
                    return future
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a pool after shutdown")
            task = _Task(next(self._ids), payload, PoolFuture(), cache_key)
            self._loop.call_soon_threadsafe(self._board.add, task)
        return task.future

    async def asubmit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``await pool.asubmit(fn, ...)``: :meth:`submit` from asyncio code; the result."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def map(self, fn: Callable[..., Any], *iterables: Any, timeout: Optional[float] = None,
            chunksize: int = 1, progress: bool = False) -> Iterator[Any]:
        """``fn`` over the arguments, results in order (as ``Executor.map``; ``chunksize``
        is ignored). With ``progress``, one line on stderr (in Jupyter, one updating
        display) shows how the map goes."""
        futures = [self.submit(fn, *args) for args in zip(*iterables)]
        if progress:
            MapProgress(futures, self._board.census, self._board.running_futures,
                        self._loop).start()
        return _in_order(futures, timeout)

    def info(self) -> Dict[str, Any]:
        """The workers (host, pid, SLURM job, threads, running task ids and the
        progress those reported), the queue, and the counts of completed and failed
        tasks."""
        return self._run(self._on_loop(self._board.info))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks; with ``wait``, let the submitted ones finish first.

        Then the workers are told to leave (the pool waits for them at most
        ``liveness_timeout``) and the server closes. Tasks unfinished by then
        (``wait=False``) are cancelled if queued, else fail with RuntimeError.
        """
        self._stop(wait, cancel_futures, self._release_timeout)

    def _shutdown_at_exit(self) -> None:
        """The program ends and never shut the pool down: cancel the queued tasks,
        abandon the running ones, and let the workers leave (for a short while), so
        that the program exits at once and leaves no files."""
        if os.getpid() != self._pid:  # a forked child's copy has no loop thread
            return
        queued, running = self._run(self._on_loop(
            lambda: (len(self._board.queue), len(self._board.running_futures()))))
        log.log(logging.WARNING if queued or running else logging.INFO,
                "rpc.Pool at %s was not shut down; shutting it down at exit: %d queued "
                "task(s) cancelled, %d running abandoned (use `with rpc.Pool(...)` or "
                "pool.shutdown())", self.tunnel_dir, queued, running)
        self._stop(False, True, EXIT_RELEASE_TIMEOUT)

    def _stop(self, wait: bool, cancel_futures: bool, release_timeout: float) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
        atexit.unregister(self._shutdown_at_exit)
        if cancel_futures:
            self._run(self._on_loop(self._cancel_queued))
        if wait:
            pending = self._run(self._on_loop(self._pending))
            cf.wait(pending)
        self._run(self._close(release_timeout), LOOP_TIMEOUT + release_timeout)
        self._stop_loop()
        if self._cache_writer is not None:
            self._cache_writer.shutdown(wait=True)  # every result computed is stored

    def _keep(self, key: str, payload: bytes) -> None:
        """Loop thread: have the cache writer store a result."""
        assert self._cache is not None and self._cache_writer is not None
        future = self._cache_writer.submit(self._cache.store, key, payload)
        future.add_done_callback(_warn_if_failed)

    async def _on_loop(self, action: Callable[[], Any]) -> Any:
        return action()

    def _cancel_queued(self) -> None:
        for task in self._board.queue:
            task.future.cancel()
        self._board.queue.clear()

    def _pending(self) -> List[cf.Future]:
        return [t.future for t in self._board.queue] + self._board.running_futures()

    async def _close(self, release_timeout: float) -> None:
        await self._board.release_workers(release_timeout)
        self._board.fail_all(RuntimeError("the pool was shut down before this task ran"))
        self._server.close()
        await self._server.wait_closed()

    def _run(self, coro: Any, timeout: float = LOOP_TIMEOUT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(LOOP_TIMEOUT)
        self._loop.close()



def _in_order(futures: List[cf.Future], timeout: Optional[float]) -> Iterator[Any]:
    """The results of ``futures`` in order, within ``timeout`` seconds in all; the
    futures not yet waited for are cancelled if the caller stops early."""
    deadline = None if timeout is None else time.monotonic() + timeout
    waiting = futures[::-1]
    try:
        while waiting:
            left = None if deadline is None else deadline - time.monotonic()
            yield waiting.pop().result(left)
    finally:
        for future in waiting:
            future.cancel()


def _warn_if_failed(stored: cf.Future) -> None:
    """A result that cannot be stored is still returned; say why it was not kept."""
    error = stored.exception()
    if error is not None:
        log.warning("cannot store a result in the cache: %s", describe_error(error))
