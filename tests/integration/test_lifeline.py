"""``make test`` interrupted leaves nothing running (issue 23): a test run that started a real control plane (etcd,
kube-apiserver, SeaweedFS, each in its own session as ``langmerge up`` needs) is killed with SIGKILL (nothing of it
runs any more: the CI time limit's last word) or SIGTERM (its first); every server it started is gone within
seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from langmerge.dev import lifeline
from operator_harness import wait_for

ROOT = Path(__file__).resolve().parents[2]

INNER = """
import os
import time
from pathlib import Path

from langmerge.dev.controlplane import ControlPlane


def test_starts_a_control_plane_then_hangs():
    ControlPlane(Path(os.environ["PROBE_STATE"]), controller_manager=False).start()
    Path(os.environ["PROBE_READY"]).write_text("ready")
    time.sleep(600)
"""


def _servers_of(state: Path) -> list[int]:
    """Processes whose command line names the control plane's state folder (etcd, kube-apiserver, weed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(state).encode() in cmdline and lifeline._alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the lifeline reads /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_servers_end_with_the_test_run(tmp_path: Path, sig: signal.Signals) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    state, ready = tmp_path / "state", tmp_path / "ready"
    env = {k: v for k, v in os.environ.items() if k not in (lifeline.ENV, "LANGMERGE_TEST_STATE")}
    inner = ["-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_inner.py")]
    env.update(PROBE_STATE=str(state), PROBE_READY=str(ready), PYTHONPATH=str(ROOT / "tests"))
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "lifeline_plugin", *inner],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    servers: list[int] = []
    try:
        wait_for(lambda: ready.exists() or run.poll() is not None, timeout=180, what="the inner run's control plane")
        assert ready.exists(), f"the inner run ended early (exit {run.returncode})"
        servers = _servers_of(state)
        assert len(servers) >= 3, servers  # etcd, kube-apiserver, SeaweedFS
        run.send_signal(sig)
        run.wait(60)
        killed = time.monotonic()
        wait_for(lambda: not _servers_of(state), timeout=30, what="every server of the run gone")
        print(f"\n{len(servers)} servers gone {time.monotonic() - killed:.1f}s after {sig.name}")
    finally:
        if run.poll() is None:
            run.kill()
        for pid in _servers_of(state):
            os.kill(pid, signal.SIGKILL)
