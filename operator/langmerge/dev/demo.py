"""``langmerge up`` / ``langmerge down``: the whole system on a sample, end to end. Development and demonstration.

``up`` starts (or reuses) the local control plane, the operator and the local Job runner as background processes,
seeds S3 with a small base model and a three-language dialog task (real text from chatterbot-corpus), applies three
LanguageExperts and a MergedModel, shows live progress until revision 1 is published, then adds data for one language
and shows that only that expert retrains and the model is re-merged (revision 2). It ends with a summary: per-language
metrics of each expert and of the merged model, the seconds of every Job, and the cost of the maintenance update
versus retraining every language. Everything keeps running until ``down``; state (etcd, S3) survives a restart.

With ``--kubeconfig`` it uses that cluster instead (Jobs then run on the cluster's nodes; give the S3 endpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from langmerge import artifacts
from langmerge.api.expert import LanguageExpertStatus
from langmerge.api.merged import MergedModelStatus
from langmerge.api.serving import ServingPhase, ServingStatus
from langmerge.constants import (
    API_VERSION,
    EXPERT_PLURAL,
    GROUP,
    ISVC_KIND,
    ISVC_PLURAL,
    KSERVE_GROUP,
    KSERVE_VERSION,
    MERGED_PLURAL,
    VERSION,
)
from langmerge.kube import Kube, install_crds, load_client
from langmerge.reports import (
    changes_text,
    cost_report,
    cost_text,
    experts_table,
    merged_table,
    read_baselines,
    table,
)
from langmerge.store import ObjectStore, S3Config

LANGUAGES = ("es", "it", "pt")
#: The language whose data grows in the maintenance step.
UPDATED_LANGUAGE = "pt"
#: The language the README's walkthrough "Add a language to the running sample" adds; its data ships as a file.
ADDED_LANGUAGE = "nl"
#: The README section that walks through adding (and removing) a language; `up` ends by pointing at it.
WALKTHROUGH = "Add a language to the running sample"
#: Where that data file lives in the repository (chatterbot-corpus' Dutch dialog as prompt/completion pairs).
ADDED_DATA_FILE = f"examples/sample/dialog-{ADDED_LANGUAGE}.jsonl"
TASK = "dialog"
#: ``up --quick``: the sample's base model pre-trained briefly and narrower, and experts trained for fewer epochs.
QUICK_SEED_ARGS = ("--pretrain-steps", "40", "--hidden-size", "64")
QUICK_EPOCHS = 2
SECRET = "langmerge-s3"
#: The sample's InferenceService: each published revision is rolled out to it (a canary, then promoted).
SERVED = TASK
#: How the sample rolls revisions out (spec.serving): a 10% canary, promoted after it stayed Ready for 20 s.
SAMPLE_KSERVE = {"canaryTrafficPercent": 10, "promoteAfter": "20s", "readyTimeout": "10m"}
#: What the closing summary asks the served model (a Spanish prompt: one of the sample's languages).
SERVED_PROMPT = "¿Cómo estás?"


class DemoError(RuntimeError):
    pass


@dataclass(frozen=True)
class Layout:
    """Where the sample lives in S3 (tests use their own buckets)."""

    models_bucket: str = "langmerge-models"
    data_bucket: str = "langmerge-data"
    artifacts_bucket: str = "langmerge"

    @property
    def buckets(self) -> tuple[str, ...]:
        return (self.models_bucket, self.data_bucket, self.artifacts_bucket)

    @property
    def base_uri(self) -> str:
        return f"s3://{self.models_bucket}/tiny-llama"

    @property
    def data_uri(self) -> str:
        return f"s3://{self.data_bucket}/{TASK}"

    @property
    def updates_uri(self) -> str:
        return f"s3://{self.data_bucket}/{TASK}-updates"

    @property
    def merged_uri(self) -> str:
        return f"s3://{self.models_bucket}/merged/{TASK}-multilingual"

    @property
    def artifacts_uri(self) -> str:
        return f"s3://{self.artifacts_bucket}/artifacts"

    def uri_grants(self, namespace: str) -> str:
        """The operator's URI policy grants (LANGMERGE_URI_GRANTS) that let ``namespace`` run the sample: read the
        base model and the data, write the merged model. Nothing else outside ``<artifacts>/<namespace>/``."""
        grants = {
            namespace: {
                "read": [f"{self.base_uri}/", f"{self.data_uri}/"],
                "readWrite": [f"s3://{self.models_bucket}/merged/"],
            }
        }
        return json.dumps(grants, sort_keys=True)


DEFAULT_LAYOUT = Layout()


# -- the sample's manifests (examples/sample/*.yaml are generated from these) -------------------------------------------
#: The sample's trunk: one adapter on every language's data, which each language's expert starts from.
TRUNK = f"{TASK}-trunk"


def sample_trunk(layout: Layout = DEFAULT_LAYOUT) -> dict[str, Any]:
    """The sample's trunk LanguageExpert: one epoch on every language's data under ``<data_uri>/`` (language ``mul``),
    trained once: it does not follow its data (``followData: false``), so one language's new data retrains that
    language's expert only."""
    doc = sample_expert("mul", layout, trunk=False)
    doc["metadata"] = {"name": TRUNK, "labels": {"langmerge.dev/task": TASK, "langmerge.dev/role": "trunk"}}
    spec = doc["spec"]
    spec["dataset"]["uri"] = layout.data_uri
    spec["training"]["epochs"] = 1
    spec["schedule"]["followData"] = False
    return doc


def sample_expert(language: str, layout: Layout = DEFAULT_LAYOUT, *, trunk: bool = True) -> dict[str, Any]:
    """The sample's LanguageExpert for ``language`` (its data under ``<data_uri>/<language>/``), starting from the
    sample's trunk."""
    return {
        "apiVersion": API_VERSION,
        "kind": "LanguageExpert",
        "metadata": {"name": f"{TASK}-{language}", "labels": {"langmerge.dev/task": TASK}},
        "spec": {
            "language": language,
            "task": TASK,
            "baseModel": {"uri": layout.base_uri},
            "dataset": {"uri": f"{layout.data_uri}/{language}", "evalFraction": 0.15},
            **({"initFrom": {"expert": TRUNK}} if trunk else {}),
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "training": {
                "epochs": 4,
                "learningRate": 0.004,
                "batchSize": 16,
                "maxSeqLength": 96,
                "seed": 7,
                "checkpointEverySteps": 100,
                "progressEverySteps": 5,
            },
            "resources": {"gpus": 1, "cpu": "2", "memory": "8Gi"},
            "schedule": {"pollIntervalSeconds": 10, "settleSeconds": 5},
        },
    }


def sample_experts(layout: Layout = DEFAULT_LAYOUT) -> list[dict[str, Any]]:
    """The trunk, then each language's expert."""
    return [sample_trunk(layout), *(sample_expert(lang, layout) for lang in LANGUAGES)]


def sample_merged(layout: Layout = DEFAULT_LAYOUT, *, serving: bool = True) -> dict[str, Any]:
    """``serving``: roll every published revision out to the sample's InferenceService (needs KServe, or the local
    stand-in of ``langmerge up``)."""
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "MergedModel",
        "metadata": {"name": f"{TASK}-multilingual"},
        "spec": {
            "baseModel": {"uri": layout.base_uri},
            "experts": {"selector": {"matchLabels": {"langmerge.dev/task": TASK}}},
            "method": "ties",
            "parameters": {"density": 1.0},
            # TIES' merged update is not low rank: on the sample's adapters a PEFT adapter within 1% needs rank ~80
            # of 96 (more numbers than the weights), so the sample publishes the exact full weights
            "output": {"uri": layout.merged_uri, "format": "full-weights"},
            # the experts start from the trunk: they merge relative to it (the trunk is no language of the merge)
            "trunk": {"expert": TRUNK},
            # the default gate: no language more than 10% worse than its expert, none worse than the base model
            "evaluation": {"metric": "evalLoss"},
            "publish": {"keepRevisions": 5},
            "settleSeconds": 5,
        },
    }
    if serving:
        doc["spec"]["serving"] = [{"kserve": {"inferenceService": SERVED, **SAMPLE_KSERVE}}]
    return doc


def sample_inference_service() -> dict[str, Any]:
    """The InferenceService the sample serves from: langmerge's model server (the trainer image's ``serve`` verb, a
    KServe ServingRuntime for modelFormat ``langmerge``), reading S3 with the same Secret as the Jobs. No storageUri:
    the operator sets it to each published revision."""
    return {
        "apiVersion": f"{KSERVE_GROUP}/{KSERVE_VERSION}",
        "kind": ISVC_KIND,
        "metadata": {"name": SERVED},
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "langmerge"},
                    "env": [
                        {"name": key, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key}}}
                        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
                    ],
                }
            }
        },
    }


def sample_files() -> dict[str, str]:
    """File name -> YAML text of the sample manifests."""
    header = "# The langmerge sample: generated by `langmerge sample-manifests` (applied by `langmerge up`).\n"
    experts = "---\n".join(yaml.safe_dump(doc, sort_keys=False) for doc in sample_experts())
    added = (
        '# One more language for the running sample: the README\'s walkthrough "Add a language to the running sample"\n'
        f"# applies it after uploading {ADDED_DATA_FILE}. Generated by `langmerge sample-manifests`.\n"
    )
    served = (
        "# The InferenceService the sample's MergedModel rolls its revisions out to (spec.serving). `langmerge up` runs\n"
        "# it locally; on a cluster it needs KServe and the langmerge ServingRuntime (README, Serving).\n"
    )
    return {
        "experts.yaml": header + experts,
        "merged.yaml": header + yaml.safe_dump(sample_merged(), sort_keys=False),
        "inferenceservice.yaml": served + yaml.safe_dump(sample_inference_service(), sort_keys=False),
        f"expert-{ADDED_LANGUAGE}.yaml": added + yaml.safe_dump(sample_expert(ADDED_LANGUAGE), sort_keys=False),
    }


# -- background services -----------------------------------------------------------------------------------------------
@dataclass
class Services:
    """The operator and the local Job runner as background processes, tracked by PID files in the state folder."""

    state: Path

    def pid_file(self, name: str) -> Path:
        return self.state / "pids" / f"{name}.pid"

    def running(self, name: str) -> bool:
        pid = self._pid(name)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        return True

    def _pid(self, name: str) -> int | None:
        path = self.pid_file(name)
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        if self.running(name):
            return
        (self.state / "logs").mkdir(parents=True, exist_ok=True)
        self.pid_file(name).parent.mkdir(parents=True, exist_ok=True)
        with (self.state / "logs" / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        self.pid_file(name).write_text(str(proc.pid))

    def stop(self, name: str, timeout: float = 20.0) -> None:
        pid = self._pid(name)
        if pid is None:
            return
        if self.running(name):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.running(name) and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.running(name):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
        self.pid_file(name).unlink(missing_ok=True)


# -- up --------------------------------------------------------------------------------------------------------------
@dataclass
class Demo:
    state: Path
    kube: Kube
    store: ObjectStore
    env: dict[str, str]
    namespace: str = "default"
    layout: Layout = DEFAULT_LAYOUT
    out: Callable[[str], None] = print

    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.kube.api)

    # .. set-up ..
    def prepare_storage(self) -> None:
        for bucket in self.layout.buckets:
            self.store.ensure_bucket(bucket)

    def ensure_secret(self) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": self.namespace},
            "stringData": {
                "AWS_ACCESS_KEY_ID": self.env["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": self.env["AWS_SECRET_ACCESS_KEY"],
            },
        }
        core = client.CoreV1Api(self.kube.api)
        try:
            core.create_namespaced_secret(self.namespace, body)
        except ApiException as err:
            if err.status != 409:
                raise
            core.replace_namespaced_secret(SECRET, self.namespace, body)

    def seed(self, *extra_args: str) -> None:
        """The base model and the datasets, built by the trainer's sample command (it needs torch; we don't)."""
        lay = self.layout
        if self.store.list_objects(lay.base_uri) and self.store.list_objects(f"{lay.data_uri}/{LANGUAGES[0]}"):
            self.out(f"sample already in S3 ({lay.base_uri}, {lay.data_uri}/...)")
            return
        self.out("building the sample: tiny Llama base model + es/it/pt dialog data from chatterbot-corpus ...")
        cmd = [sys.executable, "-m", "langmerge_trainer", "sample", "--base-uri", lay.base_uri]
        cmd += ["--data-uri", lay.data_uri, "--updates-uri", lay.updates_uri, "--languages", ",".join(LANGUAGES)]
        cmd += ["--updated-language", UPDATED_LANGUAGE, *extra_args]
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise DemoError(f"seeding the sample failed:\n{result.stdout}\n{result.stderr}")
        self.out(result.stdout.strip())

    def apply(self, doc: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        plural = EXPERT_PLURAL if doc["kind"] == "LanguageExpert" else MERGED_PLURAL
        api = self.custom()
        name = doc["metadata"]["name"]
        if doc["kind"] == ISVC_KIND:  # created once; afterwards the operator owns its predictor's storageUri
            try:
                api.create_namespaced_custom_object(KSERVE_GROUP, KSERVE_VERSION, self.namespace, ISVC_PLURAL, doc)
            except ApiException as err:
                if err.status != 409:
                    raise
            return
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, doc)
        except ApiException as err:
            if err.status != 409:
                raise
            current = api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
            if current.get("spec") != doc["spec"]:
                current["spec"] = doc["spec"]
                api.replace_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name, current)

    # .. reading ..
    def experts(self) -> list[dict[str, Any]]:
        return [o for o in self.kube.list_experts(self.namespace, f"langmerge.dev/task={TASK}")]

    def merged(self) -> dict[str, Any] | None:
        from langmerge.kube import ObjectKey

        return self.kube.get_merged(ObjectKey(self.namespace, sample_merged(self.layout)["metadata"]["name"]))

    def revision(self) -> int:
        obj = self.merged()
        if obj is None:
            return 0
        status = MergedModelStatus.model_validate(obj.get("status") or {})
        return status.revision or 0

    def serving(self) -> ServingStatus | None:
        """The sample InferenceService's rollout (status.serving), or None when it is not served."""
        obj = self.merged()
        status = MergedModelStatus.model_validate((obj or {}).get("status") or {})
        return next((s for s in status.serving if s.target == f"kserve/{SERVED}"), None)

    def serves(self, revision: int) -> bool:
        """Whether ``revision`` (or a later one) serves every request; :class:`DemoError` when it cannot be served."""
        s = self.serving()
        if s is not None and s.phase in (ServingPhase.FAILED, ServingPhase.ROLLED_BACK):
            raise DemoError(
                f"InferenceService {SERVED}: {s.phase}: {s.message}; model server logs in {self.state / 'serving'}"
            )
        return s is not None and s.phase == ServingPhase.PROMOTED and (s.revision or 0) >= revision

    def training_jobs(self) -> list[Any]:
        return self.kube.list_jobs(
            "app.kubernetes.io/managed-by=langmerge,langmerge.dev/component=training", self.namespace
        )

    def merge_jobs(self) -> list[Any]:
        return self.kube.list_jobs(
            "app.kubernetes.io/managed-by=langmerge,langmerge.dev/component=merge", self.namespace
        )

    # .. live progress ..
    def watch(self, until: Callable[[], bool], what: str, timeout: float) -> None:
        tty = sys.stdout.isatty()
        last: tuple[Any, ...] = ()
        printed = 0.0
        start = time.monotonic()
        while True:
            merged = self.merged()
            experts = self.experts()
            text = experts_table(experts) + "\n\n" + merged_table([merged] if merged else [])
            elapsed = time.monotonic() - start
            # Without a terminal (a log, CI), print when a phase or the revision changes, else every 10 s.
            phases = tuple((o.get("status") or {}).get("phase") for o in experts)
            signature = (*phases, (merged or {}).get("status", {}).get("phase"), self.revision())
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J" + f"langmerge up: {what} ({elapsed:.0f}s)\n\n" + text + "\n")
                sys.stdout.flush()
            elif signature != last or time.monotonic() - printed >= 10:
                self.out(f"--- {what} ({elapsed:.0f}s)\n{text}\n")
                printed = time.monotonic()
            last = signature
            if until():
                return
            for obj in self.experts():
                status = LanguageExpertStatus.model_validate(obj.get("status") or {})
                if status.phase == "Failed":
                    raise DemoError(f"expert {obj['metadata']['name']} failed: {status.message}")
            if merged is not None:
                mstatus = MergedModelStatus.model_validate(merged.get("status") or {})
                if mstatus.phase in ("Failed", "Blocked"):
                    raise DemoError(f"merged model {mstatus.phase}: {mstatus.message}")
            if elapsed > timeout:
                raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.state / 'logs'}")
            time.sleep(1.0)

    def maintenance_applied(self) -> bool:
        return self.store.exists(f"{self.layout.data_uri}/{UPDATED_LANGUAGE}/part-update.jsonl")

    def add_data(self) -> None:
        """The maintenance event: new data arrives for one language."""
        src = f"{self.layout.updates_uri}/{UPDATED_LANGUAGE}/part-update.jsonl"
        body, _ = self.store.get_bytes(src)
        self.store.put_bytes(f"{self.layout.data_uri}/{UPDATED_LANGUAGE}/part-update.jsonl", body)
        lines = body.count(b"\n")
        self.out(f"added {lines} new {UPDATED_LANGUAGE} examples under {self.layout.data_uri}/{UPDATED_LANGUAGE}/")

    # .. summary ..
    def summary(self) -> str:
        experts = self.experts()
        merged = self.merged()
        mstatus = MergedModelStatus.model_validate((merged or {}).get("status") or {})
        lines = ["", "=" * 100, "langmerge: summary", "=" * 100, ""]
        rows = []
        for obj in sorted(experts, key=lambda o: o["spec"]["language"]):
            status = LanguageExpertStatus.model_validate(obj.get("status") or {})
            lang = obj["spec"]["language"]
            base = None
            if status.adapter is not None:
                manifest = self.store.get_json_or_none(
                    artifacts.join(status.adapter.uri.rsplit("/adapter", 1)[0], artifacts.MANIFEST)
                )
                base = (manifest or {}).get("base_metrics") or {}
            lm = mstatus.metrics.get(lang)
            em = status.adapter.metrics if status.adapter else None
            mm = lm.merged if lm else None
            rows.append(
                [
                    lang,
                    _f((base or {}).get("eval_loss")),
                    _f(em.eval_loss if em else None),
                    _f(mm.eval_loss if mm else None),
                    f"{lm.regression * 100:+.1f}%" if lm and lm.regression is not None else "-",
                    _f((base or {}).get("token_accuracy")),
                    _f(em.token_accuracy if em else None),
                    _f(mm.token_accuracy if mm else None),
                ]
            )
        lines.append(f"per-language evaluation (held-out split) of merged revision {mstatus.revision}:")
        lines.append(
            table(
                [
                    "LANG",
                    "BASE-LOSS",
                    "EXPERT-LOSS",
                    "MERGED-LOSS",
                    "REGRESSION",
                    "BASE-ACC",
                    "EXPERT-ACC",
                    "MERGED-ACC",
                ],
                rows,
            )
        )
        lines += ["", "every Job:"]
        job_rows = []
        for obj in sorted(experts, key=lambda o: o["metadata"]["name"]):
            for h in LanguageExpertStatus.model_validate(obj.get("status") or {}).history:
                if h.result == "Succeeded":
                    job_rows.append(
                        [
                            h.job,
                            "training",
                            obj["spec"]["language"],
                            _f(h.wall_seconds, 1),
                            _f(h.gpu_seconds, 1),
                            _f(h.cpu_seconds, 1),
                            h.tokens,
                        ]
                    )
        for rec in mstatus.history:
            if rec.reason == "merged":
                job_rows.append(
                    [
                        rec.job,
                        f"merge -> rev {rec.revision}",
                        changes_text(rec.changed_inputs, rec.removed_inputs, nothing="all"),
                        _f(rec.wall_seconds, 1),
                        _f(rec.gpu_seconds, 1),
                        _f(rec.cpu_seconds, 1),
                        "-",
                    ]
                )
        lines.append(table(["JOB", "KIND", "LANG/INPUTS", "WALL-S", "GPU-S", "CPU-S", "TOKENS"], job_rows))
        baselines = read_baselines(self.store, self.layout.artifacts_uri, experts)
        lines += ["", cost_text(cost_report(experts, [merged] if merged else [], baselines))]
        lines += ["", *self.serving_lines()]
        lines += [
            "",
            f"published: {mstatus.uri} (revision {mstatus.revision}); pointer {artifacts.current_uri(self.layout.merged_uri)}",
            "the system keeps running: `langmerge status`, `langmerge history dialog-pt`, `langmerge cost`; stop with `make down`.",
            f"what the models answer: `langmerge try {sample_merged(self.layout)['metadata']['name']}` "
            "(held-out inputs of each language: base, expert and merged model side by side)",
            f'add a language ({ADDED_DATA_FILE} ships for it) or remove one: README, "{WALKTHROUGH}"',
        ]
        return "\n".join(lines)

    def serving_lines(self) -> list[str]:
        """Where the published revision is served, what it answers, and a curl line to ask it."""
        from langmerge.served import ServedError, describe, predict, predict_url

        s = self.serving()
        if s is None:
            return ["serving: not served (no InferenceService; see README, Serving)"]
        lines = [f"serving: InferenceService {SERVED}: {s.phase} revision {s.revision} at {s.url}"]
        if not s.url:
            return lines
        try:
            answer = predict(s.url, SERVED, [SERVED_PROMPT], max_new_tokens=16)
            lines.append(
                f"  asked {SERVED_PROMPT!r}: {describe(answer.predictions[0])!r} (answered by {answer.revision}, "
                f"merge {answer.model_version})"
            )
        except ServedError as err:
            lines.append(f"  asking it failed: {err}")
        body = json.dumps({"instances": [{"text": SERVED_PROMPT}]}, ensure_ascii=False)
        lines.append(f"  curl -s {predict_url(s.url, SERVED)} -H 'Content-Type: application/json' -d '{body}'")
        lines.append(
            f"  or: langmerge try {sample_merged(self.layout)['metadata']['name']} --served -i '{SERVED_PROMPT}'"
        )
        return lines


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def up(
    state: Path,
    *,
    kubeconfig: str | None = None,
    namespace: str = "default",
    parallel: int = 2,
    timeout: float = 1800.0,
    run_operator: bool = True,
    quick: bool = False,
) -> int:
    """``quick``: the same story on a smaller sample (a shorter pre-training of a narrower base model, 2 epochs per
    expert), for CI; the figures are worse.

    Steps: a cluster (the local control plane unless ``kubeconfig``), S3 and the Secret, the operator and the local
    Job runner, the sample applied, then the story: revision 1, new data for one language, revision 2."""
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    env = dict(os.environ)
    kubeconfig, local = _cluster(state, kubeconfig, env)
    kube = Kube(load_client(kubeconfig))
    install_crds(kube.api)
    store = ObjectStore.from_config(
        S3Config(endpoint_url=env.get("LANGMERGE_S3_ENDPOINT") or None),
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    serving = local or _serves_inference_services(kube)
    if local:
        from langmerge.dev.serving import inferenceservice_crd

        install_crds(kube.api, [inferenceservice_crd()])  # the local stand-in for KServe serves it
    demo = Demo(state=state, kube=kube, store=store, env=env, namespace=namespace)
    demo.prepare_storage()
    demo.ensure_secret()
    _start_services(
        state,
        env,
        kubeconfig,
        namespace=namespace,
        parallel=parallel,
        run_operator=run_operator,
        local=local,
        serving=serving,
    )
    print(
        f"operator, local Job runner{' and local serving runner' if local else ''} running (logs in {state / 'logs'})"
    )
    _apply_sample(demo, quick, serving=serving)
    _story(demo, timeout, t0, serving=serving)
    return 0


def _serves_inference_services(kube: Kube) -> bool:
    """Whether the cluster has KServe's InferenceService API (the sample is then served)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.ApiextensionsV1Api(kube.api).read_custom_resource_definition(f"{ISVC_PLURAL}.{KSERVE_GROUP}")
    except ApiException:
        return False
    return True


def _cluster(state: Path, kubeconfig: str | None, env: dict[str, str]) -> tuple[str, bool]:
    """The kubeconfig to use and whether it is the local control plane (started here; its endpoints go into
    ``env``)."""
    from langmerge.dev.controlplane import ControlPlane

    if kubeconfig is None:
        print("starting the local control plane (kube-apiserver, etcd, kube-controller-manager, SeaweedFS S3) ...")
        endpoints = ControlPlane(state).start()
        env.update(endpoints.env())
        return endpoints.kubeconfig, True
    env["KUBECONFIG"] = kubeconfig
    for var in ("LANGMERGE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if var not in env and var != "LANGMERGE_S3_ENDPOINT":
            raise DemoError(f"{var} must be set to reach S3 when using --kubeconfig")
    return kubeconfig, False


def _start_services(
    state: Path,
    env: dict[str, str],
    kubeconfig: str,
    *,
    namespace: str,
    parallel: int,
    run_operator: bool,
    local: bool,
    serving: bool,
) -> None:
    """The operator (unless ``run_operator`` is false) and, on the local control plane, the local Job runner and the
    local serving runner (what stands in for KServe: a model-server process per predictor revision, behind a
    traffic-splitting router on 127.0.0.1)."""
    services = Services(state)
    operator_env = {
        **env,
        "LANGMERGE_ARTIFACTS_URI": DEFAULT_LAYOUT.artifacts_uri,
        "LANGMERGE_URI_GRANTS": DEFAULT_LAYOUT.uri_grants(namespace),
        "LANGMERGE_S3_ENDPOINT": env.get("LANGMERGE_S3_ENDPOINT", ""),
        "LANGMERGE_METRICS_PORT": "0",
        "LANGMERGE_RESYNC_SECONDS": "15",
        "LANGMERGE_PROGRESS_SECONDS": "2",
        "LANGMERGE_MAX_TRAINING_JOBS": str(parallel),
        "LANGMERGE_KSERVE": "true" if serving else "false",
        "LANGMERGE_SERVING_POLL_SECONDS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if run_operator:
        services.start(
            "operator", [sys.executable, "-m", "langmerge.cli", "run", "--namespace", namespace], operator_env
        )
    if local:
        cache = state / "cache"
        (cache / "home").mkdir(parents=True, exist_ok=True)
        services.start(
            "jobrunner",
            [
                sys.executable,
                "-m",
                "langmerge.cli",
                "--state",
                str(state),
                "jobrunner",
                "--kubeconfig",
                kubeconfig,
                "--parallel",
                str(parallel),
                "--work-dir",
                str(state / "jobs"),
                "--env",
                f"LANGMERGE_MODEL_CACHE={cache / 'models'}",
                "--env",
                f"HOME={cache / 'home'}",
                "--env",
                "TMPDIR=/tmp",
                "--env",
                "OMP_NUM_THREADS=1",
                "--env",
                "TOKENIZERS_PARALLELISM=false",
            ],
            {**env, "PYTHONUNBUFFERED": "1"},
        )
        services.start(
            "serving",
            [
                sys.executable,
                "-m",
                "langmerge.dev.serving",
                "--kubeconfig",
                kubeconfig,
                "--work-dir",
                str(state / "serving"),
                "--env",
                f"LANGMERGE_MODEL_CACHE={cache / 'models'}",
                "--env",
                f"HOME={cache / 'home'}",
                "--env",
                "OMP_NUM_THREADS=1",
                "--env",
                "TOKENIZERS_PARALLELISM=false",
            ],
            {**env, "PYTHONUNBUFFERED": "1"},
        )


def _apply_sample(demo: Demo, quick: bool, *, serving: bool) -> None:
    """The sample's data, its LanguageExperts, its InferenceService and its MergedModel."""
    demo.seed(*(QUICK_SEED_ARGS if quick else ()))
    for doc in sample_experts():
        if quick and doc["metadata"]["name"] != TRUNK:
            doc["spec"]["training"]["epochs"] = QUICK_EPOCHS
        demo.apply(doc)
    if serving:
        demo.apply(sample_inference_service())
    demo.apply(sample_merged(serving=serving))
    print(
        f"applied the trunk {TRUNK}, {len(LANGUAGES)} LanguageExperts starting from it ({', '.join(LANGUAGES)}), "
        + (f"InferenceService {SERVED} " if serving else "")
        + f"and MergedModel {sample_merged()['metadata']['name']}"
    )


def _story(demo: Demo, timeout: float, t0: float, *, serving: bool) -> None:
    """Revision 1 from three experts; new data for one language; revision 2 from one retrained expert. Served:
    each revision rolled out to the sample's InferenceService (revision 2 as a canary first)."""
    demo.watch(
        lambda: demo.revision() >= 1,
        "training the trunk, then 3 language experts from it, then merging (revision 1)",
        timeout,
    )
    if serving:
        demo.watch(lambda: demo.serves(1), f"rolling revision 1 out to InferenceService {SERVED}", timeout)
        print("\n".join(demo.serving_lines()))
    trained_before = len(demo.training_jobs())
    merges_before = len(demo.merge_jobs())
    update_now = not demo.maintenance_applied()
    if update_now:
        demo.add_data()
    else:
        print("maintenance data already applied (state from an earlier run)")
    demo.watch(
        lambda: demo.revision() >= 2,
        f"new {UPDATED_LANGUAGE} data: retraining one expert, re-merging (revision 2)",
        timeout,
    )
    if serving:
        demo.watch(
            lambda: demo.serves(2),
            f"rolling revision 2 out to InferenceService {SERVED}: a {SAMPLE_KSERVE['canaryTrafficPercent']}% canary, "
            f"promoted after {SAMPLE_KSERVE['promoteAfter']}",
            timeout,
        )
    print(demo.summary())
    new_training = len(demo.training_jobs()) - trained_before
    new_merges = len(demo.merge_jobs()) - merges_before
    if update_now:
        print(
            f"\nmaintenance update: {new_training} training Job(s) for 1 of {len(LANGUAGES)} languages and {new_merges} "
            f"merge Job(s); total time {time.monotonic() - t0:.0f}s"
        )
    else:
        print(
            f"\nthe sample ran before: this run started {new_training} training and {new_merges} merge Job(s) "
            f"(everything came back from etcd and S3); total time {time.monotonic() - t0:.0f}s"
        )


def down(state: Path) -> int:
    from langmerge.dev.controlplane import ControlPlane

    state = state.resolve()
    services = Services(state)
    for name in ("serving", "jobrunner", "operator"):
        services.stop(name)
    ControlPlane(state).stop()
    print(f"stopped; state kept in {state} (remove it to start from scratch)")
    return 0
