"""Process supervision helpers: process groups, exits without reaping, exit descriptions."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import IO

_HAVE_WAITID = hasattr(os, "waitid") and hasattr(os, "WNOWAIT")


def _spawn(argv: list[str], *, cwd: Path, env: dict[str, str], out: IO[bytes]) -> subprocess.Popen[bytes]:
    """A child in its own session and process group (killed as a whole), stdin closed, stdout and stderr to
    ``out``."""
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the process has exited, without reaping it (so its process group id stays valid for a final kill)."""
    if _HAVE_WAITID:
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


def _with_last_words(message: str, last_words: str) -> str:
    """A Failed condition's message with the last attempt's termination message on one line."""
    if not last_words:
        return message
    return f"{message}; termination message: {' | '.join(line.strip() for line in last_words.splitlines() if line.strip())}"


def _exit_description(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"
