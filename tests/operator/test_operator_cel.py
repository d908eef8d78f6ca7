"""The CRD's cross-field rules (x-kubernetes-validations), evaluated with cel-python on good and
bad specs, must agree with the same rules enforced by the pydantic models."""

from __future__ import annotations

import copy

import pytest

from dgserve.operator import names
from dgserve.operator.spec import NAME_RULE, DiffusionGemmaSpec
from operator_testlib import apply_defaults, cel_rule_failures, dg_schema

SEC = {"security": {"allowPlaintext": True}}  # plaintext must be explicit (or tls)
BASE = {"model": {"huggingFace": {"repo": "google/diffusiongemma-26B-A4B-it"}}, **SEC}
EXT = {"url": "http://vllm:8000/v1", "model": "gemma-4"}


def spec(**over):
    out = copy.deepcopy(BASE)
    out.update(over)
    return out


GOOD = {
    "minimal": spec(),
    "pvc": {"model": {"pvc": {"claimName": "m", "path": "a/b"}}, **SEC},
    "tls": spec(security={"tls": {"secretName": "grpc-tls"}}),
    "mtls-token-limits": spec(security={"tls": {"secretName": "grpc-tls", "clientAuth": "Require",
                                                "clientCaSecretName": "clients-ca"},
                                        "auth": {"tokenSecret": {"name": "grpc-token"}},
                                        "limits": {"maxNewTokens": 4096, "maxConcurrentPerClient": 0}}),
    "tp8-on-8": spec(tensorParallelSize=8, resources={"gpusPerWorker": 8}),
    "tp2-on-8": spec(tensorParallelSize=2, resources={"gpusPerWorker": 8}),
    "autoscale": spec(replicas={"min": 1, "max": 4, "targetOngoingRequests": 3}, maxBatchPerReplica=4),
    "fallback-external": spec(fallback={"type": "External", "contextLength": 262144, "external": EXT}),
    "fallback-incluster-longer": spec(contextLength=8192, fallback={"type": "InCluster", "contextLength": 8192}),
    "fallback-disabled-no-context": spec(fallback={"type": "Disabled"}),
    "toleration-exists": spec(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]),
}

BAD = {  # name: (spec, words the message must contain)
    "both-sources": ({"model": {"huggingFace": {"repo": "a/b"}, "pvc": {"claimName": "m"}}, **SEC},
                     ["exactly one"]),
    "no-source": ({"model": {}, **SEC}, ["exactly one"]),
    "no-security": ({"model": {"pvc": {"claimName": "m"}}}, ["security.tls.secretName", "allowPlaintext: true"]),
    "plaintext-not-allowed": (spec(security={"allowPlaintext": False}), ["allowPlaintext: true"]),
    "tls-and-plaintext": (spec(security={"tls": {"secretName": "t"}, "allowPlaintext": True}), ["contradict"]),
    "min-gt-max": (spec(replicas={"min": 3, "max": 2}), ["3", "2"]),
    "tp-over-gpus": (spec(tensorParallelSize=4, resources={"gpusPerWorker": 2}), ["4", "2"]),
    "gpus-not-multiple": (spec(tensorParallelSize=2, resources={"gpusPerWorker": 3}), ["3", "2"]),
    "fallback-too-short": (spec(fallback={"type": "InCluster", "contextLength": 8192}), ["8192", "262144"]),
    "fallback-no-context": (spec(fallback={"type": "External", "external": EXT}), ["contextLength", "External"]),
    "external-missing": (spec(fallback={"type": "External", "contextLength": 300000}), ["external"]),
    "external-but-disabled": (spec(fallback={"type": "Disabled", "external": EXT}), ["external", "Disabled"]),
    "incluster-but-external": (spec(fallback={"type": "External", "contextLength": 300000, "external": EXT,
                                              "inCluster": {}}), ["inCluster", "External"]),
    "fallback-model-both": (spec(fallback={"type": "InCluster", "contextLength": 300000, "inCluster": {"model": {
        "huggingFace": {"repo": "a/b"}, "pvc": {"claimName": "m"}}}}), ["at most one"]),
    "target-over-batch": (spec(replicas={"min": 1, "max": 2, "targetOngoingRequests": 6}, maxBatchPerReplica=4),
                          ["6", "4"]),
    "ray-port": (spec(grpcPort=8265), ["8265"]),
    "pvc-dotdot": ({"model": {"pvc": {"claimName": "m", "path": "a/../../etc"}}, **SEC}, [".."]),
    "exists-with-value": (spec(tolerations=[{"key": "k", "operator": "Exists", "value": "v"}]), ["Exists", "v"]),
}


def cel_failures(raw_spec):
    obj = {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": "g"}, "spec": raw_spec}
    schema = dg_schema()
    return cel_rule_failures(apply_defaults(obj, schema), schema)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_specs_pass_cel_and_python(name):
    assert cel_failures(GOOD[name]) == []
    DiffusionGemmaSpec.model_validate(GOOD[name])


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_specs_fail_cel_and_python_with_the_values(name):
    raw, words = BAD[name]
    failures = cel_failures(raw)
    assert len(failures) == 1, failures
    _, _, cel_message = failures[0]
    with pytest.raises(ValueError) as info:
        DiffusionGemmaSpec.model_validate(raw)
    for word in words:
        assert word in cel_message, (word, cel_message)
        assert word in str(info.value), (word, str(info.value))


def test_every_rule_is_exercised():
    """Each CEL rule in the CRD fails for at least one bad spec above (no untested rule)."""
    def rules(schema):
        out = [r["rule"] for r in schema.get("x-kubernetes-validations") or []]
        for sub in (schema.get("properties") or {}).values():
            out += rules(sub)
        if isinstance(schema.get("items"), dict):
            out += rules(schema["items"])
        return out

    spec_rules = set(rules(dg_schema()["properties"]["spec"]))
    failed = {rule for raw, _ in BAD.values() for _, rule, _ in cel_failures(raw)}
    assert spec_rules - failed == set()


@pytest.mark.parametrize("name, ok", [("g" * 40, True), ("g" * 41, False)])
def test_name_rule(name, ok):
    obj = {"metadata": {"name": name}, "spec": BASE}
    failures = cel_rule_failures(apply_defaults(obj, dg_schema()), dg_schema())
    assert (failures == []) is ok
    assert NAME_RULE.check(name) is ok
