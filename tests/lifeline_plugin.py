"""Every server a test run starts ends with the run, however it ends (see :mod:`langmerge.dev.lifeline`).

Loaded by ``conftest.py``; a run that reuses a control plane between runs (``LANGMERGE_TEST_STATE``) has no
lifeline, since that control plane is meant to outlive it. SIGTERM (e.g. a CI time limit's first signal) ends the run
as Ctrl-C does, through the fixtures' teardown."""

from __future__ import annotations

import os
import signal
import subprocess
from types import FrameType

import pytest

from langmerge.dev import lifeline

_lifeline: subprocess.Popen[bytes] | None = None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    global _lifeline
    if os.environ.get("LANGMERGE_TEST_STATE"):
        return
    _lifeline = lifeline.attach()
    signal.signal(signal.SIGTERM, _interrupt)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _lifeline
    lifeline.release(_lifeline)
    _lifeline = None
