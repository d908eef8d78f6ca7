"""The Grafana dashboard (deploy/grafana/), its Helm ConfigMap, the OTel Collector example and the
metrics documentation agree with what the code exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dgserve.serving import telemetry

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy/grafana/dgserve-dashboard.json"
CHART = REPO / "charts/dgserve-operator"
K8S_VERSION = "1.35.0"

PROMQL_WORDS = {
    # aggregations, functions and keywords that may appear without a following "("
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label names
    (inside {...} or by/without/on(...)), label values (strings), ranges ([...]) or Grafana variables."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings (label values may look like anything)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    s = re.sub(r"\b\d+(\.\d+)?([eE][+-]?\d+)?\b", " ", s)  # numbers (1e-9)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        rest = s[m.end():].lstrip()
        if rest.startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.95, sum by (le, backend) (rate(ray_a_bucket{application=~"$app", code="OK"}'
     '[$__rate_interval])))', {"ray_a_bucket"}),
    ('sum(rate(x_total{code!="rate(y)"}[5m])) / clamp_min(sum(rate(y_total[1m])), 1e-9)', {"x_total", "y_total"}),
    ("min(served) - max(promised) > bool 0", {"served", "promised"}),
    ("label_values(ray_dgserve_router_requests_total, application)", {"ray_dgserve_router_requests_total",
                                                                       "application"}),
])
def test_promql_metric_extraction(expr, names):
    assert promql_metrics(expr) == names


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def test_every_query_uses_a_metric_the_code_exports(dashboard):
    exported = telemetry.exported_series()
    used = set()
    for p in panels(dashboard):
        for t in p.get("targets", []):
            if "expr" in t:
                names = promql_metrics(t["expr"])
                assert names, (p["title"], t["expr"])
                assert names <= exported, (p["title"], names - exported)
                used |= names
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    app_query = variables["application"]["query"]["query"]
    assert promql_metrics(app_query) - {"application"} <= exported
    # and every exported metric is on the dashboard
    unused = {m.name for m in telemetry.METRICS if not set(telemetry.prometheus_names(m)) & used}
    assert not unused, unused


def test_no_dangling_panels(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus" and variables["traces"]["query"] == "tempo"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for p in panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["title"] and p.get("description"), p
        uid = p["datasource"]["uid"]
        assert uid in ("${datasource}", "${traces}"), (p["title"], uid)
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid
            query = t.get("expr") or t.get("query")
            assert query and query.strip(), (p["title"], t)
            assert ("expr" in t) == (uid == "${datasource}"), p["title"]
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0


def test_trace_panels_and_link_name_spans_the_code_emits(dashboard):
    queries = [t["query"] for p in panels(dashboard) for t in p.get("targets", []) if "query" in t]
    span_names = {m for q in queries for m in re.findall(r'(?<![.\w])name = "([^"]+)"', q)}
    assert span_names == {telemetry.STARTUP_SPAN, telemetry.ROUTE_SPAN}
    assert any("service.name" in q and "kind = server" in q for q in queries)
    (link,) = dashboard["links"]
    assert link["url"].startswith("/explore?") and "%24%7Btraces%7D" in link["url"]  # ${traces}, URL-encoded


def test_dashboard_shows_the_batch_band_and_the_issue_s_views(dashboard):
    titles = {p["title"]: p for p in panels(dashboard)}
    band = titles["Batch size per diffusion replica"]
    steps = band["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, 1, 8.5] and steps[1]["color"] == "green"
    assert band["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line+area"
    for t in ("Request latency by backend", "Output tokens / s by deployment", "Overflow share",
              "Denoising steps per canvas", "Served vs promised context", "Start-up verification (traces)",
              "Time to first canvas", "Queue wait", "Tokens committed per step"):
        assert t in titles, t


def test_chart_ships_the_same_dashboard():
    assert (CHART / "dashboards/dgserve-dashboard.json").read_bytes() == DASHBOARD.read_bytes(), \
        "copy deploy/grafana/dgserve-dashboard.json to charts/dgserve-operator/dashboards/"


def _template(helm, *sets):
    cmd = [helm, "template", "dg", str(CHART), "--namespace", "dgserve-system"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_helm_provisions_the_dashboard_configmap_when_enabled(helm, dashboard):
    assert not [d for d in _template(helm) if d["kind"] == "ConfigMap"]  # off by default
    docs = _template(helm, "grafanaDashboard.enabled=true", "grafanaDashboard.namespace=monitoring",
                     "grafanaDashboard.annotations.grafana_folder=dgserve")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    kubernetes_validate.validate(cm, K8S_VERSION, strict=True)
    meta = cm["metadata"]
    assert meta["labels"]["grafana_dashboard"] == "1" and meta["namespace"] == "monitoring"
    assert meta["annotations"] == {"grafana_folder": "dgserve"}
    assert json.loads(cm["data"]["dgserve-dashboard.json"]) == dashboard
    lint = subprocess.run([helm, "lint", "--strict", str(CHART), "--set", "grafanaDashboard.enabled=true"],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_otel_collector_example_is_valid_and_matches_the_example_endpoint():
    docs = [d for d in yaml.safe_load_all((REPO / "deploy/otel-collector.yaml").read_text()) if d]
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    by_kind = {d["kind"]: d for d in docs}
    config = yaml.safe_load(by_kind["ConfigMap"]["data"]["config.yaml"])
    for name, pipeline in config["service"]["pipelines"].items():
        for part in ("receivers", "processors", "exporters"):
            assert set(pipeline[part]) <= set(config[part]), (name, part)
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    svc = by_kind["Service"]
    endpoint = yaml.safe_load((REPO / "deploy/diffusiongemma.yaml").read_text())["spec"]["telemetry"]["otlpEndpoint"]
    host, port = endpoint.rsplit(":", 1)
    assert host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    assert by_kind["Deployment"]["spec"]["selector"]["matchLabels"].items() <= \
        by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert pod["volumes"][0]["configMap"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]


def test_docs_list_exactly_the_exported_metrics():
    doc = (REPO / "docs/observability.md").read_text()
    documented = set(re.findall(r"^\| `(dgserve_[a-z_]+)`", doc, re.M))
    assert documented == {m.name for m in telemetry.METRICS}
