"""The DiffusionGemma CRD: generated from the pydantic models, structural, shipped unchanged,
and agreeing with the models on defaults, validity and the status fields the operator writes."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
import yaml

from dgserve.operator import crd, names
from dgserve.operator.render import Owner
from dgserve.operator.spec import DiffusionGemmaSpec
from dgserve.operator.status import Observation, compute_status
from operator_testlib import (
    REPO_ROOT,
    admit,
    apply_defaults,
    dg_schema,
    load_yaml_docs,
    prune,
    strict,
    structural_problems,
    validate,
)

K8S_VERSION = "1.35.0"
EXAMPLE = REPO_ROOT / "deploy/diffusiongemma.yaml"
MINIMAL = {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": "tiny", "namespace": "ns"},
           "spec": {"model": {"pvc": {"claimName": "models", "path": "dg"}}, "security": {"allowPlaintext": True}}}


@pytest.mark.parametrize("rel", crd.CRD_PATHS, ids=str)
def test_shipped_crd_files_match_the_models(rel):
    """Drift check: regenerate with `dgserve operator generate` after editing dgserve.operator.spec."""
    shipped = (REPO_ROOT / rel).read_text()
    assert yaml.safe_load(shipped) == crd.build_crd(), f"{rel} drifted from dgserve.operator.spec"
    assert shipped == crd.crd_yaml()


def test_crd_is_a_valid_apiextensions_object():
    assert kubernetes_validate.validate(crd.build_crd(), K8S_VERSION, strict=True) is not None


def test_schema_is_structural():
    assert structural_problems(dg_schema()) == []


def test_structural_check_can_fail():
    broken = copy.deepcopy(dg_schema())
    broken["properties"]["spec"]["properties"]["model"]["$ref"] = "#/x"
    broken["properties"]["spec"]["properties"]["quantization"]["default"] = "int3"
    problems = structural_problems(broken)
    assert any("has $ref" in p for p in problems) and any("int3" in p for p in problems)


def test_crd_names_columns_and_subresource():
    spec = crd.build_crd()["spec"]
    assert spec["group"] == "dgserve.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == "diffusiongemmas" and spec["names"]["shortNames"] == ["dg"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns == ["Ready", "Replicas", "Context", "Age"]


def test_every_field_is_described():
    def missing(schema, path=""):
        out = [] if schema.get("description") or path.endswith("metadata") or path in ("", "/apiVersion", "/kind") \
            else [path]
        for name, sub in (schema.get("properties") or {}).items():
            out += missing(sub, f"{path}/{name}")
        if isinstance(schema.get("items"), dict) and schema["items"].get("properties"):
            out += missing(schema["items"], f"{path}[]")
        return out

    assert missing(dg_schema()) == []


def test_api_server_defaults_equal_python_defaults():
    """A minimal CR defaulted by the schema is exactly what the model fills in."""
    stored = admit(MINIMAL)
    assert stored["spec"] == DiffusionGemmaSpec.model_validate(MINIMAL["spec"]).model_dump(
        mode="json", by_alias=True, exclude_none=True)


@pytest.mark.parametrize("partial", [
    {"resources": {"head": {"memory": "16Gi"}}},
    {"fallback": {"type": "InCluster", "contextLength": 300000, "inCluster": {}}},
    {"replicas": {"max": 3}},
])
def test_nested_defaults_agree(partial):
    spec = {**MINIMAL["spec"], **partial}
    stored = admit({**MINIMAL, "spec": spec})
    assert stored["spec"] == DiffusionGemmaSpec.model_validate(spec).model_dump(
        mode="json", by_alias=True, exclude_none=True)


def test_example_and_test_resources_validate_against_the_crd():
    docs = [d for d in load_yaml_docs(EXAMPLE) if d.get("kind") == names.KIND] + [MINIMAL]
    assert docs
    for doc in docs:
        stored = admit(doc)
        DiffusionGemmaSpec.model_validate(stored["spec"])


@pytest.mark.parametrize("bad, fragment", [
    ({"quantization": "int4"}, "int4"),
    ({"maxBatchPerReplica": 9}, "9"),
    ({"maxBatchPerReplica": 0}, "0"),
    ({"tensorParallelSize": 3}, "3"),
    ({"contextLength": 100}, "100"),
    ({"grpcPort": 80}, "80"),
    ({"replicas": {"min": 0}}, "0"),
    ({"telemetry": {"samplingRatio": 1.5}}, "1.5"),
    ({"fallback": {"type": "Sometimes"}}, "Sometimes"),
    ({"resources": {"worker": {"memory": "lots"}}}, "lots"),
    ({"modelz": {}}, "modelz"),
])
def test_schema_refuses_out_of_range_values(bad, fragment):
    obj = copy.deepcopy(MINIMAL)
    obj["spec"].update(bad)
    with pytest.raises(jsonschema.ValidationError) as info:
        validate(apply_defaults(obj, dg_schema()), strict(dg_schema()))
    assert fragment in str(info.value.message) + str(info.value.instance)
    with pytest.raises(ValueError):  # and the model refuses it the same way
        DiffusionGemmaSpec.model_validate(obj["spec"])


STATUS_SCENARIOS = {
    "kuberay-missing": Observation(kuberay_installed=False),
    "invalid": Observation(invalid_spec="quantization 'fp8' not supported"),
    "pending": Observation(rayservice=None),
    "ready": Observation(rayservice={
        "metadata": {"generation": 1},
        "status": {"observedGeneration": 1, "serviceStatus": "Running",
                   "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"}],
                   "activeServiceStatus": {"applicationStatuses": {"dgserve": {
                       "status": "RUNNING",
                       "serveDeploymentStatuses": {"DiffusionReplica": {"status": "HEALTHY"}}}}}}}),
}


@pytest.mark.parametrize("scenario", sorted(STATUS_SCENARIOS))
def test_status_survives_the_api_server_round_trip(scenario):
    """The status-pruning pitfall: every field the operator writes is in the status schema."""
    spec = DiffusionGemmaSpec.model_validate(MINIMAL["spec"])
    status = compute_status(spec, Owner("tiny", "ns", "u"), old=None, obs=STATUS_SCENARIOS[scenario],
                            now="2026-01-01T00:00:00Z", generation=3)
    schema = dg_schema()["properties"]["status"]
    assert prune(status, schema) == status
    validate(status, strict(schema))


def test_pruning_check_can_fail():
    schema = dg_schema()["properties"]["status"]
    assert prune({"observedGeneration": 1, "kopf": {"progress": {}}}, schema) == {"observedGeneration": 1}
