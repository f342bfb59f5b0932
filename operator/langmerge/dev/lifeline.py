"""A lifeline for the local servers a run starts: when the run ends, however it ends (its own teardown, SIGINT,
SIGTERM, SIGKILL, a CI time limit), every process it started ends too.

Local servers are started in their own session on purpose (``langmerge up`` must outlive the command that started
it), so neither a process group signal nor the death of their parent reaches them. The run instead marks its
environment with ``LANGMERGE_LIFELINE=<token>``, which every process it starts inherits, however deep (control
planes, the local Job runner and its Jobs, operators, a ``langmerge up`` a test runs), and starts this module with a
pipe on its stdin that only the run holds open. The run's end closes the pipe, whatever killed it; the lifeline then
terminates every process whose environment carries the token (SIGTERM, then SIGKILL after a grace period) and exits.

Linux only (``/proc/<pid>/environ``); elsewhere :func:`attach` does nothing.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

#: The environment variable that marks a run's processes.
ENV = "LANGMERGE_LIFELINE"
#: Seconds between SIGTERM and SIGKILL.
GRACE_SECONDS = 10.0
PROC = Path("/proc")


def marked(token: str) -> list[int]:
    """The processes (other than this one) whose environment at start carried ``LANGMERGE_LIFELINE=<token>``."""
    needle = f"{ENV}={token}".encode()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def end_all(token: str, grace: float = GRACE_SECONDS) -> int:
    """Terminate every marked process: SIGTERM, then SIGKILL what is left after ``grace`` seconds. Rounds repeat
    while new marked processes appear (one started during the others' shutdown). Returns how many were signalled."""
    signalled: set[int] = set()
    for _ in range(5):
        pids = [p for p in marked(token) if _alive(p)]
        if not pids:
            break
        signalled.update(pids)
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        _signal([p for p in pids if _alive(p)], signal.SIGKILL)
    return len(signalled)


def attach() -> subprocess.Popen[bytes] | None:
    """Mark this process's environment (inherited by everything it starts from now on) and start its lifeline.
    Keep the returned process referenced for the life of the run; :func:`release` ends it in an orderly way."""
    if not PROC.is_dir() or os.environ.get(ENV):
        return None
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != ENV}
    lifeline = subprocess.Popen(
        [sys.executable, "-m", "langmerge.dev.lifeline", token, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # a Ctrl-C to the run's process group must not end the lifeline first
    )
    os.environ[ENV] = token
    return lifeline


def release(lifeline: subprocess.Popen[bytes] | None, timeout: float = 60.0) -> None:
    """The run ends normally: close the pipe and wait for the lifeline to end what is left."""
    if lifeline is None:
        return
    os.environ.pop(ENV, None)
    if lifeline.stdin is not None:
        lifeline.stdin.close()
    try:
        lifeline.wait(timeout)
    except subprocess.TimeoutExpired:
        lifeline.kill()


def wait_for_the_end(run_pid: int, poll: float = 1.0) -> None:
    """Until the pipe on stdin reports end of file (every writer closed it: the run ended) or the run's process is
    gone (a process forked by the run may hold a copy of the pipe)."""
    fd = sys.stdin.fileno()
    while _alive(run_pid):
        ready, _, _ = select.select([fd], [], [], poll)
        if ready and not os.read(fd, 65536):
            return


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m langmerge.dev.lifeline TOKEN RUN_PID  (stdin: a pipe the run holds)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wait_for_the_end(int(argv[1]))
    end_all(argv[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
