"""The Grafana dashboards (deploy/grafana/): committed as generated, well formed, and built on the
series docs/metrics.md documents. Running every query against a real Prometheus is another
test's job; it lists them with the generator's `panel_queries`."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "deploy" / "grafana" / "generate.py"
COMMITTED = ROOT / "deploy" / "grafana" / "dashboards"
METRICS_DOC = ROOT / "docs" / "metrics.md"
REGENERATE = "run `python deploy/grafana/generate.py` and commit deploy/grafana/dashboards/"


def load_generator():
    """deploy/ is not a package: import the generator from its path."""
    spec = importlib.util.spec_from_file_location("flora_grafana_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building a class
    spec.loader.exec_module(module)
    return module


generate = load_generator()
DASHBOARDS = generate.build_dashboards()
each_dashboard = pytest.mark.parametrize("name", sorted(DASHBOARDS))


def panels(dashboard: dict) -> list[dict]:
    """The panels that query: row headers aside."""
    return [item for item in generate.iter_panels(dashboard["panels"]) if item["type"] != "row"]


def exprs(dashboard: dict) -> list[str]:
    return [expr for _, expr in generate.panel_queries(dashboard)]


def documented_series() -> dict[str, str]:
    """Series name -> type (counter, gauge, histogram), from the tables of docs/metrics.md."""
    rows = re.findall(r"^\| `(flora_\w+)` \| (\w+) \|", METRICS_DOC.read_text(encoding="utf-8"), re.MULTILINE)
    assert rows, "no series tables found in docs/metrics.md"
    return dict(rows)


def series_used(expr: str) -> set[str]:
    """The flora_* series an expr reads, histograms' _bucket/_sum/_count folded onto their name."""
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"\bflora_\w+", expr)}


# ---- (1) the committed JSON is the generator's output ------------------------------------------


def test_committed_dashboards_equal_the_generator_output(tmp_path):
    generate.main(tmp_path)
    fresh = {path.name: path.read_text(encoding="utf-8") for path in tmp_path.glob("*.json")}
    committed = {path.name: path.read_text(encoding="utf-8") for path in COMMITTED.glob("*.json")}
    assert sorted(committed) == sorted(fresh), f"deploy/grafana/dashboards/ lists other files: {REGENERATE}"
    for name, text in fresh.items():
        assert committed[name] == text, f"deploy/grafana/dashboards/{name} is stale: {REGENERATE}"


def test_the_generator_is_deterministic():
    again = generate.build_dashboards()
    assert [generate.render(d) for d in again.values()] == [generate.render(d) for d in DASHBOARDS.values()]
    assert all(generate.render(d).endswith("}\n") for d in DASHBOARDS.values())


def test_dashboards_have_stable_uids_and_the_agreed_settings():
    uids = {name: dashboard["uid"] for name, dashboard in DASHBOARDS.items()}
    assert uids == {"gateway-overview.json": "flora-gateway-overview", "tenant.json": "flora-tenant",
                    "engine.json": "flora-engine"}
    for dashboard in DASHBOARDS.values():
        assert dashboard["refresh"] == "10s"
        assert dashboard["time"] == {"from": "now-30m", "to": "now"}
        assert dashboard["schemaVersion"] >= 39


# ---- (2) panels: datasource, queries, ids, layout ----------------------------------------------


@each_dashboard
def test_every_panel_queries_the_prometheus_datasource(name):
    for item in panels(DASHBOARDS[name]):
        where = f"{name}: panel {item['title']!r}"
        assert item["datasource"] == {"type": "prometheus", "uid": "prometheus"}, where
        assert item["description"].strip(), f"{where} has no description"
        assert item["fieldConfig"]["defaults"]["unit"], f"{where} has no unit"
        assert item["targets"], f"{where} has no query"
        for target in item["targets"]:
            assert target["datasource"]["uid"] == "prometheus", where
            assert target["expr"].strip(), f"{where}: empty expr in target {target['refId']}"
        ref_ids = [target["refId"] for target in item["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), f"{where}: repeated refId"


@each_dashboard
def test_rate_windows_follow_grafanas_rate_interval(name):
    for expr in exprs(DASHBOARDS[name]):
        windows = re.findall(r"\[([^\]]+)\]", expr)
        assert set(windows) <= {"$__rate_interval"}, expr
        assert expr.count("rate(") == len(windows), expr


@each_dashboard
def test_panel_ids_are_unique(name):
    ids = [item["id"] for item in generate.iter_panels(DASHBOARDS[name]["panels"])]
    assert len(set(ids)) == len(ids), f"{name}: repeated panel ids {sorted(ids)}"


@each_dashboard
def test_panels_do_not_overlap_and_fit_the_grid(name):
    cells: dict[tuple[int, int], str] = {}
    for item in generate.iter_panels(DASHBOARDS[name]["panels"]):
        pos = item["gridPos"]
        assert pos["x"] >= 0 and pos["y"] >= 0 and pos["w"] > 0 and pos["h"] > 0, item["title"]
        assert pos["x"] + pos["w"] <= 24, f"{name}: {item['title']!r} runs off the 24-column grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{name}: {item['title']!r} overlaps {cells[(x, y)]!r} at {(x, y)}"
                cells[(x, y)] = item["title"]


def test_panel_queries_lists_every_target():
    for dashboard in DASHBOARDS.values():
        expected = [(item["title"], target["expr"]) for item in panels(dashboard) for target in item["targets"]]
        assert generate.panel_queries(dashboard) == expected


# ---- (3) only documented series ----------------------------------------------------------------


def test_every_series_queried_is_documented():
    documented = documented_series()
    queries = [expr for dashboard in DASHBOARDS.values() for expr in exprs(dashboard)]
    queries += [variable["query"] for dashboard in DASHBOARDS.values() for variable in dashboard["templating"]["list"]]
    used = set().union(*map(series_used, queries))
    assert used, "no flora_* series found in any query"
    assert used <= documented.keys(), f"not in docs/metrics.md: {sorted(used - documented.keys())}"


def test_series_are_read_as_their_type():
    """Quantiles come from histograms' buckets; counters are only read through rate()."""
    documented = documented_series()
    for dashboard in DASHBOARDS.values():
        for title, expr in generate.panel_queries(dashboard):
            for name in re.findall(r"\bflora_\w+_bucket\b", expr):
                assert documented[name.removesuffix("_bucket")] == "histogram", f"{title}: {name}"
            for name in re.findall(r"\bflora_\w+", expr):
                if documented.get(name) == "counter":
                    assert re.search(rf"\brate\({name}\b", expr), f"{title}: counter {name} outside rate()"


def test_every_documented_series_has_a_panel():
    """A series nobody charts is either dead or missing from the dashboards."""
    used = set().union(*(series_used(expr) for dashboard in DASHBOARDS.values() for expr in exprs(dashboard)))
    assert set(documented_series()) <= used, f"never charted: {sorted(set(documented_series()) - used)}"


def test_every_expr_is_valid_promql(tmp_path):
    """promtool parses every query, as a recording rule with Grafana's variables filled in."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: scripts/install-system-deps.sh (Debian's prometheus package)")
    rules = []
    for name, dashboard in DASHBOARDS.items():
        for number, (title, expr) in enumerate(generate.panel_queries(dashboard)):
            concrete = expr.replace("$__rate_interval", "1m").replace("$tenant", "acme")
            rules.append({"record": f"dashboard:{Path(name).stem.replace('-', '_')}:query_{number}", "expr": concrete})
    rules_file = tmp_path / "dashboard-queries.yml"
    # JSON is YAML: no YAML writer needed.
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}), encoding="utf-8")
    check = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


# ---- (4) the tenant dashboard ------------------------------------------------------------------


def test_tenant_dashboard_has_the_tenant_variable():
    variables = {variable["name"]: variable for variable in DASHBOARDS["tenant.json"]["templating"]["list"]}
    assert "tenant" in variables
    tenant = variables["tenant"]
    assert tenant["type"] == "query" and tenant["datasource"]["uid"] == "prometheus"
    assert tenant["query"] == "label_values(flora_requests_total, tenant)"
    assert not tenant["multi"] and not tenant["includeAll"], 'queries match tenant="$tenant" exactly'


def test_every_tenant_dashboard_query_filters_on_the_tenant():
    for title, expr in generate.panel_queries(DASHBOARDS["tenant.json"]):
        selectors = re.findall(r"\bflora_\w+(\{[^}]*\})?", expr)
        assert selectors, f"{title}: no flora_* series in {expr}"
        for matchers in selectors:
            assert 'tenant="$tenant"' in matchers, f'{title}: a selector without tenant="$tenant" in {expr}'
