"""Small programs that tests run on either node: `python -m tests.nfs_harness.probes CMD`.

Each takes byte-range locks the way the transport does (fcntl.lockf on a file it
keeps open) and reports on stdout, so that a test can synchronise on its output.
  hold PATH START LEN      lock, print "locked", keep it until killed or stdin closes
  lock PATH START LEN      print "trying", blocking lock, print "locked", exit
                           (which releases it)
  waiters PATH N           fork N processes that each block on the whole-file lock,
                           print "waiting"; each child exits once it got the lock;
                           print "done N" when all have
  count PATH N             print "ready", wait for a line on stdin, then N times:
                           lock, read the number, write it plus one, unlock
  session PATH             open PATH, then run one command per stdin line and answer
                           it in one line: `write TEXT` (at the file position), `lock`,
                           `unlock` (whole file), `fsync`, `close` answer "ok";
                           `read` opens PATH afresh and answers "=" and its content
"""
import fcntl
import os
import sys

WIDTH = 20  # the counter is a fixed-width decimal, so its size never changes


def _open(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _hold(path: str, start: str, length: str) -> None:
    fd = _open(path)
    fcntl.lockf(fd, fcntl.LOCK_EX, int(length), int(start))
    print("locked", flush=True)
    sys.stdin.read()


def _lock(path: str, start: str, length: str) -> None:
    fd = _open(path)
    print("trying", flush=True)
    fcntl.lockf(fd, fcntl.LOCK_EX, int(length), int(start))
    print("locked", flush=True)


def _waiters(path: str, count: str) -> None:
    children = []
    for _ in range(int(count)):
        pid = os.fork()
        if pid == 0:
            fd = _open(path)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            os._exit(0)
        children.append(pid)
    print("waiting", flush=True)
    done = sum(os.waitpid(pid, 0)[1] == 0 for pid in children)
    print(f"done {done}", flush=True)


def _count(path: str, times: str) -> None:
    fd = _open(path)
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(int(times)):
        fcntl.lockf(fd, fcntl.LOCK_EX)
        value = int(os.pread(fd, WIDTH, 0) or b"0")
        os.pwrite(fd, b"%0*d" % (WIDTH, value + 1), 0)
        fcntl.lockf(fd, fcntl.LOCK_UN)


def _session(path: str) -> None:
    fd = _open(path)
    actions = {
        "lock": lambda: fcntl.lockf(fd, fcntl.LOCK_EX),
        "unlock": lambda: fcntl.lockf(fd, fcntl.LOCK_UN),
        "fsync": lambda: os.fsync(fd),
        "close": lambda: os.close(fd),
    }
    for line in sys.stdin:
        command, _, argument = line.rstrip("\n").partition(" ")
        if command == "read":
            with open(path, "rb") as f:
                print("=" + f.read().decode(), flush=True)
            continue
        if command == "write":
            os.write(fd, argument.encode())
        else:
            actions[command]()
        print("ok", flush=True)


COMMANDS = {"hold": _hold, "lock": _lock, "waiters": _waiters, "count": _count,
            "session": _session}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
