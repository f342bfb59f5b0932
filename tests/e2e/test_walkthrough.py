"""``make up``, then the README's walkthrough "Add a language to the running sample" exactly as the README shows it,
then ``langmerge try`` on the sample.

``langmerge up --quick`` runs the way ``make up`` runs it: its own local control plane in a temporary state folder,
the operator and the local Job runner in the background, the sample to revision 2 (``--quick``: a shorter
pre-training and 2 epochs per expert, to fit CI). The walkthrough's fenced ``bash`` block, extracted from the README,
runs in bash from a folder laid out as a clone after ``make up`` (``.venv``, ``examples``, ``.langmerge``): every
command must succeed (``set -e``). Then the records say what happened: Dutch added with one training Job and one
merge (revision 3), Italian removed with one merge and no training Job (revision 4). ``kubectl get lex -w``, which
the README suggests for a second terminal, runs beside the block.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from langmerge.artifacts import PublishedRevision, parse_time
from langmerge.dev.demo import ADDED_DATA_FILE, ADDED_LANGUAGE, DEFAULT_LAYOUT, SERVED, WALKTHROUGH, sample_merged

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
MERGED = sample_merged()["metadata"]["name"]
#: Variables of the test session's own control plane: the walkthrough must get everything from make up's env.sh.
FOREIGN = ("KUBECONFIG", "LANGMERGE_S3_ENDPOINT", "LANGMERGE_STATE", "LANGMERGE_MODEL_CACHE", "VIRTUAL_ENV")


def _events(kube: Any, name: str) -> list[Any]:
    from kubernetes import client

    items = client.CoreV1Api(kube.api).list_namespaced_event("default").items
    return [e for e in items if e.involved_object.name == name]


def walkthrough_block(readme: str) -> str:
    """The first ``bash`` block of the README section named :data:`WALKTHROUGH`."""
    heading = f"\n## {WALKTHROUGH}\n"
    assert heading in readme, f"README has no section {WALKTHROUGH!r}"
    section = readme.split(heading, 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, f"no bash block in README section {WALKTHROUGH!r}"
    return match[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN and not k.startswith("AWS_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stamps(trace: str) -> list[tuple[float, str]]:
    """(time, command) of each command bash traced with ``PS4='+ [<epoch seconds>] '``."""
    out = []
    for line in trace.splitlines():
        match = re.match(r"^\++ \[(\d+\.\d+)\] (.*)$", line)
        if match:
            out.append((float(match[1]), match[2]))
    return out


def _when(stamps: list[tuple[float, str]], command: str) -> float:
    found = [t for t, text in stamps if text.startswith(command)]
    assert found, f"{command!r} was not run:\n{stamps}"
    return found[0]


def test_make_up_then_the_readme_walkthrough_then_try(tmp_path: Path) -> None:
    from langmerge.kube import Kube, ObjectKey, load_client
    from langmerge.store import ObjectStore, S3Config

    state = tmp_path / "state"
    env = _env()
    langmerge = [sys.executable, "-m", "langmerge.cli", "--state", str(state)]
    up_log = tmp_path / "up.log"
    t0 = time.monotonic()
    with up_log.open("w") as log:
        up = subprocess.run([*langmerge, "up", "--quick"], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=1500)
    up_text = up_log.read_text()
    try:
        assert up.returncode == 0, up_text[-4000:]
        print(f"langmerge up --quick: {time.monotonic() - t0:.0f}s")
        # make up's closing lines point at both: langmerge try and the walkthrough.
        assert f"`langmerge try {MERGED}`" in up_text
        assert f'README, "{WALKTHROUGH}"' in up_text and ADDED_DATA_FILE in up_text

        endpoints = dict(
            line.removeprefix("export ").split("=", 1)
            for line in (state / "env.sh").read_text().splitlines()
            if line.startswith("export ")
        )
        kube = Kube(load_client(endpoints["KUBECONFIG"]))
        store = ObjectStore.from_config(
            S3Config(endpoint_url=endpoints["AWS_ENDPOINT_URL"]),
            aws_access_key_id=endpoints["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=endpoints["AWS_SECRET_ACCESS_KEY"],
        )
        training = "app.kubernetes.io/managed-by=langmerge,langmerge.dev/component=training"
        merging = "app.kubernetes.io/managed-by=langmerge,langmerge.dev/component=merge"

        def names(selector: str) -> set[str]:
            return {job.metadata.name for job in kube.list_jobs(selector, "default")}

        trained_before, merged_before = names(training), names(merging)
        assert (len(trained_before), len(merged_before)) == (5, 2), "the sample: trunk, 3 experts + 1 retrain, 2 merges"

        # The loop ends at a served model: revision 2 answers at the sample's InferenceService (the real model server
        # behind the local router), after a canary; the summary shows its answer and a curl line.
        merged_now = kube.get_merged(ObjectKey("default", MERGED)) or {}
        fingerprint2 = merged_now["status"]["fingerprint"]
        assert f"serving: InferenceService {SERVED}: Promoted revision 2 at http://127.0.0.1:" in up_text, up_text[
            -3000:
        ]
        assert f"merge {fingerprint2})" in up_text, "revision 2's merge answered the summary's question"
        assert "curl -s http://127.0.0.1:" in up_text and f"/v1/models/{SERVED}:predict" in up_text
        assert "CanaryStarted" in {e.reason for e in _events(kube, MERGED)}, "revision 2 went through a canary"

        # A folder laid out as a clone after make up.
        clone = tmp_path / "clone"
        clone.mkdir()
        (clone / ".venv").symlink_to(Path(sys.prefix))
        (clone / "examples").symlink_to(ROOT / "examples")
        (clone / ".langmerge").symlink_to(state)
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        block = walkthrough_block(readme)
        setup = "source .venv/bin/activate; source .langmerge/env.sh; "
        watch_command = "kubectl get lex -w"
        assert f"`{watch_command}`" in readme.split(f"\n## {WALKTHROUGH}\n", 1)[1].split("\n## ", 1)[0]
        watch = subprocess.Popen(
            ["bash", "-c", setup + "exec " + watch_command],
            cwd=clone,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        script = "set -eo pipefail\nPS4='+ [$(date +%s.%N)] '\nset -x\n" + block
        try:
            walk = subprocess.run(
                ["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=1500
            )
        finally:
            watch.terminate()
            watched = watch.communicate(timeout=30)[0]
        print(walk.stdout)
        assert walk.returncode == 0, f"the README walkthrough failed:\n{walk.stdout}\n{walk.stderr[-6000:]}"

        # kubectl get lex -w showed the new expert train.
        nl_lines = [line for line in watched.splitlines() if line.startswith(f"dialog-{ADDED_LANGUAGE} ")]
        assert any(" Ready " in line for line in nl_lines), watched
        assert any(" Training " in line or " Pending " in line for line in nl_lines), watched

        # What the walkthrough printed: status with four languages, try's Dutch answers, history with the removal.
        out = walk.stdout
        assert re.search(rf"{MERGED}\s+ties\s+Ready\s+3\s+\S+\s+es,it,nl,pt", out), out
        assert f"MergedModel default/{MERGED}, revision 3 (ties, full-weights)" in out
        assert f"== {ADDED_LANGUAGE} · expert dialog-{ADDED_LANGUAGE}" in out
        assert len(re.findall(r"^\[\d\] input ", out, re.M)) == 3 and len(re.findall(r"^ +merged r3 ", out, re.M)) == 3
        assert re.search(r"^4\s+\S+\s+merged\s+\S+\s+-dialog-it\s", out, re.M), out

        # The records: Dutch cost one training Job and one merge; removing Italian one merge and no training Job (the
        # operator deletes the Jobs of a deleted expert, so Italian's training Job is gone from the list).
        trained_after = names(training)
        assert [name.split("-train-")[0] for name in trained_after - trained_before] == [f"dialog-{ADDED_LANGUAGE}"]
        assert {name.split("-train-")[0] for name in trained_before - trained_after} == {"dialog-it"}
        assert len(names(merging) - merged_before) == 2
        output = DEFAULT_LAYOUT.merged_uri
        revisions = {
            n: PublishedRevision.model_validate(store.get_json(f"{output}/revisions/{n:06d}.json")) for n in (3, 4)
        }
        assert sorted(i.language for i in revisions[3].inputs) == ["es", "it", "nl", "pt"]
        assert sorted(i.language for i in revisions[4].inputs) == ["es", "nl", "pt"]
        current = PublishedRevision.model_validate(store.get_json(f"{output}/current.json"))
        assert current.revision == 4
        merged = kube.get_merged(ObjectKey("default", MERGED))
        assert merged is not None and merged["status"]["history"][-1]["removedInputs"] == ["dialog-it"]

        stamps = _stamps(walk.stderr)
        published = {n: parse_time(r.published_at).timestamp() for n, r in revisions.items()}  # type: ignore[union-attr]
        added = published[3] - _when(stamps, "aws s3 cp")
        removed = published[4] - _when(stamps, "kubectl delete lex")
        print(
            f"add a language (upload to revision 3): {added:.0f}s; remove a language (delete to revision 4): {removed:.0f}s"
        )

        # Revisions 3 and 4 were rolled out too: the endpoint answers from revision 4, without a restart.
        def serves_4() -> bool:
            status = (kube.get_merged(ObjectKey("default", MERGED)) or {}).get("status") or {}
            kserve = [s for s in status.get("serving") or [] if s.get("target") == f"kserve/{SERVED}"]
            return bool(kserve) and kserve[0].get("phase") == "Promoted" and kserve[0].get("revision") == 4

        deadline = time.monotonic() + 300
        while not serves_4():
            assert time.monotonic() < deadline, "revision 4 was not promoted on the InferenceService"
            time.sleep(2)

        def in_clone(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
            """A command as a user runs it in the clone after make up (the venv and env.sh sourced)."""
            return subprocess.run(
                ["bash", "-c", setup + command], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
            )

        served = in_clone(f"langmerge try {shlex.quote(MERGED)} --served -i 'hola' -i 'hallo'", 120)
        print(served.stdout)
        assert served.returncode == 0, served.stderr
        assert f"model {current.fingerprint}" in served.stdout and "answered by dialog-predictor-" in served.stdout
        assert len(re.findall(r"^  (hola|hallo) +-> ", served.stdout, re.M)) == 2, served.stdout

        # langmerge try on the sample: every language of the published revision, base, expert and merged.
        tried = in_clone(f"langmerge try {shlex.quote(MERGED)} --examples 2", 600)
        print(tried.stdout)
        assert tried.returncode == 0, tried.stderr
        for lang in ("es", "nl", "pt"):
            assert f"== {lang} · expert dialog-{lang}" in tried.stdout
        assert len(re.findall(r"^ +merged r4 ", tried.stdout, re.M)) == 6
        assert len(re.findall(r"^ +base ", tried.stdout, re.M)) == 6
        assert len(re.findall(r"^ +expert ", tried.stdout, re.M)) == 6
        bad = in_clone(f"langmerge try {shlex.quote(MERGED)} --revision 9", 120)
        assert bad.returncode == 1
        assert "has no published revision 9; published revisions: 1, 2, 3, 4 (current 4)" in bad.stderr
    finally:
        subprocess.run([*langmerge, "down"], env=env, capture_output=True, timeout=120)
