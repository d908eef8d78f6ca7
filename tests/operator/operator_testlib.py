"""Helpers of the operator tests: what the API server would do with a structural schema
(defaulting, pruning, strict field validation), CEL with cel-python, and a recording double of
the Kubernetes API (no kube-apiserver can run on CI machines; see DESIGN.md).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from dgserve.operator import crd, names
from dgserve.operator.errors import TransientApiError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
KUBERAY_RAYSERVICE_CRD = SHARED / "crds/kuberay/ray.io_rayservices.yaml"


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def version_schema(crd_obj: dict[str, Any], version: str) -> dict[str, Any]:
    for v in crd_obj["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(version)


@functools.cache
def _rayservice_schema() -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return version_schema(yaml.load(KUBERAY_RAYSERVICE_CRD.read_text(), Loader=loader), names.RAY_VERSION)


def rayservice_schema() -> dict[str, Any]:
    """KubeRay v1.7's RayService v1 schema (a copy: callers may mutate it)."""
    return copy.deepcopy(_rayservice_schema())


@functools.cache
def _dg_schema() -> dict[str, Any]:
    return crd.openapi_schema()


def dg_schema() -> dict[str, Any]:
    return copy.deepcopy(_dg_schema())


# --- what the API server does with a structural schema ------------------------------------------


def apply_defaults(obj: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting: fill absent properties that have a ``default``, top-down."""
    obj = copy.deepcopy(obj)
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                obj[key] = apply_defaults(obj[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in obj:
                if key not in (schema.get("properties") or {}):
                    obj[key] = apply_defaults(obj[key], extra)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        obj = [apply_defaults(item, schema["items"]) for item in obj]
    return obj


def prune(obj: Any, schema: dict[str, Any]) -> Any:
    """Structural pruning: drop every field the schema does not declare (unless it preserves them).
    ``metadata: {type: object}`` is ObjectMeta, which the API server checks itself: kept as is."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return copy.deepcopy(obj)
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = {}
        for key, value in obj.items():
            if props is not None and key in props:
                sub = props[key]
                bare_meta = key == "metadata" and "properties" not in sub and "additionalProperties" not in sub
                out[key] = copy.deepcopy(value) if bare_meta else prune(value, sub)
            elif isinstance(extra, dict):
                out[key] = prune(value, extra)
        return out
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in obj]
    return obj


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused (what kubectl's strict field validation does)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = strict(schema[key])
    if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validate(obj: Any, schema: dict[str, Any]) -> None:
    """OpenAPI v3.0 schemas are draft-4 flavoured (boolean exclusiveMinimum)."""
    jsonschema.Draft4Validator(schema).validate(obj)


def structural_problems(schema: dict[str, Any], path: str = "") -> list[str]:
    """Violations of the Kubernetes structural-schema rules (the subset our generator could break)."""
    problems = []
    for bad in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "const", "nullable", "definitions"):
        if bad in schema:
            problems.append(f"{path or '/'}: has {bad}")
    if schema.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties false")
    if "properties" in schema and isinstance(schema.get("additionalProperties"), dict):
        problems.append(f"{path}: both properties and additionalProperties")
    if "type" not in schema and not (schema.get("x-kubernetes-int-or-string")
                                     or schema.get("x-kubernetes-preserve-unknown-fields")):
        problems.append(f"{path}: no type")
    if isinstance(schema.get("exclusiveMinimum"), (int, float)) and not isinstance(schema["exclusiveMinimum"], bool):
        problems.append(f"{path}: numeric exclusiveMinimum (OpenAPI v3.0 wants a boolean)")
    if "default" in schema:
        try:
            validate(schema["default"], strict(schema))
        except jsonschema.ValidationError as e:
            problems.append(f"{path}: default {schema['default']!r} is invalid: {e.message}")
        if prune(schema["default"], schema) != schema["default"]:
            problems.append(f"{path}: default {schema['default']!r} would be pruned")
    for key in schema.get("x-kubernetes-list-map-keys") or []:
        item = schema.get("items") or {}
        if key not in (item.get("required") or []) and "default" not in (item.get("properties") or {}).get(key, {}):
            problems.append(f"{path}: list-map key {key} is neither required nor defaulted")
    for name, sub in (schema.get("properties") or {}).items():
        problems += structural_problems(sub, f"{path}/{name}")
    if isinstance(schema.get("items"), dict):
        problems += structural_problems(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{path}/*")
    return problems


def admit(obj: dict[str, Any]) -> dict[str, Any]:
    """What the API server stores for a DiffusionGemma: defaulted, pruned, strictly validated
    (CEL rules are checked separately, with cel-python)."""
    schema = dg_schema()
    out = prune(apply_defaults(obj, schema), schema)
    validate(out, strict(schema))
    return out


# --- CEL ------------------------------------------------------------------------------------------


def cel_json(obj: Any, schema: dict[str, Any]) -> Any:
    """JSON typed the way the API server hands it to CEL (``type: number`` values are doubles)."""
    if isinstance(obj, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else {}
        return {k: cel_json(v, props.get(k, extra)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cel_json(v, schema.get("items") or {}) for v in obj]
    if schema.get("type") == "number" and isinstance(obj, int) and not isinstance(obj, bool):
        return float(obj)
    return obj


def cel_eval(expr: str, self_value: Any) -> Any:
    import celpy

    env = celpy.Environment()
    program = env.program(env.compile(expr))
    return program.evaluate({"self": celpy.json_to_cel(self_value)})


def cel_rule_failures(obj: Any, schema: dict[str, Any], path: str = "") -> list[tuple[str, str, str]]:
    """Every x-kubernetes-validations rule that fails on ``obj``: (path, rule, message)."""
    failures = []
    typed = cel_json(obj, schema)
    for rule in schema.get("x-kubernetes-validations") or []:
        if not bool(cel_eval(rule["rule"], typed)):
            message = (str(cel_eval(rule["messageExpression"], typed)) if "messageExpression" in rule
                       else rule["message"])
            failures.append((path or "/", rule["rule"], message))
    if isinstance(obj, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in obj:
                failures += cel_rule_failures(obj[key], sub, f"{path}/{key}")
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            failures += cel_rule_failures(item, schema["items"], f"{path}[{i}]")
    return failures


# --- a recording double of the Kubernetes API -----------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 (what the API server does with application/merge-patch+json)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeKube:
    """In-memory :class:`~dgserve.operator.kube.Kube` that records every call.

    A double, because no kube-apiserver can run on CI machines. It imitates what matters here:
    merge-patch semantics, generation bumps on spec changes, server-side defaults (the
    ``server_defaults`` added to every stored RayService, as KubeRay's CRD defaults would be),
    status pruning by our CRD's status schema, and injectable failures.
    """

    def __init__(self, *, kuberay: bool = True) -> None:
        self.kuberay = kuberay
        self.rayservices: dict[tuple[str, str], dict[str, Any]] = {}
        self.diffusiongemmas: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, ...]] = []
        self.fail_next: Exception | None = None
        self.server_defaults: dict[str, Any] = {}
        self._uid = 0

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc

    def writes(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if not c[0].startswith(("get", "discover"))]

    # the Kube protocol
    def rayservice_api_available(self) -> bool:
        self.calls.append(("discover",))
        self._maybe_fail()
        return self.kuberay

    def get_rayservice(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get_rayservice", namespace, name))
        self._maybe_fail()
        obj = self.rayservices.get((namespace, name))
        return copy.deepcopy(obj) if obj else None

    def create_rayservice(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create_rayservice", namespace, body["metadata"]["name"]))
        self._maybe_fail()
        key = (namespace, body["metadata"]["name"])
        if key in self.rayservices:
            raise TransientApiError("conflict (409)", delay=1.0)
        obj = merge_patch(copy.deepcopy(body), {"spec": self.server_defaults})
        self._uid += 1
        obj["metadata"].update(uid=f"rs-{self._uid}", generation=1, resourceVersion="1")
        self.rayservices[key] = obj
        return copy.deepcopy(obj)

    def patch_rayservice(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("patch_rayservice", namespace, name, json.dumps(patch, sort_keys=True)))
        self._maybe_fail()
        old = self.rayservices[(namespace, name)]
        new = merge_patch(old, patch)
        new = merge_patch(new, {"spec": {k: v for k, v in self.server_defaults.items() if k not in new["spec"]}})
        if new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
        self.rayservices[(namespace, name)] = new
        return copy.deepcopy(new)

    def get_diffusiongemma(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get_diffusiongemma", namespace, name))
        self._maybe_fail()
        obj = self.diffusiongemmas.get((namespace, name))
        return copy.deepcopy(obj) if obj else None

    def patch_diffusiongemma_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.calls.append(("patch_status", namespace, name, json.dumps(status, sort_keys=True)))
        self._maybe_fail()
        obj = self.diffusiongemmas.setdefault((namespace, name), {"metadata": {"name": name, "namespace": namespace}})
        merged = merge_patch(obj.get("status") or {}, status)
        obj["status"] = prune(merged, dg_schema()["properties"]["status"])  # the API server prunes status too

    # helpers for tests
    def add_diffusiongemma(self, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("uid", f"dg-{meta['name']}")
        meta.setdefault("generation", 1)
        self.diffusiongemmas[(meta["namespace"], meta["name"])] = body
        return copy.deepcopy(body)

    def set_rayservice_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.rayservices[(namespace, name)]["status"] = copy.deepcopy(status)
        return copy.deepcopy(self.rayservices[(namespace, name)])
