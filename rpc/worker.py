"""A pool's worker (``python -m rpc worker``): pulls tasks from a ``rpc.Pool`` and runs them.

The worker is an RPC client of the pool's server (``pool.py``). It keeps one call,
``attach``, open for its whole life, so that the pool sees it leave with its
connection. Each of its ``threads`` long-polls ``take`` for one task at a time, so
the worker never holds more tasks than it has threads. On SIGTERM (what SLURM sends
at the time limit or on ``scancel``) or Ctrl-C it takes no new task, gives its
running ones ``grace`` seconds, hands back those still running, and exits 0.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional, Set, Tuple

from .blocking import Client, connect
from .errors import FunctionNotFoundError, RPCError
from .frames import loads, pack_error, pack_value
from .pool import DEFAULT_POOL_DIR, PoolClosed
from .taskprogress import Progress, ProgressReporter, reporting
from .transports import DEFAULT_LIVENESS_TIMEOUT

log = logging.getLogger(__name__)

#: Seconds one ``take`` waits for a task before it asks again. Every end of a wait
#: that matters is pushed by the pool (a task, ``leave``, the pool closing) or by
#: the connection (lost): asking again is only a safety net, and each ask makes both
#: ends poll the connection for a while, so it is rare.
TAKE_POLL = 300.0
#: Seconds a worker waits for its pool to answer when it starts.
DEFAULT_JOIN_TIMEOUT = 60.0
#: Longest pause (seconds) between a quiet worker's looks at the tunnel: a pool of
#: many idle workers costs the file server a few requests per second per worker,
#: and a task sent after a quiet spell is noticed within this (busy: at once).
DEFAULT_WORKER_POLL_MAX = 0.5
#: Seconds to wait, after the grace period, for outcomes already being reported.
REPORT_TIMEOUT = 10.0


def describe_worker(threads: int) -> Dict[str, Any]:
    """What the pool learns of a worker: where it runs, and in which SLURM job."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "job": os.environ.get("SLURM_JOB_ID"),
            "array_job": os.environ.get("SLURM_ARRAY_JOB_ID"),
            "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"), "threads": threads}


def execute(payload: bytes) -> Tuple[bool, bytes]:
    """Run one pickled ``(fn, args, kwargs)``: ``(True, pickled result)``, or
    ``(False, packed exception)``, the task's own error included."""
    try:
        fn, args, kwargs = loads(payload)
        return pack_value(fn(*args, **kwargs), "the task's result")
    except BaseException as exc:  # the task's answer, whatever it raised
        return False, pack_error(exc)


class Worker:
    """Runs a pool's tasks in ``threads`` threads over one connection."""

    def __init__(self, client: Client, threads: int) -> None:
        self.client = client
        self.threads = threads
        self.id = uuid.uuid4().hex
        #: Set on SIGTERM: no new task is taken.
        self.stopping = threading.Event()
        #: Set on SIGTERM, or when the pool is gone: the main thread acts.
        self.wake = threading.Event()
        #: Guards ``running``, ``handed_back`` and ``reporting``; notified when a report ends.
        self._books = threading.Condition()
        self.running: Set[int] = set()
        self.handed_back: Set[int] = set()
        self.reporting = 0
        self.pool_error: BaseException = RPCError("the pool is gone")
        #: The pool said it closes (rather than vanished).
        self.pool_closed = False

    def run_thread(self) -> None:
        """One runner: take a task, run it, report it (which takes the next one), until
        stopping or the pool is gone."""
        got: Optional[Tuple[int, bytes]] = None
        try:
            while got is not None or not self.stopping.is_set():
                if got is None:
                    got = self.client.call("take", self.id, TAKE_POLL)
                else:
                    got = self._run_task(*got)
        except PoolClosed:
            self.pool_closed = True
            self.wake.set()
        except RPCError as exc:  # the connection to the pool is lost
            self.pool_error = exc
            self.wake.set()

    def _run_task(self, task_id: int, payload: bytes) -> Optional[Tuple[int, bytes]]:
        """Run a task and report it; the next task, if the report brought one."""
        with self._books:
            self.running.add(task_id)
        with reporting(ProgressReporter(lambda value: self.send_progress(task_id, value))):
            ok, outcome = execute(payload)
        with self._books:
            self.running.discard(task_id)
            if task_id in self.handed_back:
                return None  # the pool gave it to another worker
            self.reporting += 1
        try:
            return self.client.call("done", self.id, task_id, ok, outcome,
                                    None if self.stopping.is_set() else TAKE_POLL)
        finally:
            with self._books:
                self.reporting -= 1
                self._books.notify_all()

    def send_progress(self, task_id: int, value: Progress) -> None:
        """A running task's ``rpc.report_progress``, to the pool; not waited for."""
        try:
            self.client.submit("progress", self.id, task_id, value).add_done_callback(
                _debug_if_failed)
        except RPCError as exc:  # the pool is gone: the runner finds out when it reports
            log.debug("cannot send the progress of task %d: %s", task_id, exc)

    def detached(self, attached: Any) -> None:
        """The ``attach`` call ended: the pool closed or was lost (or we closed)."""
        if not attached.cancelled() and attached.exception() is not None:
            self.pool_error = attached.exception()
        self.wake.set()

    def say_pool_gone(self, where: Any) -> None:
        """Log the pool's end: a warning if it took running tasks with it."""
        with self._books:
            running = len(self.running)
        if running:
            log.warning("the pool at %s is gone (%s); abandoning %d running task(s)",
                        where, self.pool_error, running)
        elif self.pool_closed:
            log.info("the pool at %s closed; exiting", where)
        else:
            log.warning("the pool at %s is gone (%s); exiting", where, self.pool_error)

    def hand_back(self) -> None:
        """After the grace period: return the unfinished tasks to the pool, and wait
        for the outcomes being reported."""
        with self._books:
            unfinished = sorted(self.running)
            self.handed_back.update(unfinished)
        if unfinished:
            log.warning("%d task(s) still running after the grace period; handing them back "
                        "to the pool", len(unfinished))
            self.client.call("give_back", self.id, unfinished)
        with self._books:
            self._books.wait_for(lambda: self.reporting == 0, REPORT_TIMEOUT)


def run_worker(pool_dir: Any = None, *, threads: int = 1, grace: float = 30.0,
               key_file: Any = None, connect_timeout: float = DEFAULT_JOIN_TIMEOUT,
               liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT,
               poll_max: float = DEFAULT_WORKER_POLL_MAX, coherence: Optional[str] = None) -> int:
    """Join the pool at ``pool_dir`` and run its tasks until SIGTERM or the pool ends.

    Must run in the main thread (it handles SIGTERM and SIGINT). Returns the exit
    status: 0 after a graceful leave or when the pool closed (or vanished), 2 if
    the server there is not a pool.
    """
    where = pool_dir if pool_dir is not None else DEFAULT_POOL_DIR
    client = connect(tunnel_dir=where, key_file=key_file, connect_timeout=connect_timeout,
                     liveness_timeout=liveness_timeout, poll_max=poll_max, coherence=coherence)
    worker = Worker(client, threads)
    signal.signal(signal.SIGTERM, lambda *_: worker.stopping.set() or worker.wake.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stopping.set() or worker.wake.set())
    attached = client.submit("attach", worker.id, describe_worker(threads))
    attached.add_done_callback(worker.detached)
    runners = [threading.Thread(target=worker.run_thread, name=f"rpc-pool-worker-{n}",
                                daemon=True) for n in range(threads)]
    for runner in runners:
        runner.start()
    log.info("worker joined the pool at %s with %d thread(s)", where, threads)
    worker.wake.wait()
    try:
        if isinstance(worker.pool_error, FunctionNotFoundError):
            log.error("the RPC server at %s is not an rpc.Pool: %s", where, worker.pool_error)
            return 2
        if worker.stopping.is_set():
            _leave(worker, runners, grace)
        else:
            if worker.pool_closed:  # the other runners are told too: let them see it
                _join(runners, REPORT_TIMEOUT)
            worker.say_pool_gone(where)
    finally:
        attached.cancel()  # the pool sees the worker leave; no call is left in flight
        client.close()
    return 0


def _leave(worker: Worker, runners: list, grace: float) -> None:
    log.info("stopping: no new task; giving the running ones %g s", grace)
    try:
        worker.client.call("leave", worker.id)
        _join(runners, grace)
        worker.hand_back()
    except RPCError as exc:
        log.warning("the pool was lost while this worker was leaving: %s", exc)
        return
    log.info("left the pool")



def _debug_if_failed(sent: Any) -> None:
    """Progress is a hint: a lost update matters only as a sign, seen elsewhere, that
    the pool is gone."""
    if not sent.cancelled() and sent.exception() is not None:
        log.debug("a progress update was not delivered: %s", sent.exception())


def _join(threads: list, timeout: float) -> None:
    """Wait at most ``timeout`` seconds in all for ``threads`` to end."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
