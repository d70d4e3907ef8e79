"""A private single-node SLURM cluster for tests: munged, slurmctld and slurmd.

Everything (config, munge key and socket, state, spool, logs) lives in one fresh
directory; the daemons run in the foreground as children of the test process,
listen on free localhost ports, and are found by clients through ``SLURM_CONF``.
Several such clusters can run side by side on one machine.

Requires root (slurmd starts job steps as the submitting user) and the Debian
packages ``munge slurm-wlm slurmctld slurmd slurm-client`` (.ci/install-slurm.sh).

``SlurmCluster.stop`` cancels every job, waits until no process of any job of this
cluster is left (job processes are recognised by ``SLURM_CONF`` in their
environment), then stops the daemons.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from tests.polling import WaitTimeout, wait_until
from tests.tunnel_support import free_port

log = logging.getLogger(__name__)

REQUIRED_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue",
                     "sinfo")

#: CPUs the node declares (jobs take one each): more than a CI machine has, so that
#: a job waiting for its time limit does not hold up the jobs of other tests.
NODE_CPUS = 8

# States after which a job will not run again (see squeue(1), JOB STATE CODES).
FINISHED_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
})


class ClusterError(RuntimeError):
    """The private cluster could not be started, or did not behave."""


def missing_requirements() -> Optional[str]:
    """Why a private cluster cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "the private SLURM cluster needs root (slurmd runs jobs as their user)"
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c, path=search) is None]
    if missing:
        return "SLURM/munge not installed (missing %s)" % ", ".join(missing)
    return None


def _sbin(cmd: str) -> str:
    found = shutil.which(cmd, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if found is None:
        raise ClusterError("%s not found" % cmd)
    return found


def process_environ(pid: int) -> Dict[str, str]:
    """The environment of process ``pid`` (empty if it is gone)."""
    try:
        raw = Path("/proc/%d/environ" % pid).read_bytes()
    except OSError:  # gone, or a kernel thread
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _proc_cmdline(pid: int) -> str:
    try:
        raw = Path("/proc/%d/cmdline" % pid).read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


@dataclass(frozen=True)
class Process:
    """A live process seen in /proc."""

    pid: int
    cmdline: str
    job_id: Optional[str]


@dataclass(frozen=True)
class Job:
    """A job's final record: id, state, exit code and its output file's text."""

    job_id: str
    state: str
    exit_code: str
    output: str


class SlurmCluster:
    """A private single-node SLURM cluster rooted in a fresh temporary directory.

    Use ``start()`` / ``stop()`` (or the instance as a context manager). ``env`` is
    the environment clients (and so jobs) should get: it carries ``SLURM_CONF``.
    """

    def __init__(self, base_dir: Optional[Path] = None, node_name: Optional[str] = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ffslurm-", dir=base_dir))
        self.node_name = node_name or socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._daemons: List[subprocess.Popen] = []
        self.env: Dict[str, str] = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """Start munged, slurmctld and slurmd; return once the node is idle."""
        try:
            self._start_munge(timeout)
            self._write_config()
            self._start_controller(timeout)
            self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf),
                                   "-N", self.node_name])
            wait_until(self._node_idle, timeout, what="node %s to be idle" % self.node_name)
        except BaseException:
            self.stop()
            raise
        log.info("SLURM cluster up in %s (node %s)", self.root, self.node_name)

    def stop(self, timeout: float = 15.0) -> None:
        """Cancel all jobs, wait for their processes to go, stop the daemons, remove the directory.

        Never leaves a process behind: job processes still alive after ``timeout``
        (e.g. ones that escaped into their own session) are killed.
        """
        try:
            if self._daemons and self._daemons_alive():
                self._drain_jobs(timeout)
        finally:
            for straggler in self.job_processes():
                log.warning("killing leftover job process %d: %s", straggler.pid, straggler.cmdline)
                kill_quietly(straggler.pid)
            for proc in reversed(self._daemons):
                _terminate(proc, timeout=10.0)
            self._daemons.clear()
            for pid in self._stepds():
                kill_quietly(pid)
            shutil.rmtree(self.root, ignore_errors=True)

    def time_limit_checks_after_start(self, job_id: str, timeout: float = 60.0) -> None:
        """Once every task of job ``job_id`` runs, restart slurmctld (on its saved
        state: running jobs go on), so that the job ends by its time limit about a
        second after reaching it, not up to 30 s later.

        slurmctld checks time limits every 30 s counted from its own start (a
        constant of its source, not a setting); restarted within seconds of the
        job's start, one of its checks falls just after the job's limit.
        """
        # (tasks of an array that wait are listed too, PENDING)
        wait_until(lambda: {r["JobState"] for r in self.job_records(job_id)} == {"RUNNING"},
                   timeout, what="job %s to run" % job_id, interval=0.2)
        self._restart_controller()

    def _restart_controller(self, timeout: float = 30.0) -> None:
        """Stop slurmctld and start it again on its saved state."""
        [ctld] = [p for p in self._daemons if p.args[0] == _sbin("slurmctld")]
        index = self._daemons.index(ctld)
        _terminate(ctld, timeout=10.0)  # SIGTERM: it saves its state first
        self._daemons.remove(ctld)
        self._start_controller(timeout)
        self._daemons.insert(index, self._daemons.pop())  # stop() stops it after slurmd

    # -- clients -------------------------------------------------------------

    def run(self, args: Sequence[str], env: Optional[Mapping[str, str]] = None,
            cwd: Optional[Path] = None, timeout: float = 30.0, check: bool = True
            ) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, scontrol...) against this cluster."""
        full_env = dict(self.env if env is None else env, SLURM_CONF=str(self.conf))
        result = subprocess.run(list(args), env=full_env, cwd=cwd, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError("%s failed (%d): %s" % (" ".join(args), result.returncode,
                                                      result.stderr.strip()))
        return result

    def sbatch(self, script: Path, *args: str, options: Sequence[str] = (),
               env: Optional[Mapping[str, str]] = None, cwd: Optional[Path] = None) -> str:
        """``sbatch [options] script [args]``; return the job id."""
        out = self.run(["sbatch", "--parsable", *options, str(script), *args], env=env, cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def job_records(self, job_id: str) -> List[Dict[str, str]]:
        """``scontrol show job``: one dict per task (a plain job has one)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        records = []
        for line in out.splitlines():
            fields: Dict[str, str] = {}
            for token in line.split():
                key, _, value = token.partition("=")
                fields.setdefault(key, value)
            records.append(fields)
        return records

    def job_info(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (for an array job: its first task)."""
        return self.job_records(job_id)[0]

    def array_states(self, job_id: str) -> Dict[str, str]:
        """State of each task of array job ``job_id``, keyed by task id."""
        return {r.get("ArrayTaskId", ""): r["JobState"] for r in self.job_records(job_id)}

    def state(self, job_id: str) -> str:
        """The job's current state (PENDING, RUNNING, COMPLETED...)."""
        return self.job_info(job_id)["JobState"]

    def wait_finished(self, job_id: str, timeout: float) -> Job:
        """Poll until the job (every task of an array) has finished; return its record."""
        def check() -> Optional[Dict[str, str]]:
            records = self.job_records(job_id)
            if all(r["JobState"] in FINISHED_STATES for r in records):
                return records[0]
            return None

        try:
            info = wait_until(check, timeout, what="job %s to finish" % job_id, interval=0.2)
        except WaitTimeout as exc:
            raise WaitTimeout("%s\n%s\n%s" % (exc, self.describe(job_id), self.log_tail())) from None
        return Job(job_id, info["JobState"], info.get("ExitCode", ""),
                   _read(info.get("StdOut", "")))

    def describe(self, job_id: str) -> str:
        """Job record and output, for assertion messages."""
        info = self.job_info(job_id)
        return "%s\n--- output (%s) ---\n%s" % (
            " ".join("%s=%s" % kv for kv in info.items()), info.get("StdOut"),
            _read(info.get("StdOut", "")))

    def job_processes(self, job_id: Optional[str] = None) -> List[Process]:
        """Live processes of this cluster's jobs (of job ``job_id`` if given).

        Jobs inherit the submitter's environment, so they carry this cluster's
        ``SLURM_CONF``, even processes that left the job's process group. The
        daemons started here have no ``SLURM_JOB_ID`` and are never listed.
        """
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            env = process_environ(int(entry))
            if env.get("SLURM_CONF") != str(self.conf) or "SLURM_JOB_ID" not in env:
                continue
            if job_id is not None and job_id not in (env.get("SLURM_JOB_ID"),
                                                     env.get("SLURM_ARRAY_JOB_ID")):
                continue
            cmdline = _proc_cmdline(int(entry))
            if cmdline:  # not a zombie
                found.append(Process(int(entry), cmdline, env.get("SLURM_JOB_ID")))
        return found

    def wait_no_job_processes(self, job_id: Optional[str] = None, timeout: float = 10.0) -> None:
        """Poll until no process of the job (of any job) is left; fail listing them."""
        try:
            wait_until(lambda: not self.job_processes(job_id), timeout,
                       what="job processes to exit")
        except WaitTimeout:
            left = "\n".join("  %d %s" % (p.pid, p.cmdline) for p in self.job_processes(job_id))
            raise AssertionError("processes of job %s left behind:\n%s" % (job_id or "*", left))

    def log_tail(self, lines: int = 40) -> str:
        """The end of each daemon log, for diagnosing a failed start."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            text = _read(str(path)).splitlines()[-lines:]
            parts.append("--- %s ---\n%s" % (path.name, "\n".join(text)))
        return "\n".join(parts)

    # -- internals -----------------------------------------------------------

    def _start_munge(self, timeout: float) -> None:
        # munged insists on safe permissions: socket dir (and its parents)
        # world-searchable, key/log/seed dirs private, key 0600.
        os.chmod(self.root, 0o755)
        for name, mode in (("munge", 0o755), ("munge-key", 0o700), ("log", 0o700),
                           ("munge-seed", 0o700), ("state", 0o700), ("spool", 0o755)):
            (self.root / name).mkdir(mode=mode)
            os.chmod(self.root / name, mode)
        key = self.root / "munge-key" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        self._spawn("munged", [
            _sbin("munged"), "--foreground", "--force",
            "--socket=%s" % self.munge_socket, "--key-file=%s" % key,
            "--log-file=%s" % (self.root / "log" / "munged.log"),
            "--pid-file=%s" % (self.root / "munge" / "munged.pid"),
            "--seed-file=%s" % (self.root / "munge-seed" / "munged.seed"),
        ])
        wait_until(self.munge_socket.exists, timeout, what="munged socket")

    def _write_config(self) -> None:
        node_line = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True,
                                   check=True).stdout.splitlines()[0]
        # "NodeName=vm CPUs=2 ... RealMemory=N": keep its memory; declare NODE_CPUS
        # cores (honoured with config_overrides).
        memory = [tok for tok in node_line.split() if tok.startswith("RealMemory=")]
        hardware = " ".join(["CPUs=%d" % NODE_CPUS, "Boards=1", "SocketsPerBoard=1",
                             "CoresPerSocket=%d" % NODE_CPUS, "ThreadsPerCore=1", *memory])
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=fftest",
            "SlurmctldHost=%s(127.0.0.1)" % self.node_name,
            "SlurmctldPort=%d" % free_port(),
            "SlurmdPort=%d" % free_port(),
            "SlurmUser=root",
            "AuthType=auth/munge",
            "AuthInfo=socket=%s" % self.munge_socket,
            "StateSaveLocation=%s" % (r / "state"),
            "SlurmdSpoolDir=%s" % (r / "spool"),
            "SlurmctldPidFile=%s" % (r / "slurmctld.pid"),
            "SlurmdPidFile=%s" % (r / "slurmd.pid"),
            "SlurmctldLogFile=%s" % (r / "log" / "slurmctld.log"),
            "SlurmdLogFile=%s" % (r / "log" / "slurmd.log"),
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # NODE_CPUS, whatever the machine has
            # scancel / time limit: SIGTERM, then SIGKILL this many seconds later.
            "KillWait=10",
            "NodeName=%s NodeAddr=127.0.0.1 %s State=UNKNOWN" % (self.node_name, hardware),
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _start_controller(self, timeout: float) -> None:
        """slurmctld (on the state it saved, if any), once it answers."""
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-f", str(self.conf)])
        wait_until(lambda: self._scontrol_ok("ping"), timeout, what="slurmctld to answer")

    def _spawn(self, name: str, argv: List[str]) -> None:
        out = open(self.root / "log" / ("%s.out" % name), "ab")  # a restart appends
        with out:
            proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        self._daemons.append(proc)
        log.debug("started %s (pid %d)", name, proc.pid)

    def _daemons_alive(self) -> bool:
        return all(p.poll() is None for p in self._daemons)

    def _scontrol_ok(self, *args: str) -> bool:
        dead = [p.args[0] for p in self._daemons if p.poll() is not None]
        if dead:
            raise ClusterError("%s exited early:\n%s" % (", ".join(dead), self.log_tail()))
        return self.run(["scontrol", *args], check=False, timeout=10).returncode == 0

    def _node_idle(self) -> bool:
        if not self._scontrol_ok("ping"):
            return False
        out = self.run(["sinfo", "-h", "-n", self.node_name, "-o", "%T"], check=False).stdout
        return out.strip() == "idle"

    def _drain_jobs(self, timeout: float) -> None:
        self.run(["scancel", "--quiet", "--user", str(os.getuid())], check=False)
        try:
            wait_until(lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(),
                       timeout, what="all jobs to leave the queue")
            # slurmstepd and the job's own processes outlive the queue entry briefly.
            wait_until(lambda: not self.job_processes() and not self._stepds(),
                       timeout, what="job processes and slurmstepd to exit")
        except WaitTimeout as exc:
            log.warning("stopping the cluster: %s", exc)

    def _stepds(self) -> List[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _proc_cmdline(int(entry)).startswith("slurmstepd") and \
                    process_environ(int(entry)).get("SLURM_CONF") == str(self.conf):
                pids.append(int(entry))
        return pids


def _die_with_parent() -> None:
    """In a daemon's child process before exec: get SIGTERM if the test process dies,
    so that even a killed test run leaves no daemon behind (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def kill_quietly(pid: int) -> None:
    """SIGKILL ``pid``, which may have exited meanwhile."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _terminate(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def session_processes(sid: int) -> List[int]:
    """Live (non-zombie) processes of session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc/%s/stat" % entry).read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may contain spaces
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids
