"""The local Job runner against the real local API server: it runs Jobs as local processes and reports their status.

Jobs use the host image (``command + args`` run as they are) or a trainer image. Every test gets its own namespace and
its own runner limited to it, so runners never pick up each other's Jobs.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client, config

from faults import TcpProxy
from langmerge.dev.controlplane import Endpoints
from langmerge.dev.jobrunner import (
    DEFAULT_TRAINER_PATTERN,
    HOST_IMAGE,
    ImageRule,
    LocalJobRunner,
    RunnerConfig,
)

T = TypeVar("T")
RULES = (ImageRule(HOST_IMAGE, "host"), ImageRule(DEFAULT_TRAINER_PATTERN, "trainer"))
PY = sys.executable


# -- helpers -----------------------------------------------------------------------------------------------------------
def wait_for(predicate: Callable[[], T | None], timeout: float = 15.0, what: str = "condition") -> T:
    limit = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > limit:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def job_manifest(
    name: str,
    command: list[str] | None = None,
    *,
    image: str = HOST_IMAGE,
    args: list[str] | None = None,
    env: list[dict[str, Any]] | None = None,
    env_from: list[dict[str, Any]] | None = None,
    backoff_limit: int = 0,
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": image}
    for key, value in (("command", command), ("args", args), ("env", env), ("envFrom", env_from)):
        if value is not None:
            container[key] = value
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "backoffLimit": backoff_limit,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
            **spec,
        },
    }


class Jobs:
    """Create and read Jobs of one namespace as plain dicts."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.batch = client.BatchV1Api(api)
        self.namespace = namespace

    def create(self, manifest: dict[str, Any]) -> None:
        self.batch.create_namespaced_job(self.namespace, manifest)

    def get(self, name: str) -> dict[str, Any]:
        resp = self.batch.read_namespaced_job(name, self.namespace, _preload_content=False)
        job: dict[str, Any] = json.loads(resp.data)
        return job

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.get(name).get("status") or {}
        return status

    def finished(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        """The status once a Complete or Failed condition is there."""

        def done() -> dict[str, Any] | None:
            status = self.status(name)
            return status if any(c["status"] == "True" for c in status.get("conditions") or []) else None

        return wait_for(done, timeout, f"Job {name} to finish")

    def delete(self, name: str) -> None:
        self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background")


def only_condition(status: dict[str, Any]) -> dict[str, Any]:
    conditions = status.get("conditions") or []
    assert len(conditions) == 1, conditions
    cond: dict[str, Any] = conditions[0]
    return cond


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # a zombie waiting for a reaper is dead for our purposes
    return True


# Kubernetes expands $(VAR) in command and args, and "$$" is its escape for "$": a shell's "$$" is written "$$$$".
SHELL_PID = "$$$$"


def read_pids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.fixture
def jobs(kube: Any, namespace: str) -> Jobs:
    return Jobs(kube, namespace)


@pytest.fixture
def make_runner(kube: Any, namespace: str, tmp_path: Path) -> Iterator[Callable[..., LocalJobRunner]]:
    """Start runners limited to the test's namespace (stopped at the end); keyword arguments override the config."""
    made: list[LocalJobRunner] = []

    def make(api: Any = None, **overrides: Any) -> LocalJobRunner:
        settings: dict[str, Any] = {
            "work_root": tmp_path / "work",
            "namespace": namespace,
            "image_rules": RULES,
            "retry_delay_seconds": 0.0,
            "kill_grace_seconds": 1.0,
            "poll_seconds": 0.05,
            **overrides,
        }
        runner = LocalJobRunner(api if api is not None else kube, RunnerConfig(**settings))
        made.append(runner)
        runner.start()
        assert runner.synced.wait(15), "the runner never listed the Jobs"
        return runner

    yield make
    for runner in made:
        runner.stop()


# -- the Job controller's part -----------------------------------------------------------------------------------------
def test_job_succeeds_and_reports_status_like_the_job_controller(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, namespace: str
) -> None:
    runner = make_runner()
    jobs.create(job_manifest("ok", ["sh", "-c", "echo out; echo err >&2; pwd; echo host=$HOSTNAME home=$HOME"]))
    status = jobs.finished("ok")

    assert status["succeeded"] == 1
    assert "active" not in status and "failed" not in status
    assert status["startTime"] <= status["completionTime"]
    cond = only_condition(status)
    assert (cond["type"], cond["status"], cond["reason"]) == ("Complete", "True", "CompletionsReached")
    assert cond["lastTransitionTime"] == status["completionTime"]

    workdir = runner.config.attempt_dir(namespace, "ok", 0)
    lines = runner.config.attempt_log(namespace, "ok", 0).read_text().splitlines()
    assert lines[:2] in (["out", "err"], ["err", "out"])
    assert os.path.realpath(lines[2]) == os.path.realpath(workdir)  # it ran in its scratch folder
    assert lines[3] == f"host=ok-0 home={workdir}"
    assert runner.running_jobs() == [] and runner.pending_jobs() == []


def test_failing_command_is_retried_up_to_backoff_limit(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, namespace: str, tmp_path: Path
) -> None:
    runner = make_runner()
    marker = tmp_path / "flaky-marker"
    jobs.create(job_manifest("fails", ["sh", "-c", "echo attempt; exit 3"], backoff_limit=2))
    # Fails once, then succeeds: one retry is enough.
    jobs.create(
        job_manifest("flaky", ["sh", "-c", f"[ -e {marker} ] && exit 0; touch {marker}; exit 1"], backoff_limit=2)
    )

    status = jobs.finished("fails")
    assert status["failed"] == 3
    assert "active" not in status and "succeeded" not in status and "completionTime" not in status
    cond = only_condition(status)
    assert (cond["type"], cond["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert cond["message"].startswith("Job has reached the specified backoff limit")
    assert "exited with code 3" in cond["message"]
    logs = sorted(p.name for p in runner.config.logs_path.glob(f"{namespace}_fails_*.log"))
    assert logs == [f"{namespace}_fails_{n}.log" for n in range(3)]
    assert all(runner.config.attempt_log(namespace, "fails", n).read_text() == "attempt\n" for n in range(3))

    flaky = jobs.finished("flaky")
    assert (flaky["failed"], flaky["succeeded"]) == (1, 1)
    assert only_condition(flaky)["type"] == "Complete"


def test_active_deadline_kills_the_process_group(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, tmp_path: Path
) -> None:
    make_runner()
    pids = tmp_path / "pids"
    script = f"sleep 60 & echo $! >> {pids}; echo {SHELL_PID} >> {pids}; wait"
    started = time.monotonic()
    jobs.create(job_manifest("slow", ["sh", "-c", script], activeDeadlineSeconds=2, backoff_limit=3))
    wait_for(lambda: len(read_pids(pids)) == 2, what="the process to start")
    status = jobs.finished("slow")
    assert time.monotonic() - started < 10

    cond = only_condition(status)
    assert (cond["type"], cond["reason"]) == ("Failed", "DeadlineExceeded")
    assert cond["message"] == "Job was active longer than specified deadline"
    assert status["failed"] == 1 and "active" not in status
    for pid in read_pids(pids):  # the shell and its background child
        wait_for(lambda pid=pid: not alive(pid), 5, f"process {pid} to die")


def test_secret_env_reaches_the_child_and_the_runners_env_does_not(
    make_runner: Callable[..., LocalJobRunner],
    jobs: Jobs,
    kube: Any,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LANGMERGE_RUNNER_ONLY", "must-not-leak")
    core = client.CoreV1Api(kube)
    secret = "s3cr3t with spaces ü"
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "creds"},
            "data": {
                "TOKEN": base64.b64encode(secret.encode()).decode(),
                "OTHER": base64.b64encode(b"o").decode(),
            },
        },
    )
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"LEVEL": "debug"}})
    runner = make_runner(extra_env=(("HF_HOME", "/shared/cache"),))
    dump = "import json, os, sys; json.dump({'env': dict(os.environ), 'exe': sys.executable}, open('env.json', 'w'))"
    jobs.create(
        job_manifest(
            "env",
            ["python", "-c", dump],
            env=[
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}},
                {"name": "DERIVED", "value": "[$(TOKEN)]"},
                {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "LEVEL"}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "HF_HOME", "value": "/in-cluster/cache"},
            ],
            env_from=[{"secretRef": {"name": "creds"}, "prefix": "S_"}],
        )
    )
    assert only_condition(jobs.finished("env"))["type"] == "Complete"

    seen = json.loads((runner.config.attempt_dir(namespace, "env", 0) / "env.json").read_text())
    env = seen["env"]
    assert env["TOKEN"] == secret
    assert env["DERIVED"] == f"[{secret}]"
    assert (env["LEVEL"], env["POD"], env["NS"]) == ("debug", "env-0", namespace)
    assert (env["S_TOKEN"], env["S_OTHER"]) == (secret, "o")
    assert env["HF_HOME"] == "/shared/cache"  # the runner's extras win over the Job's in-cluster paths
    # Nothing of the runner's own environment: credentials flow only through Secrets.
    assert "LANGMERGE_RUNNER_ONLY" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env and "KUBECONFIG" not in env
    # The runner's own: where the container's termination message goes (kubelet would mount a file there).
    assert env["LANGMERGE_TERMINATION_MESSAGE_PATH"] == str(
        runner.config.attempt_dir(namespace, "env", 0) / "termination-log"
    )
    assert set(env) <= {"PATH", "HOME", "LANG", "TMPDIR", "HOSTNAME", "PYTHONUNBUFFERED", "HF_HOME", "TOKEN"} | {
        "LANGMERGE_TERMINATION_MESSAGE_PATH",
        "DERIVED",
        "LEVEL",
        "POD",
        "NS",
        "S_TOKEN",
        "S_OTHER",
        "LC_CTYPE",  # Python itself may set it when coercing the C locale
    }
    # `python` on the child's PATH is the project's Python.
    assert os.path.dirname(seen["exe"]) == os.path.dirname(PY)


def test_missing_secret_or_key_fails_with_create_container_config_error(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, kube: Any, namespace: str
) -> None:
    client.CoreV1Api(kube).create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "data": {"a": base64.b64encode(b"1").decode()}}
    )
    runner = make_runner()

    def ref(name: str, key: str, optional: bool = False) -> list[dict[str, Any]]:
        return [{"name": "X", "valueFrom": {"secretKeyRef": {"name": name, "key": key, "optional": optional}}}]

    jobs.create(job_manifest("no-secret", ["true"], env=ref("nope", "a")))
    jobs.create(job_manifest("no-key", ["true"], env=ref("creds", "b")))
    jobs.create(job_manifest("optional", ["sh", "-c", 'test -z "${X+set}"'], env=ref("nope", "a", optional=True)))

    for name, message in (
        ("no-secret", 'secrets "nope" not found'),
        ("no-key", f"couldn't find key b in Secret {namespace}/creds"),
    ):
        status = jobs.finished(name)
        cond = only_condition(status)
        assert (cond["type"], cond["reason"], cond["message"]) == ("Failed", "CreateContainerConfigError", message)
        assert "active" not in status
        assert not runner.config.attempt_log(namespace, name, 0).exists()  # no process ever started
    assert only_condition(jobs.finished("optional"))["type"] == "Complete"


def test_images_and_shapes_it_cannot_run_are_refused_clearly(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs
) -> None:
    make_runner()
    jobs.create(job_manifest("busybox", ["true"], image="busybox:1.36"))
    jobs.create(job_manifest("indexed", ["true"], completions=3, parallelism=2))
    jobs.create(job_manifest("foreign", ["sh", "-c", "true"], image="langmerge/trainer:0.1.0"))

    cond = only_condition(jobs.finished("busybox"))
    assert (cond["type"], cond["reason"]) == ("Failed", "ImageNotRunnableLocally")
    assert '"busybox:1.36"' in cond["message"]
    cond = only_condition(jobs.finished("indexed"))
    assert (cond["type"], cond["reason"]) == ("Failed", "UnsupportedByLocalRunner")
    assert "completions=3, parallelism=2" in cond["message"]
    cond = only_condition(jobs.finished("foreign"))
    assert (cond["type"], cond["reason"]) == ("Failed", "CommandNotRunnableLocally")


def test_finished_jobs_are_left_alone(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, tmp_path: Path, namespace: str
) -> None:
    marker = tmp_path / "must-not-run"
    jobs.create(job_manifest("done", ["touch", str(marker)]))
    done_status = {
        "startTime": "2026-01-01T00:00:00Z",
        "completionTime": "2026-01-01T00:00:01Z",
        "succeeded": 1,
        "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-01-01T00:00:01Z"}],
    }
    jobs.batch.patch_namespaced_job_status("done", jobs.namespace, {"status": done_status})
    before = jobs.get("done")
    runner = make_runner()
    jobs.create(job_manifest("after", ["true"]))
    jobs.finished("after")
    assert not marker.exists()
    assert not (runner.config.work_root / namespace / "done").exists()
    assert jobs.get("done")["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


# -- scheduling and process life cycle ---------------------------------------------------------------------------------
def test_parallel_cap_runs_at_most_n_jobs_at_once_in_creation_order(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, tmp_path: Path
) -> None:
    make_runner(parallel=2)
    spans = tmp_path / "spans"
    spans.mkdir()
    script = "import sys, time; t0 = time.time(); time.sleep(0.8); open(sys.argv[1], 'w').write(f'{t0} {time.time()}')"
    names = [f"j{i}" for i in range(4)]
    for name in names:
        jobs.create(job_manifest(name, ["python", "-c", script, str(spans / name)]))

    most_active = 0
    while True:
        statuses = [jobs.status(n) for n in names]
        most_active = max(most_active, sum(s.get("active", 0) for s in statuses))
        if all(s.get("conditions") for s in statuses):
            break
        time.sleep(0.05)
    assert all(only_condition(s)["type"] == "Complete" for s in statuses)
    assert most_active == 2

    intervals = {n: tuple(map(float, (spans / n).read_text().split())) for n in names}
    events = sorted([(start, 1) for start, _ in intervals.values()] + [(end, -1) for _, end in intervals.values()])
    running = overlap = 0
    for _, delta in events:
        running += delta
        overlap = max(overlap, running)
    assert overlap == 2
    # The first two created are the first two started.
    first_two = sorted(names, key=lambda n: intervals[n][0])[:2]
    assert sorted(first_two) == ["j0", "j1"]


def test_deleting_a_running_job_kills_its_process(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, tmp_path: Path
) -> None:
    runner = make_runner()
    pids = tmp_path / "pids"
    jobs.create(job_manifest("doomed", ["sh", "-c", f"echo {SHELL_PID} >> {pids}; exec sleep 60"]))
    pid = wait_for(lambda: (read_pids(pids) or [0])[0], what="the process to start")
    assert jobs.status("doomed")["active"] == 1
    jobs.delete("doomed")
    wait_for(lambda: not alive(pid), 5, "the process to be killed")
    wait_for(lambda: runner.running_jobs() == [], 5, "the runner to let go of the Job")


def test_restarted_runner_resumes_an_orphaned_active_job(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, tmp_path: Path, namespace: str
) -> None:
    pids, marker = tmp_path / "pids", tmp_path / "marker"
    script = f"echo {SHELL_PID} >> {pids}; [ -e {marker} ] && exit 0; touch {marker}; exec sleep 60"
    first = make_runner()
    jobs.create(job_manifest("resumable", ["sh", "-c", script]))
    pid = wait_for(lambda: (read_pids(pids) or [0])[0], what="the first attempt to start")
    first.stop()
    assert not alive(pid)  # stopping the runner kills its children...
    status = jobs.status("resumable")
    assert status["active"] == 1 and not status.get("conditions")  # ...and leaves the Job active, like a lost node

    second = make_runner()
    status = jobs.finished("resumable")
    assert only_condition(status)["type"] == "Complete"
    assert "failed" not in status
    assert len(read_pids(pids)) == 2
    assert second.config.attempt_log(namespace, "resumable", 1).exists()  # a new pseudo pod, a new attempt


def test_runner_main_killed_hard_leaves_nothing_behind_after_restart(
    make_runner: Callable[..., LocalJobRunner],
    jobs: Jobs,
    tmp_path: Path,
    namespace: str,
    control_plane: Endpoints,
) -> None:
    """``main`` in its own process, SIGKILLed: its child survives, and the next runner kills it and reruns the Job."""
    pids, marker, work = tmp_path / "pids", tmp_path / "marker", tmp_path / "work"
    script = f"echo {SHELL_PID} >> {pids}; [ -e {marker} ] && exit 0; touch {marker}; exec sleep 60"
    argv = [PY, "-m", "langmerge.dev.jobrunner", "--kubeconfig", control_plane.kubeconfig, "--namespace", namespace]
    argv += ["--work-dir", str(work), "--host-image", HOST_IMAGE, "--kill-grace-seconds", "1"]
    with (tmp_path / "runner.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        jobs.create(job_manifest("survivor", ["sh", "-c", script]))
        pid = wait_for(lambda: (read_pids(pids) or [0])[0], 20, "the runner process to start the Job")
    finally:
        proc.kill()
        proc.wait()
    assert alive(pid), "an orphan is expected after SIGKILL of the runner"
    assert jobs.status("survivor")["active"] == 1

    make_runner()
    wait_for(lambda: not alive(pid), 5, "the orphan to be killed")
    assert only_condition(jobs.finished("survivor"))["type"] == "Complete"
    assert len(read_pids(pids)) == 2


def test_sigterm_stops_main_and_its_children(
    jobs: Jobs, tmp_path: Path, namespace: str, control_plane: Endpoints
) -> None:
    pids = tmp_path / "pids"
    argv = [PY, "-m", "langmerge.dev.jobrunner", "--kubeconfig", control_plane.kubeconfig, "--namespace", namespace]
    argv += ["--work-dir", str(tmp_path / "work"), "--host-image", HOST_IMAGE, "--kill-grace-seconds", "1"]
    with (tmp_path / "runner.log").open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        jobs.create(job_manifest("child", ["sh", "-c", f"echo {SHELL_PID} >> {pids}; exec sleep 60"]))
        pid = wait_for(lambda: (read_pids(pids) or [0])[0], 20, "the runner process to start the Job")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not alive(pid)
    assert "local Job runner stopped" in (tmp_path / "runner.log").read_text()


# -- trainer mode ------------------------------------------------------------------------------------------------------
def test_trainer_image_runs_langmerge_trainer_with_the_projects_python(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, tmp_path: Path, namespace: str
) -> None:
    """The mapping end to end, with a stand-in trainer module that records how it was started."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "fake_trainer.py").write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'exe': sys.executable, 'cwd': os.getcwd()}, open('trainer.json', 'w'))\n"
    )
    runner = make_runner(trainer_module="fake_trainer", extra_env=(("PYTHONPATH", str(fake)),))
    jobs.create(
        job_manifest(
            "train-es",
            ["langmerge-trainer", "train", "--task", "$(TASK)"],
            image="ghcr.io/acme/langmerge-trainer:0.1.0",
            args=["--device", "cpu"],
            env=[{"name": "TASK", "value": "@task.json"}],
        )
    )
    jobs.create(job_manifest("entrypoint", None, image="langmerge/trainer:0.1.0", args=["merge", "--task", "{}"]))
    assert only_condition(jobs.finished("train-es"))["type"] == "Complete"
    assert only_condition(jobs.finished("entrypoint"))["type"] == "Complete"

    seen = json.loads((runner.config.attempt_dir(namespace, "train-es", 0) / "trainer.json").read_text())
    assert seen["argv"] == ["train", "--task", "@task.json", "--device", "cpu"]
    assert seen["exe"] == PY
    assert os.path.realpath(seen["cwd"]) == os.path.realpath(runner.config.attempt_dir(namespace, "train-es", 0))
    seen = json.loads((runner.config.attempt_dir(namespace, "entrypoint", 0) / "trainer.json").read_text())
    assert seen["argv"] == ["merge", "--task", "{}"]


def test_trainer_image_runs_the_real_langmerge_trainer(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, namespace: str
) -> None:
    runner = make_runner()
    jobs.create(job_manifest("help", ["langmerge-trainer", "--help"], image="langmerge/trainer:0.1.0"))
    assert only_condition(jobs.finished("help", timeout=30))["type"] == "Complete"
    assert "usage: langmerge-trainer" in runner.config.attempt_log(namespace, "help", 0).read_text()


# -- robustness against the API server ---------------------------------------------------------------------------------
def test_runner_survives_an_api_server_outage(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, control_plane: Endpoints
) -> None:
    """Watch over all namespaces (narrowed by a label), through a proxy that goes away for a while."""
    proxy = TcpProxy(int(control_plane.apiserver_url.rsplit(":", 1)[1]))
    proxy.start()
    cfg = client.Configuration()
    config.load_kube_config(config_file=control_plane.kubeconfig, client_configuration=cfg)
    cfg.host = f"https://127.0.0.1:{proxy.port}"
    cfg.refresh_api_key_hook = None  # the client's hook re-applies the kubeconfig (and its host) on every request
    label = uuid.uuid4().hex[:12]
    try:
        with client.ApiClient(cfg) as api:
            runner = make_runner(api, namespace=None, label_selector=f"jobrunner-test={label}", watch_timeout_seconds=5)
            labels = {"jobrunner-test": label}
            jobs.create(job_manifest("before", ["true"], labels=labels))
            jobs.create(job_manifest("not-mine", ["true"]))  # no label: not this runner's
            assert only_condition(jobs.finished("before"))["type"] == "Complete"

            # One Job ends while the API server is away (its status is written once it is back), one is created then.
            jobs.create(job_manifest("long", ["sleep", "1"], labels=labels))
            wait_for(lambda: jobs.status("long").get("active"), what="the long Job to start")
            proxy.stop()
            jobs.create(job_manifest("during", ["true"], labels=labels))
            time.sleep(2.0)
            assert not jobs.status("during")
            assert jobs.status("long")["active"] == 1
            proxy.start()
            assert only_condition(jobs.finished("long", timeout=20))["type"] == "Complete"
            assert only_condition(jobs.finished("during", timeout=20))["type"] == "Complete"
            assert not jobs.status("not-mine")
            runner.stop()
    finally:
        proxy.stop()


# -- podFailurePolicy and disruptions (issue 12, item 11) --------------------------------------------------------------
def test_a_user_error_fails_the_training_job_at_once_with_no_second_pod(
    make_runner: Callable[..., LocalJobRunner],
    jobs: Jobs,
    kube: Any,
    namespace: str,
    control_plane: Endpoints,
    s3: Any,
    bucket: str,
) -> None:
    """The operator's own training Job (backoffLimit 1) on data with a bad line: the trainer exits with its
    user-error status and the podFailurePolicy ends the Job after one pod, saying why."""
    from langmerge.api.expert import LanguageExpertSpec
    from langmerge.artifacts import BaseModelIdentity, failure_uri
    from langmerge.controller.jobs import Owner, build_training_job
    from langmerge.settings import Settings
    from langmerge.tasks import TrainTask

    s3.put_bytes(f"s3://{bucket}/data/de/a.jsonl", b'{"prompt": "a", "completion": "b"}\nnot json\n')
    spec = LanguageExpertSpec.model_validate(
        {
            "language": "de",
            "task": "chat",
            "baseModel": {"uri": f"s3://{bucket}/models/none"},
            "dataset": {"uri": f"s3://{bucket}/data/de"},
            "resources": {"gpus": 0},
        }
    )
    task = TrainTask(
        fingerprint="a" * 16,
        output_uri=f"s3://{bucket}/artifacts/experts/{namespace}/de/" + "a" * 16,
        namespace=namespace,
        name="de",
        spec=spec,
        base_model=BaseModelIdentity(uri=spec.base_model.uri, digest="b" * 16),
        data_digest="d" * 16,
    )
    settings = Settings(artifacts_uri=f"s3://{bucket}/artifacts", s3_endpoint=control_plane.s3_endpoint)
    assert settings.job_backoff_limit == 1
    manifest = build_training_job(Owner("LanguageExpert", namespace, "de", str(uuid.uuid4())), task, settings)
    manifest["metadata"]["ownerReferences"] = []  # no owner object in this test
    # The namespace fixture created the langmerge-s3 Secret with the local S3's keys.
    runner = make_runner()
    name = manifest["metadata"]["name"]
    jobs.create(manifest)

    status = jobs.finished(name, timeout=120)
    cond = only_condition(status)
    assert (cond["type"], cond["reason"]) == ("Failed", "PodFailurePolicy")
    assert cond["message"].startswith(f"Container trainer for pod {namespace}/{name}-0 failed with exit code 4")
    assert "training failed (DataError)" in cond["message"] and "line 2" in cond["message"]
    assert status["failed"] == 1
    assert not runner.config.attempt_log(namespace, name, 1).exists()  # no second pod
    record = s3.get_json(failure_uri(task.output_uri, 1))
    assert record["error_class"] == "DataError" and record["retryable"] is False


def _disruptable(marker: Path, pids: Path) -> list[str]:
    """First run: wait to be disrupted, exit 3 on SIGTERM (the trainer checkpoints and does the same). Then: done."""
    script = (
        f"import os, signal, sys, time\n"
        f"if os.path.exists({str(marker)!r}): sys.exit(0)\n"
        f"open({str(marker)!r}, 'w').close()\n"
        f"signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\n"
        f"open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        f"time.sleep(60)\n"
    )
    return ["python", "-c", script]


@pytest.mark.parametrize("with_policy", [True, False], ids=["policy", "no-policy"])
def test_disruptions_do_not_count_against_the_backoff_limit(
    make_runner: Callable[..., LocalJobRunner], jobs: Jobs, tmp_path: Path, namespace: str, with_policy: bool
) -> None:
    """A preempted pod (DisruptionTarget) is replaced without using up backoffLimit 0 under the builders' policy;
    without the policy the same disruption fails the Job, as on a cluster."""
    from langmerge.constants import ANNOTATION_POD_FAILURE_POLICY
    from langmerge.controller.jobs import pod_failure_policy

    marker, pids = tmp_path / "marker", tmp_path / "pids"
    manifest = job_manifest("preemptible", _disruptable(marker, pids), backoff_limit=0)
    manifest["spec"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    if with_policy:  # as the builders write it: the annotation is what survives on this API server
        manifest["metadata"]["annotations"] = {ANNOTATION_POD_FAILURE_POLICY: json.dumps(pod_failure_policy())}
    runner = make_runner()
    jobs.create(manifest)
    wait_for(lambda: read_pids(pids), what="the first pod to run")
    assert runner.disrupt(namespace, "preemptible")

    status = jobs.finished("preemptible", timeout=30)
    cond = only_condition(status)
    if with_policy:
        assert cond["type"] == "Complete" and "failed" not in status
        assert runner.config.attempt_log(namespace, "preemptible", 1).exists()  # a replacement pod ran
    else:
        assert (cond["type"], cond["reason"]) == ("Failed", "BackoffLimitExceeded") and status["failed"] == 1
        assert "exited with code 3 after a disruption (PreemptionByScheduler)" in cond["message"]
    assert not runner.disrupt(namespace, "preemptible")  # nothing runs any more
