"""The pure parts of multi-tenancy: URI policy, image references, quantities, admission, local paths from object keys,
ownership claims, Event names, and the API validation that refuses specs up front."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from langmerge.admission import check_image, check_job_spec, check_quantity, check_uris
from langmerge.api.common import LabelSelector, Resources
from langmerge.api.merged import MergedModelSpec
from langmerge.artifacts import OwnerRecord
from langmerge.kube import event_name
from langmerge.ownership import claim_prefix, delete_owned, live_owner
from langmerge.references import ImageError, parse_image, parse_quantity
from langmerge.settings import Settings, SettingsError
from langmerge.store import NotFound, ObjectInfo, ObjectStore, PreconditionFailed, UnsafeKey, local_path, split_uri
from langmerge.tenancy import UriError, UriPolicy, is_under, parse_grants, uri_segments

ART = "s3://lm/artifacts"


# -- URI policy ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "prefix", "under"),
    [
        ("s3://b/team-a", "s3://b/team-a/", True),
        ("s3://b/team-a/x/y", "s3://b/team-a", True),
        ("s3://b/team-ab/x", "s3://b/team-a/", False),
        ("s3://b/team-a", "s3://b/team-a/x", False),
        ("s3://b2/team-a", "s3://b/", False),
        ("s3://b/anything", "s3://b", True),
    ],
)
def test_prefixes_match_on_segment_boundaries(uri: str, prefix: str, under: bool) -> None:
    assert is_under(uri, prefix) is under


@pytest.mark.parametrize("uri", ["s3://b/a/../c", "s3://b/./a", "s3://b//a", "s3:///a", "http://b/a", "s3://b/a/.."])
def test_ambiguous_uris_are_refused(uri: str) -> None:
    with pytest.raises(UriError):
        uri_segments(uri)
    assert UriPolicy(ART, mode="off").check("ns", "spec.dataset.uri", uri, write=False) is not None


def test_default_rule_grants_and_reserved_area() -> None:
    grants = parse_grants(
        json.dumps({"team-a": {"read": ["s3://shared/datasets/"]}, "*": {"read": ["s3://shared/base-models/"]}})
    )
    policy = UriPolicy(ART, grants=grants)
    ok = [
        ("team-a", f"{ART}/team-a/out", True),
        ("team-a", "s3://shared/datasets/es", False),
        ("team-b", "s3://shared/base-models/llama", False),
    ]
    for ns, uri, write in ok:
        assert policy.check(ns, "f", uri, write=write) is None, (ns, uri)
    refused = policy.check("team-a", "spec.output.uri", f"{ART}/team-b/out", write=True)
    assert refused is not None and "outside what namespace team-a may write" in refused
    assert f"{ART}/team-a/ (default rule, read and write)" in refused and "tenancy.grants" in refused
    assert policy.check("team-a", "f", f"{ART}/team-ab/out", write=False) is not None
    assert policy.check("team-a", "f", "s3://shared/datasets/es", write=True) is not None, "read-only grant"
    assert policy.check("team-b", "f", "s3://shared/datasets/es", write=False) is not None, "team-a's grant"
    # The expert area is the operator's, even for a namespace called "experts" and with the policy off.
    for p in (policy, UriPolicy(ART, mode="off")):
        message = p.check("experts", "spec.output.uri", f"{ART}/experts/team-b/x", write=True)
        assert message is not None and "expert area" in message
    assert UriPolicy(ART, mode="off").check("team-a", "f", "s3://anywhere/x", write=True) is None
    assert UriPolicy(ART, namespace_prefix="").check("team-a", "f", f"{ART}/team-a/x", write=False) is not None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[]", "expected an object"),
        ('{"a": ["s3://b/"]}', "read and/or readWrite"),
        ('{"a": {"write": ["s3://b/"]}}', "unknown key 'write'"),
        ('{"a": {"read": "s3://b/"}}', "list"),
        ('{"a": {"read": ["s3://b/../c"]}}', "'..'"),
        ("{", "not JSON"),
    ],
)
def test_bad_grants_are_refused_at_start_up(raw: str, message: str) -> None:
    with pytest.raises(SettingsError, match="LANGMERGE_URI_GRANTS") as err:
        Settings.from_env({"LANGMERGE_URI_GRANTS": raw})
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LANGMERGE_URI_POLICY": "loose"}, "LANGMERGE_URI_POLICY"),
        ({"LANGMERGE_NAMESPACE_PREFIX": "s3://b/shared/"}, "LANGMERGE_NAMESPACE_PREFIX"),
        ({"LANGMERGE_NAMESPACE_PREFIX": "s3://b/{team}/"}, "LANGMERGE_NAMESPACE_PREFIX"),
        ({"LANGMERGE_MAX_JOB_MEMORY": "0"}, "LANGMERGE_MAX_JOB_MEMORY"),
        ({"LANGMERGE_MAX_JOB_CPU": "many"}, "LANGMERGE_MAX_JOB_CPU"),
        ({"LANGMERGE_MAX_TRAINING_JOBS_PER_NAMESPACE": "-1"}, "LANGMERGE_MAX_TRAINING_JOBS_PER_NAMESPACE"),
        ({"LANGMERGE_TRAINER_IMAGE": "Bad Image"}, "LANGMERGE_TRAINER_IMAGE"),
    ],
)
def test_tenancy_settings_are_checked(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


# -- images -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("image", "registry", "repository"),
    [
        ("langmerge/trainer:0.1.0", "docker.io", "langmerge/trainer"),
        ("busybox", "docker.io", "library/busybox"),
        ("index.docker.io/library/busybox:1", "docker.io", "library/busybox"),
        ("ghcr.io/acme/trainer:1.2@sha256:" + "a" * 64, "ghcr.io", "acme/trainer"),
        ("localhost:5000/trainer", "localhost:5000", "trainer"),
        ("registry.internal:443/ml/trainer:cu128", "registry.internal:443", "ml/trainer"),
    ],
)
def test_image_references(image: str, registry: str, repository: str) -> None:
    ref = parse_image(image)
    assert (ref.registry, ref.repository) == (registry, repository)


@pytest.mark.parametrize(
    "image", ["UPPER/Case::@@", "trainer:", "ghcr.io/Acme/trainer", "a b", "x@sha256:short", ":tag", "a//b"]
)
def test_invalid_image_references(image: str) -> None:
    with pytest.raises(ImageError):
        parse_image(image)


def test_allowed_registries() -> None:
    assert check_image("langmerge/trainer:2", ("docker.io",)) is None
    refused = check_image("evil.example.com/x:1", ("docker.io",))
    assert refused is not None and "evil.example.com" in refused and "jobs.allowedRegistries" in refused
    assert check_image("ghcr.io/acme/trainer:1", ("ghcr.io/acme",)) is None
    assert check_image("ghcr.io/acmex/trainer:1", ("ghcr.io/acme",)) is not None, "segment boundary"
    assert check_image("anything.io/x", ("*",)) is None
    assert check_image("UPPER/Case::@@", ("*",)) is not None, "syntax is checked even for any registry"
    # Default: the registry of the trainer image.
    settings = Settings(trainer_image="ghcr.io/acme/trainer:1")
    assert check_job_spec("ghcr.io/other/x:1", "spec.image", Resources(), "spec.resources", settings) is None
    refusal = check_job_spec("langmerge/trainer:1", "spec.image", Resources(), "spec.resources", settings)
    assert refusal is not None and refusal.reason == "ImageNotAllowed" and "allowed: ghcr.io" in refusal.message


# -- quantities ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [("4", 4), ("500m", 0.5), ("32Gi", 32 * 2**30), ("1.5k", 1500), ("1e3", 1000), ("2Ei", 2 * 2**60), ("0", 0)],
)
def test_parse_quantity(value: str, expected: float) -> None:
    assert float(parse_quantity(value)) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["", "abc", "1Qi", "--1", "1.2.3", "Gi"])
def test_parse_quantity_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(value)


def test_quantity_bounds() -> None:
    assert check_quantity("spec.resources.memory", "32Gi", "4Ti", "jobs.maxMemory") is None
    zero = check_quantity("spec.resources.memory", "0", "4Ti", "jobs.maxMemory")
    assert zero == "spec.resources.memory 0 must be positive"
    huge = check_quantity("spec.resources.memory", "99999999999999Ei", "4Ti", "jobs.maxMemory")
    assert huge is not None and "more than the operator allows for one Job (4Ti" in huge
    refusal = check_job_spec(
        "langmerge/trainer:1", "spec.image", Resources(cpu="1000"), "spec.resources", Settings(max_job_cpu="64")
    )
    assert refusal is not None and refusal.reason == "InvalidResources" and "spec.resources.cpu 1000" in refusal.message


def test_check_uris_names_the_field() -> None:
    refusal = check_uris(
        Settings(artifacts_uri=ART),
        "team-a",
        [("spec.baseModel.uri", f"{ART}/team-a/base", False), ("spec.dataset.evalUri", "s3://other/eval", False)],
    )
    assert refusal is not None and refusal.reason == "UriNotAllowed"
    assert refusal.message.startswith("spec.dataset.evalUri s3://other/eval is outside what namespace team-a may read")
    assert check_uris(Settings(artifacts_uri=ART), "team-a", [("spec.dataset.evalUri", None, False)]) is None


# -- local paths from object keys ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["/etc/x", "../x", "a/../../x", "a//b", "./a", "a/.", "", "a/\0b"])
def test_keys_that_would_escape_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(UnsafeKey):
        local_path(tmp_path / "dst", key)


def test_plain_keys_land_inside(tmp_path: Path) -> None:
    assert local_path(tmp_path, "adapter/model.safetensors") == tmp_path / "adapter" / "model.safetensors"
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(UnsafeKey):
        local_path(tmp_path, "link/passwd")


# -- ownership ----------------------------------------------------------------------------------------------------------
class MemoryStore(ObjectStore):
    """Our S3 seam in memory: get with ETag and conditional puts, enough for ownership claims."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.version = 0

    def get_bytes(self, uri: str) -> tuple[bytes, str]:
        if uri not in self.objects:
            raise NotFound(uri)
        return self.objects[uri]

    def put_bytes(
        self,
        uri: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> str:
        if if_none_match and uri in self.objects:
            raise PreconditionFailed(uri)
        if if_match is not None and (uri not in self.objects or self.objects[uri][1] != if_match):
            raise PreconditionFailed(uri)
        self.version += 1
        self.objects[uri] = (data, f"e{self.version}")
        return f"e{self.version}"

    def iter_objects(self, uri: str) -> Iterator[ObjectInfo]:
        folder = uri.rstrip("/") + "/"
        for key in sorted(k for k in self.objects if k.startswith(folder)):
            _, name = split_uri(key)
            yield ObjectInfo(key=name, size=len(self.objects[key][0]), etag=self.objects[key][1])

    def delete(self, uri: str) -> None:
        self.objects.pop(uri, None)

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        for key in keys:
            del self.objects[f"s3://{bucket}/{key}"]


def _owner(ns: str, name: str, uid: str) -> OwnerRecord:
    return OwnerRecord(api_version="langmerge.dev/v1alpha1", kind="MergedModel", namespace=ns, name=name, uid=uid)


def test_claims_refusals_and_takeovers() -> None:
    store = MemoryStore()
    out = "s3://b/team-b/merged"
    b = _owner("team-b", "published", "uid-b")
    alive: set[str] = {"uid-b"}

    def exists(record: OwnerRecord) -> bool:
        return record.uid in alive

    first = claim_prefix(store, out, b, exists=exists, what="spec.output.uri")
    assert first.owned and first.adopted_from is None
    assert claim_prefix(store, out, b, exists=exists).owned, "the owner again"
    intruder = claim_prefix(store, out, _owner("team-a", "intruder", "uid-a"), exists=exists, what="spec.output.uri")
    assert not intruder.owned and intruder.owner.uid == "uid-b"
    assert "belongs to MergedModel team-b/published (uid uid-b)" in intruder.message
    # The owner is deleted: another namespace still does not take over...
    alive.clear()
    other = claim_prefix(store, out, _owner("team-a", "intruder", "uid-a"), exists=exists)
    assert not other.owned and "no longer exists" in other.message and ".langmerge-owner.json" in other.message
    # ...but the same name re-created in team-b (a new uid) does, and says from whom.
    again = claim_prefix(store, out, _owner("team-b", "published", "uid-b2"), exists=exists)
    assert again.owned and again.adopted_from is not None and again.adopted_from.uid == "uid-b"
    alive.add("uid-b2")
    assert live_owner(store, out, exists) is not None and live_owner(store, "s3://b/free", exists) is None


def test_a_prefix_published_before_ownership_records() -> None:
    store = MemoryStore()
    out = "s3://b/team-b/merged"
    legacy = ("team-b", "published")
    intruder = claim_prefix(
        store, out, _owner("team-a", "x", "uid-a"), exists=lambda r: r.name == "published", legacy_owner=lambda: legacy
    )
    assert not intruder.owned and "MergedModel team-b/published" in intruder.message
    assert claim_prefix(
        store, out, _owner("team-b", "published", "uid-b"), exists=lambda r: True, legacy_owner=lambda: legacy
    ).owned


# -- Event names --------------------------------------------------------------------------------------------------------
def test_event_names_are_unique_and_valid() -> None:
    long = "a" * 250 + "-de"
    involved = [
        {"namespace": "ns", "name": long, "uid": "1"},
        {"namespace": "ns", "name": long[:-3] + "-fr", "uid": "2"},
        {"namespace": "ns", "name": long, "uid": "1"},
    ]
    names = [event_name(i) for i in involved for _ in range(3)]
    assert len(set(names)) == len(names)
    assert all(len(n) <= 253 and n[0].isalnum() and n[-1].isalnum() for n in names)


# -- refused up front by the models -------------------------------------------------------------------------------------
def _merged(**spec: Any) -> dict[str, Any]:
    return {
        "baseModel": {"uri": "s3://bucket/base"},
        "experts": {"names": ["de"]},
        "output": {"uri": "s3://bucket/out"},
        **spec,
    }


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({"matchLabels": {"task": "a b"}}, "label value 'a b'"),
        ({"matchLabels": {"Bad_/x": "y"}}, "label key 'Bad_/x'"),
        ({"matchLabels": {"x" * 64: "y"}}, "at most 63 characters"),
        ({"matchExpressions": [{"key": "task", "operator": "In", "values": []}]}, "needs at least one value"),
        ({"matchExpressions": [{"key": "task", "operator": "Exists", "values": ["x"]}]}, "takes no values"),
        ({"matchExpressions": [{"key": "task", "operator": "In", "values": ["a,b"]}]}, "label value 'a,b'"),
    ],
)
def test_label_selectors_the_api_server_would_refuse(selector: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MergedModelSpec.model_validate(_merged(experts={"selector": selector}))


def test_valid_label_selectors() -> None:
    selector = LabelSelector.model_validate(
        {
            "matchLabels": {"langmerge.dev/task": "dialog", "tier": ""},
            "matchExpressions": [{"key": "lang", "operator": "NotIn", "values": ["xx"]}],
        }
    )
    assert selector.to_query() == "langmerge.dev/task=dialog,tier=,lang notin (xx)"


@pytest.mark.parametrize("field", ["includeModules", "excludeModules"])
def test_invalid_regular_expressions(field: str) -> None:
    with pytest.raises(ValidationError, match="is not a valid regular expression"):
        MergedModelSpec.model_validate(_merged(method="linear", parameters={field: ["q_proj", "(unclosed"]}))


def test_the_sample_passes_admission_with_the_grants_up_sets() -> None:
    """`make up` runs the sample under the default policy plus the grants it sets: every URI, image and resource of
    the sample's manifests is admitted (also the expert the README's walkthrough adds), and the same manifests in
    another namespace are not."""
    from langmerge.api.expert import LanguageExpertSpec
    from langmerge.dev.demo import ADDED_LANGUAGE, DEFAULT_LAYOUT, sample_expert, sample_experts, sample_merged

    settings = Settings.from_env(
        {
            "LANGMERGE_ARTIFACTS_URI": DEFAULT_LAYOUT.artifacts_uri,
            "LANGMERGE_URI_GRANTS": DEFAULT_LAYOUT.uri_grants("default"),
        }
    )
    merged = MergedModelSpec.model_validate(sample_merged()["spec"])
    merged_uris = [("base", merged.base_model.uri, False), ("output", merged.output.uri, True)]
    assert check_uris(settings, "default", merged_uris) is None
    assert check_uris(settings, "elsewhere", merged_uris) is not None
    for doc in [*sample_experts(), sample_expert(ADDED_LANGUAGE)]:
        spec = LanguageExpertSpec.model_validate(doc["spec"])
        uris = [("base", spec.base_model.uri, False), ("data", spec.dataset.uri, False)]
        assert check_uris(settings, "default", uris) is None
        assert check_uris(settings, "elsewhere", uris) is not None
        assert check_job_spec(settings.trainer_image, "image", spec.resources, "resources", settings) is None


# -- the Secret check, through our Kubernetes seam ----------------------------------------------------------------------
class SecretsOnly:
    """Stands in for :class:`langmerge.kube.Kube` in the Secret check: present, missing, or forbidden by RBAC."""

    def __init__(self, answer: bool | None) -> None:
        self.answer = answer

    def secret_exists(self, namespace: str, name: str) -> bool:
        if self.answer is None:
            from langmerge.kube import Forbidden

            raise Forbidden('secrets "langmerge-s3" is forbidden')
        return self.answer


@pytest.mark.parametrize(
    ("answer", "check", "reason", "text"),
    [
        (True, True, None, ""),
        (False, True, "SecretMissing", "Secret langmerge-s3 not found in namespace team-a"),
        (None, True, "SecretNotCheckable", "s3.credentials.checkExists"),
        (False, False, None, ""),
    ],
)
def test_secret_check(answer: bool | None, check: bool, reason: str | None, text: str) -> None:
    from langmerge.controller.experts import ExpertReconciler
    from langmerge.controller.runtime import Runtime, expert_key

    rt = Runtime(settings=Settings(check_s3_secret=check), kube=SecretsOnly(answer), store=MemoryStore())  # type: ignore[arg-type]
    body = {"metadata": {"namespace": "team-a", "name": "de", "uid": "u", "generation": 1}, "spec": {}}
    refusal = ExpertReconciler(rt, expert_key("team-a", "de"), body).job_admission("training")
    assert (refusal.reason if refusal else None) == reason
    assert refusal is None or text in refusal.message


def test_a_prefix_inside_or_above_a_live_owners_prefix_is_refused() -> None:
    store = MemoryStore()
    b = _owner("team-b", "prod", "uid-b")
    alive = {"uid-b"}

    def exists(record: OwnerRecord) -> bool:
        return record.uid in alive

    assert claim_prefix(store, "s3://m/shared/b-prod", b, exists=exists).owned
    store.put_bytes("s3://m/shared/b-prod/merges/f1/model/w.bin", b"w")
    a = _owner("team-a", "x", "uid-a")
    for uri, relation in (
        ("s3://m/shared/b-prod/merges/f1", "lies inside"),
        ("s3://m/shared/b-prod/revisions", "lies inside"),
        ("s3://m/shared", "contains"),
        ("s3://m", "contains"),
    ):
        claim = claim_prefix(store, uri, a, exists=exists, what="spec.output.uri")
        assert not claim.owned and claim.owner.uid == "uid-b", uri
        assert f"spec.output.uri {uri} {relation} s3://m/shared/b-prod, which belongs to MergedModel team-b/prod" in (
            claim.message
        )
        assert f"{uri}/.langmerge-owner.json" not in store.objects, "a refused claim writes nothing"
    assert claim_prefix(store, "s3://m/shared/b-prod2", a, exists=exists).owned, "a sibling with a common stem"
    assert claim_prefix(store, "s3://m/shared/b-prod/v2", b, exists=exists).owned, "the owner's own nested path"
    # An owner that is gone no longer holds what is around its prefix (its own prefix keeps its record).
    alive.clear()
    assert claim_prefix(store, "s3://m/shared/b-prod/merges/f1", a, exists=exists).owned


def test_deleting_under_a_prefix_keeps_what_another_owner_holds() -> None:
    store = MemoryStore()
    for key in ("own/.langmerge-owner.json", "own/a.bin", "own/in/.langmerge-owner.json", "own/in/b.bin", "own/c/d"):
        store.put_bytes(f"s3://m/{key}", b"x")
    store.put_bytes("s3://m/own-2/e", b"x")
    deleted, kept = delete_owned(store, "s3://m/own")
    assert deleted == 3 and kept == ["s3://m/own/in"]
    assert sorted(store.objects) == ["s3://m/own-2/e", "s3://m/own/in/.langmerge-owner.json", "s3://m/own/in/b.bin"]


def test_two_nested_claims_at_the_same_moment_leave_one_owner() -> None:
    """Each claimant checked before the other wrote: both records are there. The older record keeps its prefix; the
    younger claimant takes its record back and is refused, whichever of the two settles first."""
    from langmerge.ownership import _settle_race

    for first in ("outer", "inner"):
        store = MemoryStore()
        outer = _owner("team-b", "prod", "uid-b").model_copy(update={"created_at": "2026-12-07T10:00:00Z"})
        inner = _owner("team-a", "x", "uid-a").model_copy(update={"created_at": "2026-12-07T10:00:01Z"})
        claims = {"outer": ("s3://m/shared", outer), "inner": ("s3://m/shared/b/c", inner)}
        for prefix, record in claims.values():
            store.put_json(f"{prefix}/.langmerge-owner.json", record)
        order = [first, "inner" if first == "outer" else "outer"]
        results = {
            name: _settle_race(store, claims[name][0], claims[name][1], lambda r, p: True, what="spec.output.uri")
            for name in order
        }
        assert results["outer"].owned and not results["inner"].owned, first
        assert "s3://m/shared/b/c lies inside s3://m/shared" in results["inner"].message
        assert sorted(store.objects) == ["s3://m/shared/.langmerge-owner.json"], first
