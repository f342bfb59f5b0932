"""The committed CRDs are exactly what the pydantic models generate."""

from __future__ import annotations

from pathlib import Path

from langmerge.api.crdgen import all_crds, render

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_match_generated() -> None:
    for name, crd in all_crds().items():
        path = ROOT / "crds" / name
        assert path.exists(), f"{path} missing: run `langmerge crds`"
        assert path.read_text(encoding="utf-8") == render(crd), f"{path} is stale: run `langmerge crds` and commit"


def test_no_stray_crd_files() -> None:
    assert sorted(p.name for p in (ROOT / "crds").glob("*.yaml")) == sorted(all_crds())


def test_example_manifests_are_what_up_applies() -> None:
    from langmerge.dev.demo import sample_files

    for name, text in sample_files().items():
        path = ROOT / "examples" / "sample" / name
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run `langmerge sample-manifests`"
