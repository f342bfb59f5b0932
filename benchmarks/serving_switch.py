"""Seconds from a publish to the new revision serving every request, and requests failed during the switch.

Runs against the sample that ``make up`` leaves running (its state folder, default ``.langmerge``): the MergedModel
``dialog-multilingual`` rolled out to the InferenceService ``dialog`` by the operator, on the local stand-in for KServe
with the real model server (``langmerge-trainer serve``) behind the local router.

For the measurement the target's ``promoteAfter`` is set to ``0s`` (the issue's setting: promotion as soon as the new
revision is Ready), and a steady request loop asks the endpoint all along. Each switch is a real publish: a
``spec.pinRevision`` to the revision before the current one publishes its model again as a new revision, and lifting
the pin publishes the merge of the current inputs again (no training, no merge Job: both are committed). Each switch
loads a new model-server process, as a new revision does.

Per switch: *publish* is the moment ``current.json`` changed in S3 (polled every 50 ms); *all requests* is when the
last request answered by the old model was followed only by answers of the new one (the router's
``x-langmerge-storage-uri`` header); *Promoted* is when ``status.serving`` said so. Failed = any answer that is not a
200 with predictions, or no answer. The spec is restored at the end.

    .venv/bin/python benchmarks/serving_switch.py [--state .langmerge] [--switches 4] [--clients 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langmerge import artifacts
from langmerge.api.merged import MergedModelStatus
from langmerge.constants import GROUP, MERGED_PLURAL, VERSION
from langmerge.dev.demo import DEFAULT_LAYOUT, SERVED, SERVED_PROMPT, sample_merged
from langmerge.kube import Kube, ObjectKey, load_client
from langmerge.served import ServedError, predict
from langmerge.store import ObjectStore, S3Config

NAME = sample_merged()["metadata"]["name"]


@dataclass
class Sample:
    at: float
    ok: bool
    storage_uri: str | None
    error: str | None = None


@dataclass
class Loop:
    """Requests in a loop from ``clients`` threads, each answer recorded with its time and the model that answered."""

    url: str
    clients: int
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                answer = predict(self.url, SERVED, [SERVED_PROMPT], max_new_tokens=4, timeout=30)
                sample = Sample(time.monotonic(), True, answer.storage_uri)
            except ServedError as err:
                sample = Sample(time.monotonic(), False, None, str(err)[:200])
            with self._lock:
                self.samples.append(sample)

    def __enter__(self) -> Loop:
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(60)

    def since(self, t0: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if s.at >= t0]


def env_of(state: Path) -> dict[str, str]:
    values = {}
    for line in (state / "env.sh").read_text().splitlines():
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep:
            values[name.strip()] = value.strip().strip("'\"")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", default=".langmerge", help="make up's state folder")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--switches", type=int, default=4)
    parser.add_argument("--clients", type=int, default=2, help="request threads (a steady loop each)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one switch may take")
    parser.add_argument("--output", default="results/serving-switch.json")
    args = parser.parse_args(argv)

    env = env_of(Path(args.state))
    kube = Kube(load_client(env["KUBECONFIG"]))
    store = ObjectStore.from_config(
        S3Config(endpoint_url=env["AWS_ENDPOINT_URL"]),
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    key = ObjectKey(args.namespace, NAME)
    from kubernetes import client

    api = client.CustomObjectsApi(kube.api)

    def status() -> MergedModelStatus:
        return MergedModelStatus.model_validate((kube.get_merged(key) or {}).get("status") or {})

    def serving() -> Any:
        return next((s for s in status().serving if s.target == f"kserve/{SERVED}"), None)

    def current() -> tuple[int, str]:
        record = store.get_json(artifacts.current_uri(DEFAULT_LAYOUT.merged_uri))
        return int(record["revision"]), str(record["manifest_uri"]).rsplit("/", 1)[0]

    body = kube.get_merged(key)
    if body is None or serving() is None or serving().phase != "Promoted":
        print(f"{NAME} is not served and Promoted: run `make up` first ({serving()})", file=sys.stderr)
        return 1
    original = json.loads(json.dumps(body["spec"]))

    def patch_spec(spec: dict[str, Any]) -> None:
        fresh = kube.get_merged(key) or {}
        fresh["spec"] = spec
        api.replace_namespaced_custom_object(GROUP, VERSION, args.namespace, MERGED_PLURAL, NAME, fresh)

    fast = json.loads(json.dumps(original))
    for target in fast.get("serving") or []:
        if (target.get("kserve") or {}).get("inferenceService") == SERVED:
            target["kserve"]["promoteAfter"] = "0s"
    fast.pop("pinRevision", None)
    patch_spec(fast)
    url = serving().url
    results: list[dict[str, Any]] = []
    try:
        with Loop(url, args.clients) as loop:
            time.sleep(3.0)  # the loop runs steadily before the first switch
            for n in range(args.switches):
                before_revision, before_uri = current()
                spec = json.loads(json.dumps(fast))
                if n % 2 == 0:
                    spec["pinRevision"] = max(1, before_revision - 1)
                patch_spec(spec)
                deadline = time.monotonic() + args.timeout
                while current()[0] == before_revision:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"switch {n + 1}: nothing was published within {args.timeout:.0f}s")
                    time.sleep(0.05)
                published_at = time.monotonic()
                revision, uri = current()
                promoted_at = None
                while True:
                    s = serving()
                    if s is not None and s.phase == "Promoted" and s.revision == revision and promoted_at is None:
                        promoted_at = time.monotonic()
                    answers = loop.since(published_at)
                    old = [a.at for a in answers if a.ok and a.storage_uri != uri]
                    new_after = [a for a in answers if a.ok and a.storage_uri == uri and a.at > max(old, default=0)]
                    if promoted_at is not None and len(new_after) >= 5:
                        break
                    if time.monotonic() > deadline:
                        raise SystemExit(f"switch {n + 1}: revision {revision} did not take every request")
                    time.sleep(0.1)
                all_at = new_after[0].at
                window = [a for a in loop.since(published_at - 1.0) if a.at <= all_at + 1.0]
                failed = [a for a in window if not a.ok]
                row = {
                    "switch": n + 1,
                    "from_revision": before_revision,
                    "revision": revision,
                    "reason": "pin" if n % 2 == 0 else "unpin",
                    "same_model": uri == before_uri,
                    "seconds_to_all_requests": round(all_at - published_at, 2),
                    "seconds_to_promoted_status": round(promoted_at - published_at, 2),
                    "requests_during_switch": len(window),
                    "failed": len(failed),
                    "errors": sorted({a.error or "" for a in failed})[:3],
                }
                results.append(row)
                print(json.dumps(row))
                time.sleep(2.0)
            total = loop.since(0.0)
    finally:
        patch_spec(original)
    seconds = [r["seconds_to_all_requests"] for r in results]
    summary = {
        "switches": len(results),
        "clients": args.clients,
        "seconds_to_all_requests": {"median": statistics.median(seconds), "max": max(seconds), "min": min(seconds)},
        "requests": len(total),
        "failed_requests": sum(1 for a in total if not a.ok),
        "rows": results,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"{len(results)} switches: publish -> every request on the new revision in median {summary['seconds_to_all_requests']['median']:.1f}s "
        f"(max {max(seconds):.1f}s); {summary['failed_requests']} of {len(total)} requests failed; {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
