"""``merge-local CONFIG OUT``: end to end with s3:// inputs on the real local S3 server, dry run, no-op second run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from merge_helpers import PEFT_DEPRECATION, make_adapters, make_classifier_adapters, make_tiny_encoder

from langmerge.artifacts import MANIFEST, MergeManifest
from langmerge.store import ObjectStore
from langmerge_trainer.merge.cli import main

pytestmark = pytest.mark.filterwarnings(PEFT_DEPRECATION)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("cli-adapters"))


def write_config(path: Path, config: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_merge_local_with_s3_inputs_then_a_no_op_rerun(
    s3: ObjectStore,
    bucket: str,
    tiny_model_dir: Path,
    adapter_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s3.upload_dir(tiny_model_dir, f"s3://{bucket}/models/tiny")
    for lang, folder in adapter_dirs.items():
        s3.upload_dir(folder, f"s3://{bucket}/experts/{lang}/adapter")
    config = write_config(
        tmp_path / "merge.yaml",
        {
            "name": "es-it-pt",
            "baseModel": f"s3://{bucket}/models/tiny",
            "adapters": [{"language": lang, "path": f"s3://{bucket}/experts/{lang}/adapter"} for lang in adapter_dirs],
            "method": "knots",
            "parameters": {"knotsMerge": "ties", "density": 0.8, "lambda": 1.0, "weights": {"it": 0.5}},
            "output": {"format": "peft-adapter"},
        },
    )
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    assert main(["merge-local", str(config), str(out), "--cache", str(cache), "--no-progress"]) == 0
    manifest = MergeManifest.model_validate_json((out / MANIFEST).read_text())
    assert manifest.method == "knots" and manifest.name == "es-it-pt"
    assert manifest.parameters["knots_merge"] == "ties" and manifest.parameters["weights"] == {"it": 0.5}
    assert [(i.language, i.weight) for i in manifest.inputs] == [("es", 1.0), ("it", 0.5), ("pt", 1.0)]
    assert all(i.adapter_uri.startswith("s3://") and len(i.adapter_digest) == 16 for i in manifest.inputs)
    assert manifest.output_rank == 18 and max(manifest.module_errors.values()) == 0.0
    assert set(manifest.files) == {"adapter_model.safetensors", "adapter_config.json"}
    assert manifest.timings["total"] > 0 and manifest.cost.wall_seconds > 0
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)

    # the same inputs again: a no-op (nothing rewritten)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main([str(config), str(out), "--cache", str(cache), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # a changed input (an adapter's weight) is a new fingerprint and a new merge
    data = yaml.safe_load(config.read_text())
    data["parameters"]["weights"] = {"it": 0.25}
    write_config(config, data)
    assert main([str(config), str(out), "--cache", str(cache), "--no-progress"]) == 0
    again = MergeManifest.model_validate_json((out / MANIFEST).read_text())
    assert again.fingerprint != manifest.fingerprint


def test_dry_run_prints_the_plan_and_writes_nothing(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "merge.yaml",
        {
            "base_model": str(tiny_model_dir),
            "adapters": [{"language": lang, "path": str(path)} for lang, path in adapter_dirs.items()],
            "method": "dare_ties",
            "parameters": {"density": 0.4, "seed": 7, "exclude_modules": ["mlp"]},
            "output": {"format": "full-weights", "shard_size_mb": 64},
        },
    )
    out = tmp_path / "out"
    assert main([str(config), str(out), "--dry-run", "--cache", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert (
        'dare_ties {"density": 0.4, "lambda_": 1.0, "normalize": true, "rescale": "inverse-density", "seed": 7}'
        in printed
    )
    assert "model.layers.0.self_attn.q_proj  64x64  ranks 4+8+6" in printed
    assert "full-weights" in printed and "peak working set" in printed and "fingerprint:" in printed
    assert not out.exists()


def test_a_bad_config_is_refused_with_a_message(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {
        "baseModel": str(tiny_model_dir),
        "adapters": [{"language": lang, "path": str(path)} for lang, path in adapter_dirs.items()],
    }
    cases = [
        ({**base, "method": "linear", "parameters": {"density": 0.5}}, "do not apply to method 'linear'"),
        ({**base, "methd": "ties"}, "methd: Extra inputs are not permitted"),
        ({**base, "parameters": {"weights": {"fr": 1.0}}}, "without an adapter: fr"),
        ({**base, "method": "slerp"}, "unknown method"),
        (
            {**base, "adapters": [{"language": "es", "path": str(tmp_path), "labelCounts": {"a": 1}}]},
            "labelCounts needs `labels:`",
        ),
        (
            {**base, "labels": ["a", "b"], "adapters": [{"language": "es", "path": ".", "labelCounts": {"c": 1}}]},
            "es: labelCounts names labels not in `labels:`: c",
        ),
        ({**base, "adapters": [{"language": "es", "path": str(tmp_path)}]}, "not a PEFT adapter folder"),
    ]
    for i, (config, message) in enumerate(cases):
        path = write_config(tmp_path / f"bad{i}.yaml", config)
        assert main([str(path), str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 2
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "out").exists()


def test_merge_local_search_chooses_on_validation_files(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--search``: candidates scored on each adapter's validation file, the best merged; the manifest records the
    search and the chosen method and parameters; a search with another space is another fingerprint."""
    import json

    from langmerge_trainer.sample import corpus_pairs

    adapters = []
    for lang, folder in adapter_dirs.items():
        rows = [{"prompt": p.prompt, "completion": p.completion} for p in corpus_pairs(lang)[:6]]
        validation = tmp_path / f"{lang}.jsonl"
        validation.write_text("".join(json.dumps(r) + "\n" for r in rows))
        adapters.append({"language": lang, "path": str(folder), "validation": str(validation)})
    base_config = {
        "baseModel": str(tiny_model_dir),
        "adapters": adapters,
        "method": "task_arithmetic",
        "parameters": {"lambda": 3.0},  # a poor start: three times the summed update
        "output": {"format": "full-weights"},
        "search": {"methods": ["linear", "ties"], "densities": [1.0], "lambdas": [0.5], "maxCandidates": 5},
    }
    config = write_config(tmp_path / "search.yaml", base_config)
    out = tmp_path / "out"
    assert main([str(config), str(out), "--search", "--no-progress", "--cache", str(tmp_path / "c")]) == 0
    manifest = MergeManifest.model_validate_json((out / MANIFEST).read_text())
    record = manifest.search
    assert record is not None and record.default is not None and record.candidates <= 5
    assert record.default.method == "task_arithmetic" and record.chosen.objective >= record.default.objective
    assert (manifest.method, manifest.parameters) == (record.chosen.method, record.chosen.parameters)
    assert all(v["examples"] == 6 for v in record.validation.values())
    assert "search: " in capsys.readouterr().err
    # without --search the same config merges task_arithmetic: another fingerprint
    plain = tmp_path / "plain"
    assert main([str(config), str(plain), "--no-progress", "--cache", str(tmp_path / "c")]) == 0
    other = MergeManifest.model_validate_json((plain / MANIFEST).read_text())
    assert other.method == "task_arithmetic" and other.search is None and other.fingerprint != manifest.fingerprint
    # --search without validation examples is refused with the languages named
    del adapters[0]["validation"]
    bad = write_config(tmp_path / "bad.yaml", base_config)
    assert main([str(bad), str(tmp_path / "bad"), "--search", "--no-progress"]) == 2
    assert "missing: es" in capsys.readouterr().err


def test_merge_local_merges_classifier_head_rows_by_the_label_counts_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`labels:` and each adapter's `labelCounts:` (its manifest's label_counts): the head row of a label an adapter
    never saw comes from the others, the manifest says which, the dry run too, and the counts are in the fingerprint."""
    from safetensors.torch import load_file

    base = make_tiny_encoder(tmp_path / "bert")
    adapters = make_classifier_adapters(base, tmp_path / "adapters", ["en", "nl"], 2)
    counts = {"en": {"art": 5, "money": 3}, "nl": {"art": 4, "money": 0}}
    config = {
        "baseModel": str(base),
        "labels": ["art", "money"],
        "adapters": [
            {"language": lang, "path": str(path), "labelCounts": counts[lang]} for lang, path in adapters.items()
        ],
        "method": "linear",
        "output": {"format": "full-weights"},
    }
    path = write_config(tmp_path / "merge.yaml", config)
    assert main([str(path), str(tmp_path / "out"), "--dry-run", "--no-progress"]) == 0
    assert "label 'money': head row from en only" in capsys.readouterr().out
    assert main([str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    manifest = MergeManifest.model_validate_json((tmp_path / "out" / MANIFEST).read_text())
    assert manifest.head_support == {"art": {"en": 5, "nl": 4}, "money": {"en": 3}}
    merged = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))["classifier.weight"]
    en = load_file(str(adapters["en"] / "adapter_model.safetensors"))
    en_head = next(v for k, v in en.items() if k.endswith("classifier.weight"))
    assert merged[1].equal(en_head[1])  # money: en's row alone

    # other counts, another fingerprint; without counts, yet another (the one such a config always had)
    config["adapters"][1]["labelCounts"]["art"] = 7
    changed = write_config(tmp_path / "changed.yaml", config)
    plain = write_config(
        tmp_path / "plain.yaml",
        {**config, "adapters": [{k: v for k, v in a.items() if k != "labelCounts"} for a in config["adapters"]]},
    )
    capsys.readouterr()
    for p in (path, changed, plain):
        assert main([str(p), str(tmp_path / "out"), "--dry-run"]) == 0
    fingerprints = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fingerprint:")]
    assert len(set(fingerprints)) == 3
