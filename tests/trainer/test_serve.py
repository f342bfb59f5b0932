"""``langmerge-trainer serve``: the real server process serves a published revision from the real local S3.

Merge prefixes are published as the merge Job leaves them (``model/``, then ``manifest.json``), with tiny models and
random (non-zero) adapters, so the served answers can be checked against the same folders loaded in this process.
One is also served from a local copy, as KServe's storage initializer leaves it in ``/mnt/models``. The servers start
together (each takes seconds to import torch and load) and are stopped at the end of the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import new_bucket, upload_model

from langmerge import artifacts
from langmerge.api.expert import Metrics
from langmerge.artifacts import (
    AdapterManifest,
    BaseModelIdentity,
    Cost,
    MergeInputRecord,
    MergeManifest,
    Versions,
    utcnow,
)
from langmerge.store import ObjectStore
from langmerge_trainer.evaluate import peft_compat
from langmerge_trainer.serve import LoadError, main, resolve

LABELS = ["money", "science"]
PROMPTS = ["Hola, ¿cómo estás?", "Buongiorno a tutti"]
#: Seconds a server may take to answer ready (imports and loading on a busy 2-core machine).
READY_TIMEOUT = 120.0
#: 127.0.0.1 as /proc/net/tcp and /proc/net/tcp6 show it.
LOOPBACK = "0100007F"
LOOPBACK_V4_MAPPED = "0000000000000000FFFF00000100007F"
FP_CAUSAL = "c" * 16
FP_CLASSIFIER = "d" * 16
FP_BROKEN = "e" * 16


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: Where a merge Job's run uploads the model inside the merge prefix (its manifest's ``model_uri`` names it).
RUN_MODEL = "attempts/1-0a1b2c3d/model"


def _manifest(
    prefix: str, base: BaseModelIdentity, output_format: str, inputs: list[MergeInputRecord] | None = None
) -> MergeManifest:
    return MergeManifest(
        fingerprint=prefix.rsplit("/", 1)[1],
        namespace="ns",
        name="dialog",
        method="ties",
        parameters={},
        inputs=inputs or [],
        base_model=base,
        output_format=output_format,
        model_uri=artifacts.join(prefix, RUN_MODEL),
        model_digest="x",
        files={},
        cost=Cost(wall_seconds=1.0),
        versions=Versions(langmerge="test"),
        started_at=utcnow(),
        finished_at=utcnow(),
    )


def _publish(s3: ObjectStore, prefix: str, folder: Path, manifest: MergeManifest) -> str:
    """The merge Job's commit: the model folder first, the manifest last."""
    s3.upload_dir(folder, manifest.model_uri)
    s3.put_json(artifacts.join(prefix, artifacts.MANIFEST), manifest, if_none_match=True)
    return prefix


def _adapter_record(adapter_uri: str, base: BaseModelIdentity, labels: list[str]) -> AdapterManifest:
    """An input expert's commit record, as far as serving reads it (its task type, labels, maxSeqLength)."""
    return AdapterManifest(
        fingerprint="a" * 16,
        namespace="ns",
        name="topic-it",
        language="it",
        task="topic",
        task_type="sequence-classification",
        labels=labels,
        base_model=base,
        data_digest="d",
        adapter_uri=adapter_uri,
        adapter_digest="a",
        files={},
        lora={},
        training={"max_seq_length": 64},
        metrics=Metrics(accuracy=0.5, examples=2),
        examples_train=2,
        examples_eval=2,
        tokens_trained=10,
        steps=1,
        cost=Cost(wall_seconds=1.0),
        versions=Versions(langmerge="test"),
        started_at=utcnow(),
        finished_at=utcnow(),
    )


def _random_lora(model: Any, out: Path, seed: int, **lora: Any) -> Path:
    """``model`` with a random LoRA adapter (non-zero B, random head rows), saved with PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with peft_compat():
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(out)
    return out


@dataclass
class Server:
    name: str
    storage_uri: str
    http_port: int
    grpc_port: int
    process: subprocess.Popen[bytes]
    started: float
    #: The server's stderr (and stdout).
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return err.code

    def wait_ready(self) -> float:
        """Seconds from start until ``/v2/models/NAME/ready`` answers 200; fails if the process ends first."""
        deadline = self.started + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server {self.name} exited with {self.process.returncode}: {self.stderr()}")
            try:
                if self.get(f"/v2/models/{self.name}/ready") == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server {self.name} not ready after {READY_TIMEOUT}s")

    def predict(self, body: Any, content_type: str = "application/json") -> tuple[int, Any]:
        request = urllib.request.Request(
            f"{self.url}/v1/models/{self.name}:predict",
            data=json.dumps(body).encode(),
            headers={"content-type": content_type},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return int(resp.status), json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start(name: str, storage_uri: str, log_dir: Path) -> Server:
    http_port, grpc_port = _free_port(), _free_port()
    command = [sys.executable, "-m", "langmerge_trainer", "serve", "--model-name", name, "--storage-uri", storage_uri]
    command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port), "--device", "cpu"]
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return Server(name, storage_uri, http_port, grpc_port, process, time.monotonic(), log)


@dataclass
class World:
    bucket: str
    base: BaseModelIdentity
    causal_adapter: Path
    bert: Path
    bert_identity: BaseModelIdentity
    classifier_adapter: Path
    #: A local copy of the classifier's merge prefix (manifest.json + model/), as KServe downloads it.
    local_topic: Path
    servers: dict[str, Server]


@pytest.fixture(scope="module")
def world(
    s3: ObjectStore,
    base_env: tuple[str, BaseModelIdentity],
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    from transformers import AutoModelForCausalLM

    from langmerge_trainer.classify import load_classifier
    from langmerge_trainer.sample import build_tiny_bert, sample_texts

    bucket, base = base_env
    tmp = tmp_path_factory.mktemp("serve")
    merges = f"s3://{bucket}/dialog/merges"
    servers: dict[str, Server] = {}

    try:  # the servers end with the module, also when a later step of this setup fails
        # (c) first: a merge whose weights are garbage, published as full weights; it fails while the others load.
        broken = tmp / "broken"
        broken.mkdir()
        (broken / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
        (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a safetensors header at all")
        _publish(s3, f"{merges}/{FP_BROKEN}", broken, _manifest(f"{merges}/{FP_BROKEN}", base, "full-weights"))
        servers["broken"] = _start("broken", f"{merges}/{FP_BROKEN}", tmp)

        # (a) a causal LM: a PEFT adapter merge on the tiny Llama.
        causal = _random_lora(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp / "causal", 3, target_modules=["q_proj", "v_proj"]
        )
        _publish(s3, f"{merges}/{FP_CAUSAL}", causal, _manifest(f"{merges}/{FP_CAUSAL}", base, "peft-adapter"))
        servers["dialog"] = _start("dialog", f"{merges}/{FP_CAUSAL}", tmp)

        # (b) a sequence classifier: a PEFT adapter (LoRA + its head) on a tiny BERT; the labels are the input expert's.
        bert = build_tiny_bert(tmp / "bert", sample_texts(["it"]))
        bert_identity = upload_model(s3, bert, f"s3://{bucket}/models/tiny-bert")
        classifier = _random_lora(
            load_classifier(bert, LABELS, torch.device("cpu"), pad_token_id=None),
            tmp / "classifier",
            5,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        )
        expert_prefix = f"s3://{bucket}/artifacts/experts/ns/topic-it/{'a' * 16}"
        s3.upload_dir(classifier, artifacts.adapter_uri(expert_prefix))
        record = _adapter_record(artifacts.adapter_uri(expert_prefix), bert_identity, LABELS)
        s3.put_json(artifacts.join(expert_prefix, artifacts.MANIFEST), record)
        inputs = [
            MergeInputRecord(expert="topic-it", language="it", adapter_uri=record.adapter_uri, adapter_digest="a")
        ]
        topic = f"s3://{bucket}/topic/merges/{FP_CLASSIFIER}"
        _publish(s3, topic, classifier, _manifest(topic, bert_identity, "peft-adapter", inputs))
        servers["topic"] = _start("topic", topic, tmp)

        # (d) the same merge from a local folder: the base model and the labels still come from S3.
        local_topic = tmp / "mnt-models"
        s3.download_prefix(topic, local_topic)
        servers["topic-local"] = _start("topic-local", str(local_topic), tmp)

        yield World(bucket, base, causal, bert, bert_identity, classifier, local_topic, servers)
    finally:
        for server in servers.values():
            server.stop()


def _listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* shows them) that listen on ``port``."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():  # no IPv6
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                found.add(address)
    return found


def test_a_causal_lm_adapter_merge_answers_like_its_folders(world: World, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from langmerge_trainer.evaluate import load_tokenizer
    from langmerge_trainer.tryout import generate

    server = world.servers["dialog"]
    print(f"dialog ready after {server.wait_ready():.1f}s")
    assert server.get("/v2/health/ready") == 200
    status, body = server.predict(
        {"instances": [PROMPTS[0], {"text": PROMPTS[1]}], "parameters": {"max_new_tokens": 6}}
    )
    assert status == 200, body
    assert body["model_version"] == FP_CAUSAL
    assert [set(p) for p in body["predictions"]] == [{"generated_text"}] * 2

    tokenizer = load_tokenizer(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with peft_compat():
        merged = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(world.causal_adapter)
        )
    expected = [generate(merged.eval(), tokenizer, prompt, 6) for prompt in PROMPTS]
    assert [p["generated_text"] for p in body["predictions"]] == expected
    assert expected != [generate(base, tokenizer, prompt, 6) for prompt in PROMPTS], "the adapter should change some"

    # the default length, and what a bad request gets
    status, body = server.predict({"instances": [PROMPTS[0]]})
    assert status == 200 and body["predictions"][0]["generated_text"] == generate(merged, tokenizer, PROMPTS[0], 32)
    assert server.predict({"instances": "not a list"})[0] == 400
    assert server.predict({"instances": [PROMPTS[0]], "parameters": {"max_new_tokens": 0}})[0] == 400
    # both servers listen on the loopback interface only (gRPC on an IPv6 socket, as ::ffff:127.0.0.1)
    assert _listening_addresses(server.http_port) == {LOOPBACK}
    assert _listening_addresses(server.grpc_port) <= {LOOPBACK, LOOPBACK_V4_MAPPED}
    assert _listening_addresses(server.grpc_port)


def test_a_classifier_adapter_merge_answers_labels_and_probabilities(world: World) -> None:
    from peft import PeftModel

    from langmerge_trainer.evaluate import load_tokenizer
    from langmerge_trainer.merge.evaluation import load_model
    from langmerge_trainer.tryout import classify

    server = world.servers["topic"]
    print(f"topic ready after {server.wait_ready():.1f}s")
    texts = ["Il prezzo delle azioni è salito", "La cellula si divide in due"]
    # a body sent as text/plain reaches the model as bytes: decoded the same way
    status, body = server.predict({"instances": texts}, content_type="text/plain")
    assert status == 200, body
    assert body["model_version"] == FP_CLASSIFIER
    predictions = body["predictions"]
    assert [set(p) for p in predictions] == [{"label", "probability"}] * 2
    assert all(p["label"] in LABELS and 0.5 <= p["probability"] <= 1.0 for p in predictions)

    with peft_compat():
        model = PeftModel.from_pretrained(
            load_model(world.bert, torch.device("cpu"), LABELS), str(world.classifier_adapter)
        ).eval()
    tokenizer = load_tokenizer(world.bert)
    assert [f"{p['label']} ({p['probability']:.2f})" for p in predictions] == [
        classify(model, tokenizer, text, LABELS, 64) for text in texts
    ]


def test_a_local_copy_of_a_merge_prefix_answers_as_the_s3_one(world: World) -> None:
    texts = ["Il prezzo delle azioni è salito", "La cellula si divide in due", "Buongiorno a tutti"]
    local, remote = world.servers["topic-local"], world.servers["topic"]
    print(f"topic-local ready after {local.wait_ready():.1f}s")
    remote.wait_ready()
    status, body = local.predict({"instances": texts})
    assert status == 200, body
    assert body["model_version"] == FP_CLASSIFIER
    assert body == remote.predict({"instances": texts})[1]
    assert _listening_addresses(local.http_port) == {LOOPBACK}  # the default --host


def test_broken_weights_end_the_server_before_it_is_ready(world: World) -> None:
    server = world.servers["broken"]
    deadline = server.started + READY_TIMEOUT
    while server.process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            assert server.get(f"/v2/models/{server.name}/ready") != 200, "a server that cannot load answered ready"
        time.sleep(0.2)
    print(f"broken: exit {server.process.returncode} after {time.monotonic() - server.started:.1f}s")
    assert server.process.returncode == 4
    last = server.stderr().strip().splitlines()[-1]
    assert last.startswith(f"langmerge-trainer serve: cannot load {server.storage_uri}: "), last
    assert "safetensors" in last.lower() or "header" in last.lower(), last
    assert not _listening_addresses(server.http_port) and not _listening_addresses(server.grpc_port)


# -- what a storage URI resolves to (no server) -------------------------------------------------------------------------
def test_a_plain_model_folder_is_served_as_full_weights_with_its_config_labels(
    s3: ObjectStore, world: World, tmp_path: Path
) -> None:
    from langmerge_trainer.classify import load_classifier

    folder = tmp_path / "full"
    load_classifier(world.bert, LABELS, torch.device("cpu"), pad_token_id=None).save_pretrained(folder)
    uri = f"s3://{world.bucket}/plain/model"
    s3.upload_dir(folder, uri)
    published = resolve(s3, uri + "/")
    assert published.model_uri == uri and published.base is None
    assert published.labels == LABELS and published.version == s3.prefix_digest(uri)[0]
    assert published.max_seq_length == 256  # the tiny BERT's position embeddings

    causal = resolve(s3, f"s3://{world.bucket}/dialog/merges/{FP_CAUSAL}")
    assert causal.labels is None and causal.base == world.base and causal.version == FP_CAUSAL

    # the same folder on local disk: loaded in place, without S3; its version a digest of its file names and sizes
    def no_s3() -> ObjectStore:
        raise AssertionError("a local full-weights folder needs nothing from S3")

    here = resolve(no_s3, f"{folder}/")
    assert here.model_dir == folder and here.base is None and here.labels == LABELS and here.max_seq_length == 256
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    assert resolve(no_s3, f"file://{copy}").version == here.version == here.model_digest
    (copy / "extra.txt").write_text("x")
    assert resolve(no_s3, str(copy)).version != here.version


def test_a_local_merge_prefix_loads_its_model_folder_in_place(s3: ObjectStore, world: World) -> None:
    local = resolve(s3, f"file://{world.local_topic}")
    remote = resolve(s3, f"s3://{world.bucket}/topic/merges/{FP_CLASSIFIER}")
    assert local.model_dir == world.local_topic / RUN_MODEL and local.model_uri == str(world.local_topic / RUN_MODEL)
    assert remote.model_dir is None
    assert (local.version, local.base, local.labels, local.max_seq_length) == (
        remote.version,
        remote.base,
        remote.labels,
        remote.max_seq_length,
    )
    assert local.version == FP_CLASSIFIER and local.labels == LABELS and local.base == world.bert_identity


def test_a_local_folder_with_neither_manifest_nor_config_ends_the_server_with_4(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "README.md").write_text("no model here")
    # the real entry point, and whether torch was imported on the way to the failure (it should not be)
    probe = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr))\n"
        "runpy.run_module('langmerge_trainer', run_name='__main__', alter_sys=True)\n"
    )
    uri = f"file://{folder}"
    ports = ["--http-port", str(_free_port()), "--grpc-port", str(_free_port())]
    result = subprocess.run(
        [sys.executable, "-c", probe, "serve", "--model-name", "m", "--storage-uri", uri, *ports],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 4, result.stderr
    *_, reason, torch_imported = result.stderr.strip().splitlines()
    assert reason == (
        f"langmerge-trainer serve: cannot load {uri}: "
        f"{folder} holds neither a merge (manifest.json) nor a model folder (config.json)"
    ), result.stderr
    assert torch_imported == "torch imported: False"


def test_what_the_command_line_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # main sets it when unset
    common = ["--model-name", "m", "--http-port", str(_free_port()), "--grpc-port", str(_free_port())]
    assert main([*common, "--storage-uri", str(tmp_path / "absent")]) == 4
    assert capsys.readouterr().err.strip().endswith(f"there is no folder {tmp_path / 'absent'}")
    assert main([*common, "--storage-uri", "gs://bucket/model"]) == 2
    assert "--storage-uri must be an s3:// URI or a local folder" in capsys.readouterr().err
    assert main([*common, "--storage-uri", "file://host/models"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--storage-uri", str(tmp_path), "--host", "every-interface"])
    assert exit_info.value.code == 2
    assert "is not an IP address" in capsys.readouterr().err


def test_a_classifier_merge_whose_labels_are_recorded_nowhere_cannot_load(s3: ObjectStore, world: World) -> None:
    bucket = new_bucket(s3)
    prefix = f"s3://{bucket}/topic/merges/{'f' * 16}"
    gone = [MergeInputRecord(expert="x", language="it", adapter_uri=f"s3://{bucket}/gone/adapter", adapter_digest="a")]
    _publish(s3, prefix, world.classifier_adapter, _manifest(prefix, world.bert_identity, "peft-adapter", gone))
    with pytest.raises(LoadError, match="name the labels"):
        resolve(s3, prefix)
    with pytest.raises(LoadError, match="neither a merge"):
        resolve(s3, f"s3://{bucket}/nothing/here")
