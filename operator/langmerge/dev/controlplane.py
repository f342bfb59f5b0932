"""A real local control plane for development and tests: etcd, kube-apiserver, kube-controller-manager, SeaweedFS (S3).

Development only. Everything binds to 127.0.0.1. State (certificates, etcd data, S3 data, logs, PIDs, kubeconfig,
credentials) lives in one folder, so ``stop`` then ``start`` on the same folder brings the same cluster and the same
objects back.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from langmerge.dev import binaries

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "seaweedfs")


class ControlPlaneError(RuntimeError):
    pass


@dataclass
class Endpoints:
    """What a client needs to reach the local control plane."""

    kubeconfig: str
    apiserver_url: str
    token: str
    ca_file: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Environment variables for clients (kubectl, boto3, the operator)."""
        return {
            "KUBECONFIG": self.kubeconfig,
            "LANGMERGE_S3_ENDPOINT": self.s3_endpoint,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_REGION": self.s3_region,
            "AWS_DEFAULT_REGION": self.s3_region,
        }


@dataclass
class _State:
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    token: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""


def _free_port(avoid: set[int], *, with_grpc: bool = False) -> int:
    """A free loopback port (and, for SeaweedFS, a free port+10000 for its gRPC twin)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port in avoid or port > 55000:
            continue
        if with_grpc and (port + 10000 in avoid or not _port_free(port + 10000)):
            continue
        return port
    raise ControlPlaneError("no free loopback port found")


def _port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now. Sockets a stopped server left behind (TIME_WAIT, FIN_WAIT) do
    not count: servers bind with SO_REUSEADDR, and so does this check; only another listener makes it False."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not alive.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


class ControlPlane:
    """Start and stop the local control plane in ``state_dir``."""

    def __init__(self, state_dir: Path, *, controller_manager: bool = True, s3: bool = True) -> None:
        self.dir = state_dir.resolve()
        self.controller_manager = controller_manager
        self.s3 = s3
        self.state_file = self.dir / "state.json"
        self.logs = self.dir / "logs"

    # -- state ---------------------------------------------------------------------------------------------------
    def _load(self) -> _State:
        if self.state_file.exists():
            return _State(**json.loads(self.state_file.read_text()))
        return _State()

    def _save(self, state: _State) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=2))
        tmp.replace(self.state_file)

    def endpoints(self) -> Endpoints:
        state = self._load()
        if not state.ports:
            raise ControlPlaneError(f"no control plane state in {self.dir}; start it first")
        return Endpoints(
            kubeconfig=str(self.dir / "kubeconfig"),
            apiserver_url=f"https://127.0.0.1:{state.ports['apiserver']}",
            token=state.token,
            ca_file=str(self.dir / "pki" / "ca.crt"),
            s3_endpoint=f"http://127.0.0.1:{state.ports.get('s3', 0)}",
            s3_access_key=state.s3_access_key,
            s3_secret_key=state.s3_secret_key,
        )

    def status(self) -> dict[str, bool]:
        state = self._load()
        return {name: name in state.pids and _pid_alive(state.pids[name]) for name in self._components()}

    def _components(self) -> list[str]:
        names = ["etcd", "kube-apiserver"]
        if self.controller_manager:
            names.append("kube-controller-manager")
        if self.s3:
            names.append("seaweedfs")
        return names

    # -- start ---------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> Endpoints:
        """Start whatever is not running; idempotent. Returns the endpoints."""
        apiserver_bin, kcm_bin = binaries.ensure_kube_binaries()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        state = self._load()
        if not state.token:
            state.token = secrets.token_hex(24)
            state.s3_access_key = "lm" + secrets.token_hex(8)
            state.s3_secret_key = secrets.token_hex(20)
        running = self.status()
        self._allocate_ports(state, running)
        self._save(state)
        self._pki(state)
        self._write_kubeconfig(state)
        deadline = time.monotonic() + timeout

        if not running.get("etcd"):
            state.pids["etcd"] = self._spawn("etcd", self._etcd_cmd(state), env=None)
            self._save(state)
            self._wait(lambda: self._http_ok(f"http://127.0.0.1:{state.ports['etcd']}/health"), "etcd", deadline)
        if not running.get("kube-apiserver"):
            state.pids["kube-apiserver"] = self._spawn(
                "kube-apiserver", self._apiserver_cmd(apiserver_bin, state), None
            )
            self._save(state)
            self._wait(lambda: self._apiserver_ready(state), "kube-apiserver", deadline)
        if self.controller_manager and not running.get("kube-controller-manager"):
            state.pids["kube-controller-manager"] = self._spawn("kube-controller-manager", self._kcm_cmd(kcm_bin), None)
            self._save(state)
        if self.s3 and not running.get("seaweedfs"):
            env = {
                **os.environ,
                "AWS_ACCESS_KEY_ID": state.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": state.s3_secret_key,
                "GOMEMLIMIT": os.environ.get("GOMEMLIMIT", "512MiB"),
            }
            state.pids["seaweedfs"] = self._spawn("seaweedfs", self._weed_cmd(state), env)
            self._save(state)
            self._wait(lambda: self._s3_ready(state), "seaweedfs", deadline)
        self._write_env_file()
        return self.endpoints()

    #: Which component listens on each port.
    _PORT_OWNERS: ClassVar[dict[str, str]] = {"etcd": "etcd", "etcd_peer": "etcd", "apiserver": "kube-apiserver"}

    def _allocate_ports(self, state: _State, running: dict[str, bool], wait: float = 10.0) -> None:
        """Ports are chosen once and kept in the state folder: a restarted component (after ``stop``, a crash or
        :meth:`stop_component`) comes back on the same ports, so running clients (the operator, Jobs) keep working.
        A recorded port held by another process is an error, never a silent move."""
        wanted = ["etcd", "etcd_peer", "apiserver"]
        if self.s3:
            wanted += ["s3", "s3_master", "s3_volume", "s3_filer", "s3_admin"]
        used = {p for name in wanted if (p := state.ports.get(name))} | {
            p + 10000 for name in wanted if name.startswith("s3") and (p := state.ports.get(name))
        }
        for name in wanted:
            grpc = name.startswith("s3")
            port = state.ports.get(name)
            if port:
                owner = self._PORT_OWNERS.get(name, "seaweedfs")
                if running.get(owner):
                    continue
                deadline = time.monotonic() + wait
                while not (_port_free(port) and (not grpc or _port_free(port + 10000))):
                    if time.monotonic() > deadline:
                        raise ControlPlaneError(
                            f"port {port} of {owner} ({name}, recorded in {self.state_file}) is held by another "
                            "process; stop that process, or `langmerge down` and remove the state folder"
                        )
                    time.sleep(0.2)
                continue
            port = _free_port(used, with_grpc=grpc)
            state.ports[name] = port
            used.update({port, port + 10000})

    def _pki(self, state: _State) -> None:
        pki = self.dir / "pki"
        if (pki / "server.crt").exists():
            return
        pki.mkdir(parents=True, exist_ok=True)

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

        run(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "3650",
            "-subj",
            "/CN=langmerge-local-ca",
        )
        (pki / "san.cnf").write_text(
            "[req]\ndistinguished_name=dn\n[dn]\n[ext]\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        )
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=kube-apiserver",
        )
        run(
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "3650",
            "-extfile",
            "san.cnf",
            "-extensions",
            "ext",
        )
        run("genrsa", "-out", "sa.key", "2048")
        run("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        (pki / "tokens.csv").write_text(f"{state.token},admin,admin,system:masters\n")
        for f in pki.iterdir():
            f.chmod(0o600)

    def _write_kubeconfig(self, state: _State) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "langmerge-local",
                    "cluster": {
                        "server": f"https://127.0.0.1:{state.ports['apiserver']}",
                        "certificate-authority": str(self.dir / "pki" / "ca.crt"),
                    },
                }
            ],
            "users": [{"name": "admin", "user": {"token": state.token}}],
            "contexts": [{"name": "langmerge-local", "context": {"cluster": "langmerge-local", "user": "admin"}}],
            "current-context": "langmerge-local",
        }
        path = self.dir / "kubeconfig"
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)

    def _write_env_file(self) -> None:
        lines = [f"export {k}={v}" for k, v in self.endpoints().env().items()]
        path = self.dir / "env.sh"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)

    def _etcd_cmd(self, state: _State) -> list[str]:
        p, peer = state.ports["etcd"], state.ports["etcd_peer"]
        return [
            str(binaries.etcd()),
            "--name=local",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{p}",
            f"--advertise-client-urls=http://127.0.0.1:{p}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=local=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_cmd(self, binary: Path, state: _State) -> list[str]:
        pki = self.dir / "pki"
        return [
            str(binary),
            f"--etcd-servers=http://127.0.0.1:{state.ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={state.ports['apiserver']}",
            "--insecure-port=0",
            f"--tls-cert-file={pki / 'server.crt'}",
            f"--tls-private-key-file={pki / 'server.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "-v=1",
        ]

    def _kcm_cmd(self, binary: Path) -> list[str]:
        pki = self.dir / "pki"
        return [
            str(binary),
            f"--kubeconfig={self.dir / 'kubeconfig'}",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--port=0",
            "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--controllers=namespace,garbagecollector,serviceaccount,serviceaccount-token",
            "-v=1",
        ]

    def _weed_cmd(self, state: _State) -> list[str]:
        d = self.dir / "s3"
        (d / "logs").mkdir(parents=True, exist_ok=True)
        p = state.ports
        return [
            str(binaries.weed()),
            f"-logdir={d / 'logs'}",
            "mini",
            f"-dir={d}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}",
            f"-master.port={p['s3_master']}",
            f"-volume.port={p['s3_volume']}",
            f"-filer.port={p['s3_filer']}",
            f"-admin.port={p['s3_admin']}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            f"-s3.localSocket={d / 's3.sock'}",
            f"-filer.localSocket={d / 'filer.sock'}",
        ]

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None) -> int:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.dir,
            start_new_session=True,
        )
        log.close()
        return proc.pid

    def _wait(self, ready: Any, name: str, deadline: float) -> None:
        state = self._load()
        while time.monotonic() < deadline:
            if ready():
                return
            pid = state.pids.get(name)
            if pid is not None and not _pid_alive(pid):
                raise ControlPlaneError(
                    f"{name} exited during start-up; see {self.logs / (name + '.log')}:\n" + self._tail(name)
                )
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} not ready in time; see {self.logs / (name + '.log')}:\n" + self._tail(name))

    def _tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    @staticmethod
    def _http_ok(url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> bool:
        req = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=2, context=context) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def _apiserver_ready(self, state: _State) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.crt"))
        return self._http_ok(
            f"https://127.0.0.1:{state.ports['apiserver']}/readyz",
            headers={"Authorization": f"Bearer {state.token}"},
            context=ctx,
        )

    def _s3_ready(self, state: _State) -> bool:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{state.ports['s3']}",
            aws_access_key_id=state.s3_access_key,
            aws_secret_access_key=state.s3_secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
        )
        try:
            client.list_buckets()
        except Exception:
            return False
        return True

    # -- stop ----------------------------------------------------------------------------------------------------
    def stop(self, timeout: float = 15.0) -> None:
        """Stop every component by its recorded PID (SIGTERM to its process group, then SIGKILL). Data stays."""
        for name in reversed(COMPONENTS):
            self.stop_component(name, timeout)

    def stop_component(self, name: str, timeout: float = 15.0) -> None:
        """Stop one component (e.g. ``seaweedfs`` or ``kube-apiserver``), keeping its data and ports: :meth:`start`
        brings it back where it was (fault-injection tests stop S3 or the API server this way)."""
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; one of {', '.join(COMPONENTS)}")
        state = self._load()
        pid = state.pids.pop(name, None)
        if pid is not None and _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        self._save(state)


@contextlib.contextmanager
def running(state_dir: Path, **kwargs: Any) -> Iterator[Endpoints]:
    """Start the control plane for the duration of a ``with`` block."""
    cp = ControlPlane(state_dir, **kwargs)
    try:
        yield cp.start()
    finally:
        cp.stop()
