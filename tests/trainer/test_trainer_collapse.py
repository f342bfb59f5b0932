"""No collapsed adapter is ever committed (issue 21, item 2): the trainer judges the adapter on its eval split
(:mod:`langmerge_trainer.collapse`) before the commit. A collapsed one is not committed; the attempt's failure record
says ``Collapsed``, what collapsed and the seed; its checkpoints go; the trainer exits with the retryable status; the
next attempt of the fingerprint trains with ``seed + 1000`` (counted from the failure records in S3).

Real tiny models, real S3: a tiny BERT-like classifier driven to collapse by a learning rate far too high, and the
tiny Llama driven above its base's loss the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import make_task, new_bucket, put_jsonl, sample_pairs, upload_model

from langmerge.api.expert import LanguageExpertSpec
from langmerge.artifacts import (
    COLLAPSED,
    MANIFEST,
    RESEED_STEP,
    BaseModelIdentity,
    FailureRecord,
    checkpoints_uri,
    failure_uri,
    join,
)
from langmerge.constants import EXIT_FAILED
from langmerge.store import ObjectStore
from langmerge.tasks import TrainTask
from langmerge_trainer.bench.workloads import topic_data
from langmerge_trainer.train import Collapsed, run_train_task

LABELS = ["money", "science"]
SEED = 5
#: Settings under which the tiny classifier learns: the next attempt's.
SANE: dict[str, Any] = {"learningRate": 2e-2}
#: A learning rate far too high: the classifier ends up predicting one label for every input.
WILD: dict[str, Any] = {"learningRate": 1.0, "warmupRatio": 0.0}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from langmerge_trainer.sample import build_tiny_bert

    texts = [r["text"] for r in topic_data("it", LABELS).train]
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts)


@pytest.fixture(scope="module")
def env(s3: ObjectStore, tiny_bert: Path) -> tuple[str, BaseModelIdentity]:
    bucket = new_bucket(s3)
    base = upload_model(s3, tiny_bert, f"s3://{bucket}/models/tiny-bert")
    rows = _balanced(topic_data("it", LABELS).train)
    put_jsonl(s3, f"s3://{bucket}/data/it/part-0.jsonl", rows)
    # The tiny random encoder cannot generalise: it is judged on its training examples (balanced enough: no label
    # is 80% of them), where a healthy adapter spreads its predictions and a collapsed one does not.
    put_jsonl(s3, f"s3://{bucket}/eval/it/part-0.jsonl", rows)
    return bucket, base


def _balanced(rows: list[dict[str, str]], per_label: int = 36) -> list[dict[str, str]]:
    """The first ``per_label`` rows of each label: a model that predicts one label is then wrong on two thirds."""
    return [row for label in LABELS for row in [r for r in rows if r["label"] == label][:per_label]]


def _classifier_task(
    bucket: str, base: BaseModelIdentity, fp: str, training: dict[str, Any], attempt: int = 1
) -> TrainTask:
    spec = LanguageExpertSpec.model_validate(
        {
            "language": "it",
            "task": "topic",
            "taskType": "sequence-classification",
            "labels": LABELS,
            "baseModel": {"uri": base.uri},
            "dataset": {"uri": f"s3://{bucket}/data/it", "evalUri": f"s3://{bucket}/eval/it"},
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["query", "value", "dense"]},
            "training": {
                "epochs": 8,
                "batchSize": 8,
                "maxSeqLength": 48,
                "seed": SEED,
                "checkpointEverySteps": 5,
                **training,
            },
            "resources": {"gpus": 0},
        }
    )
    return TrainTask(
        fingerprint=fp,
        output_uri=f"s3://{bucket}/artifacts/experts/default/topic-it/{fp}",
        namespace="default",
        name="topic-it",
        spec=spec,
        base_model=base,
        data_digest="d" * 16,
        image="langmerge/trainer:test",
        attempt=attempt,
    )


def _train_cli(task: TrainTask, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The training Job's command, as a process: its exit status is what the Job's podFailurePolicy sees."""
    task_file = tmp_path / f"task-{task.attempt}.json"
    task_file.write_text(task.to_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LANGMERGE_S3_RETRY_SECONDS": "5"}
    cmd = [sys.executable, "-m", "langmerge_trainer", "train", "--task", f"@{task_file}", "--device", "cpu"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _record(s3: ObjectStore, task: TrainTask, attempt: int) -> FailureRecord:
    return FailureRecord.model_validate(s3.get_json(failure_uri(task.output_uri, attempt)))


def test_a_collapsed_classifier_is_not_committed_and_the_next_attempt_trains_with_another_seed(
    s3: ObjectStore, env: tuple[str, BaseModelIdentity], tmp_path: Path
) -> None:
    bucket, base = env
    fp = "collapse00000001"
    first = _classifier_task(bucket, base, fp, WILD)
    result = _train_cli(first, tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == EXIT_FAILED, log[-4000:]  # retryable: the operator starts another attempt
    assert "checkpoint at step 5" in log  # the run did write checkpoints on its way

    # Nothing committed, nothing uploaded, no checkpoint left to resume the collapsed run from.
    assert not s3.exists(join(first.output_uri, MANIFEST))
    assert s3.list_objects(join(first.output_uri, "attempts")) == []
    assert s3.list_objects(checkpoints_uri(first.output_uri)) == []
    record = _record(s3, first, 1)
    assert record.error_class == COLLAPSED and record.retryable and record.attempt == 1
    assert record.seed == SEED and f"seed {SEED}" in record.message
    assert "collapsed" in record.message and "predicts " in record.message, record.message

    # Another pod of the same Job (backoffLimit) does not train the collapsed attempt again with the same seed.
    with pytest.raises(Collapsed, match=f"seed {SEED}"):
        run_train_task(first, s3, device="cpu")
    assert _record(s3, first, 1).error_class == COLLAPSED

    # The next attempt (sane settings here, so that it commits) trains with seed + 1000 and commits.
    second = _classifier_task(bucket, base, fp, SANE, attempt=2)
    manifest = run_train_task(second, s3, device="cpu")
    assert manifest.seed == SEED + RESEED_STEP
    assert manifest.training["seed"] == SEED  # the spec's own seed, as the fingerprint knows it
    predictions = manifest.metrics.predictions or {}
    assert max(predictions.values()) < 0.8 * sum(predictions.values()), predictions
    assert s3.exists(join(second.output_uri, MANIFEST))
    assert not s3.exists(failure_uri(second.output_uri, 2))


def test_collapse_check_off_commits_what_was_trained(
    s3: ObjectStore, env: tuple[str, BaseModelIdentity], tmp_path: Path
) -> None:
    bucket, base = env
    task = _classifier_task(bucket, base, "collapse00000002", {**WILD, "collapseCheck": False})
    manifest = run_train_task(task, s3, device="cpu")
    predictions = manifest.metrics.predictions or {}
    assert max(predictions.values()) >= 0.8 * sum(predictions.values()), predictions  # collapsed, and committed
    assert manifest.seed == SEED


def test_a_causal_lm_not_below_its_base_is_not_committed(s3: ObjectStore, tiny_model_dir: Path, tmp_path: Path) -> None:
    bucket = new_bucket(s3)
    base = upload_model(s3, tiny_model_dir, f"s3://{bucket}/models/tiny-llama")
    data_uri = f"s3://{bucket}/data/es"
    put_jsonl(s3, f"{data_uri}/part-0.jsonl", [p.row() for p in sample_pairs("es", 48)])
    task = make_task(
        bucket=bucket,
        base=base,
        data_uri=data_uri,
        fingerprint="collapse0000lm01",
        training={"epochs": 1, "learningRate": 1.0, "warmupRatio": 0.0},
    )
    with pytest.raises(Collapsed) as caught:
        run_train_task(task, s3, device="cpu")
    assert "not below the base model's" in str(caught.value) and "seed 7" in str(caught.value)
    assert not s3.exists(join(task.output_uri, MANIFEST))
    record = _record(s3, task, 1)
    assert record.error_class == COLLAPSED and record.retryable and record.seed == 7
