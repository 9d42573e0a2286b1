"""The Grafana dashboard (k8s/grafana/helios-dashboard.json) and its sidecar ConfigMap (rendered, drift-checked).

That every metric the dashboard queries is really exported is checked on a live cluster:
tests/serve/test_dashboard.py::test_grafana_dashboard_queries_only_exported_metrics.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "k8s" / "grafana"
DOCUMENTED = {  # docs/serving.md, "Metrics", as Prometheus names
    "ray_helios_time_to_first_token_seconds", "ray_helios_time_per_output_token_seconds",
    "ray_helios_e2e_request_latency_seconds", "ray_helios_requests_total", "ray_helios_generation_tokens_total",
    "ray_helios_confidence_breaches_total", "ray_helios_request_errors_total", "ray_helios_exit_depth",
    "ray_helios_num_requests_running", "ray_helios_num_requests_waiting", "ray_helios_kv_cache_usage_ratio",
    "ray_helios_loaded_layers", "ray_helios_placement_changes_total", "ray_helios_requests_shed_total",
    "ray_helios_admission_limit", "ray_helios_requests_resumed_total", "ray_helios_routed_requests_total",
    "ray_helios_route_prediction_error", "ray_helios_group_placement_depth",
}


def _render():
    spec = importlib.util.spec_from_file_location("helios_grafana_render", GRAFANA / "render.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dashboard() -> dict:
    return json.loads((GRAFANA / "helios-dashboard.json").read_text())


def test_dashboard_json_is_a_grafana_dashboard():
    dash = _dashboard()
    assert dash["uid"] == "helios-ray" and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    for p in dash["panels"]:
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys() and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]  # works with any Prometheus data source
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert set(re.findall(r"\$(\w+)", t["expr"])) <= variables, t["expr"]


def test_dashboard_queries_the_documented_metrics():
    exprs = " ".join(t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", []))
    used = set(re.findall(r"\b(ray_helios_[a-z0-9_]+?)(?:_bucket|_sum|_count)?\b", exprs))
    assert used <= DOCUMENTED, used - DOCUMENTED
    assert DOCUMENTED <= used, f"metrics without a panel: {DOCUMENTED - used}"


def test_configmap_is_rendered_from_the_json_and_follows_the_sidecar_convention():
    render = _render()
    cm_text = (GRAFANA / "configmap.yaml").read_text()
    assert cm_text == render.render((GRAFANA / "helios-dashboard.json").read_text()), \
        "k8s/grafana/configmap.yaml is out of date: run python k8s/grafana/render.py"
    cm = yaml.safe_load(cm_text)
    assert cm["apiVersion"] == "v1" and cm["kind"] == "ConfigMap"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # a string: labels are strings
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", cm["metadata"]["name"])
    assert json.loads(cm["data"]["helios-dashboard.json"]) == _dashboard()
    assert render.main(["--check"]) == 0


def test_drift_is_detected(tmp_path, monkeypatch):
    render = _render()
    stale = tmp_path / "configmap.yaml"
    stale.write_text(render.render((GRAFANA / "helios-dashboard.json").read_text()).replace('"10s"', '"5s"'))
    monkeypatch.setattr(render, "CONFIGMAP", stale)
    assert render.main(["--check"]) == 1
