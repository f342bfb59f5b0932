"""The base-model cache: one download per digest, never a half-downloaded folder, safe when processes race."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_helpers import new_bucket

from langmerge.store import ObjectStore
from langmerge_trainer.modelcache import MARKER, ModelDigestMismatch, ensure_model


@pytest.fixture
def model_uri(s3: ObjectStore) -> str:
    bucket = new_bucket(s3)
    uri = f"s3://{bucket}/models/m"
    s3.put_bytes(f"{uri}/config.json", b'{"a": 1}')
    s3.put_bytes(f"{uri}/weights/part-0.bin", bytes(range(256)) * 64)
    return uri


def test_downloads_once_and_marks_completion(s3: ObjectStore, model_uri: str, tmp_path: Path) -> None:
    digest, _ = s3.prefix_digest(model_uri)
    folder = ensure_model(s3, model_uri, digest, cache_dir=tmp_path)
    assert folder == tmp_path / digest
    assert (folder / "weights" / "part-0.bin").read_bytes() == bytes(range(256)) * 64
    assert json.loads((folder / MARKER).read_text())["files"] == ["config.json", "weights/part-0.bin"]
    assert not list((tmp_path / ".partial").iterdir())
    # Cached: the S3 objects are not read again.
    s3.delete_prefix(model_uri)
    assert ensure_model(s3, model_uri, digest, cache_dir=tmp_path) == folder


def test_a_folder_without_marker_is_not_used(s3: ObjectStore, model_uri: str, tmp_path: Path) -> None:
    digest, _ = s3.prefix_digest(model_uri)
    half = tmp_path / digest
    half.mkdir(parents=True)
    (half / "config.json").write_text("truncat")
    # An interrupted download left a partial file: it is resumed, not trusted as is.
    partial = tmp_path / ".partial" / digest / "weights"
    partial.mkdir(parents=True)
    (partial / "part-0.bin.part").write_bytes((bytes(range(256)) * 64)[:1000])
    folder = ensure_model(s3, model_uri, digest, cache_dir=tmp_path)
    assert (folder / "config.json").read_text() == '{"a": 1}'
    assert (folder / "weights" / "part-0.bin").read_bytes() == bytes(range(256)) * 64


def test_changed_model_is_refused(s3: ObjectStore, model_uri: str, tmp_path: Path) -> None:
    with pytest.raises(ModelDigestMismatch, match="changed after"):
        ensure_model(s3, model_uri, "0123456789abcdef", cache_dir=tmp_path)
    assert not (tmp_path / "0123456789abcdef").exists()


def test_racing_processes_share_one_download(s3: ObjectStore, model_uri: str, tmp_path: Path) -> None:
    digest, _ = s3.prefix_digest(model_uri)
    code = (
        "import sys; from pathlib import Path; from langmerge.store import ObjectStore;"
        "from langmerge_trainer.modelcache import ensure_model;"
        f"print(ensure_model(ObjectStore.from_config(), {model_uri!r}, {digest!r}, cache_dir=Path({str(tmp_path)!r})))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert {out.strip() for out, _err in outputs} == {str(tmp_path / digest)}
    assert (tmp_path / digest / MARKER).is_file()
