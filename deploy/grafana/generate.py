"""Generates the gateway's Grafana dashboards from Python, so they stay reviewable.

    python deploy/grafana/generate.py            # rewrites deploy/grafana/dashboards/*.json
    python deploy/grafana/generate.py OUT_DIR    # writes them somewhere else

Three dashboards, every query on the raw series of docs/metrics.md (no recording rules, so
a dashboard works against any Prometheus scraping the gateway):

- gateway-overview.json: the router's view of every tenant together;
- tenant.json: the same view for one tenant, picked with the `tenant` variable;
- engine.json: the worker replicas: scheduler, engine steps and the adapter cache.

Plain dicts dumped as JSON with the standard library only. The output is deterministic
(insertion-ordered dicts, ids and positions assigned in order), so a test can compare the
committed files with a fresh run. `panel_queries` lists every (panel title, expr) of a
dashboard for the test that runs each query against a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
GRID_COLUMNS = 24  # Grafana's grid is 24 columns wide
# Grafana's $__rate_interval is at least four scrape intervals (the datasource's
# timeInterval), so rate() always has enough samples whatever the zoom.
RATE_WINDOW = "[$__rate_interval]"
TENANT = 'tenant="$tenant"'


# ---- PromQL ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One query of a panel; `legend` is Grafana's legend format ("{{code}}")."""

    expr: str
    legend: str = ""


def selector(metric: str, matchers: str = "") -> str:
    return f"{metric}{{{matchers}}}" if matchers else metric


def by_clause(labels: tuple[str, ...]) -> str:
    return f" by ({', '.join(labels)}) " if labels else ""


def sum_rate(metric: str, matchers: str = "", by: tuple[str, ...] = ()) -> str:
    """Per-second rate of a counter, summed over replicas and every label not in `by`."""
    return f"sum{by_clause(by)}(rate({selector(metric, matchers)}{RATE_WINDOW}))"


def sum_gauge(metric: str, matchers: str = "", by: tuple[str, ...] = ()) -> str:
    return f"sum{by_clause(by)}({selector(metric, matchers)})"


def quantile(q: float, histogram: str, matchers: str = "", by: tuple[str, ...] = ()) -> str:
    """The q-quantile of a histogram over every series (replicas, methods) not split by `by`."""
    buckets = sum_rate(f"{histogram}_bucket", matchers, by=("le", *by))
    return f"histogram_quantile({q}, {buckets})"


def quantile_targets(histogram: str, quantiles: tuple[float, ...], matchers: str = "",
                     by: tuple[str, ...] = ()) -> list[Target]:
    """One target per quantile, legends "p50", "p99", or "p50 {{source}}" when split."""
    suffix = "".join(f" {{{{{label}}}}}" for label in by)
    return [Target(quantile(q, histogram, matchers, by), f"p{round(q * 100)}{suffix}") for q in quantiles]


def error_ratio(matchers: str = "") -> str:
    """Share of finished requests whose status is not OK. `or vector(0)` keeps the panel at 0
    rather than "No data" while nothing has failed (the non-OK series do not exist yet)."""
    failed_matchers = ", ".join(m for m in (matchers, 'code!="OK"') if m)
    failed = sum_rate("flora_requests_total", failed_matchers)
    return f"({failed} or vector(0)) / {sum_rate('flora_requests_total', matchers)}"


# ---- panels ------------------------------------------------------------------------------------


def prometheus_target(target: Target, ref_id: str, *, instant: bool = False) -> dict:
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": target.expr,
        "instant": instant,
        "legendFormat": target.legend or "__auto",
        "range": not instant,
        "refId": ref_id,
    }


def prometheus_targets(targets: list[Target], *, instant: bool = False) -> list[dict]:
    return [prometheus_target(target, chr(ord("A") + i), instant=instant) for i, target in enumerate(targets)]


def panel(kind: str, title: str, description: str, targets: list[dict], width: int, height: int) -> dict:
    """What every panel shares; `layout` fills in the id and the grid position."""
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": width, "x": 0, "y": 0},
        "targets": targets,
    }


def field_defaults(unit: str, *, max_value: float | None = None) -> dict:
    defaults: dict = {"unit": unit, "min": 0, "color": {"mode": "palette-classic"}}
    if max_value is not None:
        defaults["max"] = max_value
    return defaults


def timeseries(title: str, targets: list[Target], unit: str, *, description: str, axis_label: str = "",
               max_value: float | None = None, width: int = 8, height: int = 8) -> dict:
    """A line chart. `axis_label` names what a bare `short` unit counts ("tokens/s")."""
    result = panel("timeseries", title, description, prometheus_targets(targets), width, height)
    defaults = field_defaults(unit, max_value=max_value)
    defaults["custom"] = {
        "axisLabel": axis_label,
        "drawStyle": "line",
        "fillOpacity": 10,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
    }
    result["fieldConfig"] = {"defaults": defaults, "overrides": []}
    result["options"] = {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return result


def stat(title: str, target: Target, unit: str, *, description: str, width: int = 6, height: int = 4) -> dict:
    """One big number (the latest value) over a sparkline. No colour thresholds: the alerting
    rules (deploy/prometheus/rules/alerts.yml) own what is too high."""
    result = panel("stat", title, description, prometheus_targets([target]), width, height)
    defaults = field_defaults(unit)
    defaults["color"] = {"mode": "fixed", "fixedColor": "blue"}
    result["fieldConfig"] = {"defaults": defaults, "overrides": []}
    result["options"] = {
        "colorMode": "value",
        "graphMode": "area",
        "justifyMode": "auto",
        "orientation": "auto",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "textMode": "auto",
    }
    return result


def bar_gauge(title: str, target: Target, unit: str, *, description: str, width: int = 8, height: int = 8) -> dict:
    """Horizontal bars of an instant query: a ranking, which a line chart of topk() is not
    (topk per step lets series come and go)."""
    result = panel("bargauge", title, description, prometheus_targets([target], instant=True), width, height)
    result["fieldConfig"] = {"defaults": field_defaults(unit), "overrides": []}
    result["options"] = {
        "displayMode": "gradient",
        "orientation": "horizontal",
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "showUnfilled": True,
    }
    return result


# ---- dashboards --------------------------------------------------------------------------------


@dataclass
class Row:
    """A titled band of panels, laid out left to right and wrapped at the grid's width."""

    title: str
    panels: list[dict] = field(default_factory=list)


def row(title: str, *panels: dict) -> Row:
    return Row(title, list(panels))


def layout(rows: list[Row]) -> list[dict]:
    """Assigns ids (1, 2, ...) and grid positions: each row's header across the grid, then its
    panels in reading order, a new line when the next panel does not fit."""
    placed: list[dict] = []
    y = 0
    for band in rows:
        placed.append({"type": "row", "title": band.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": GRID_COLUMNS, "x": 0, "y": y}})
        y += 1
        x, line_height = 0, 0
        for item in band.panels:
            width, height = item["gridPos"]["w"], item["gridPos"]["h"]
            if x + width > GRID_COLUMNS:
                x, y, line_height = 0, y + line_height, 0
            placed.append({**item, "gridPos": {"h": height, "w": width, "x": x, "y": y}})
            x, line_height = x + width, max(line_height, height)
        y += line_height
    return [{"id": number, **item} for number, item in enumerate(placed, start=1)]


def tenant_variable() -> dict:
    query = "label_values(flora_requests_total, tenant)"
    return {
        "name": "tenant",
        "label": "Tenant",
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": query,
        "refresh": 2,  # on time range change: tenants that appear later show up
        "sort": 1,
        "multi": False,  # the queries match tenant="$tenant" exactly
        "includeAll": False,
        "current": {},
        "options": [],
        "hide": 0,
        "regex": "",
        "skipUrlSync": False,
    }


def dashboard(uid: str, title: str, description: str, rows: list[Row], variables: tuple[dict, ...] = ()) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["flora"],
        "editable": True,
        "graphTooltip": 1,  # shared crosshair: line up a latency spike with the engine's queue
        "links": [{"type": "dashboards", "title": "Flora dashboards", "tags": ["flora"], "asDropdown": False,
                   "includeVars": False, "keepTime": True}],
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "timezone": "browser",
        "templating": {"list": list(variables)},
        "annotations": {"list": []},
        "panels": layout(rows),
        "schemaVersion": 39,
        "version": 1,
    }


# ---- the router: all tenants, or one ------------------------------------------------------------

PERCENTILES = (0.5, 0.95, 0.99)
TAIL = (0.5, 0.99)


def requests_by_code(matchers: str = "") -> dict:
    by_code = Target(sum_rate("flora_requests_total", matchers, by=("code",)), "{{code}}")
    return timeseries("Requests/s by code", [by_code], "reqps", description="Finished requests per second by gRPC "
                      "status code (OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED for quotas, CANCELLED, ...).")


def error_ratio_panel(matchers: str = "") -> dict:
    return timeseries("Error ratio", [Target(error_ratio(matchers), "not OK")], "percentunit", max_value=1,
                      description="Share of finished requests with a status other than OK, client errors and "
                      "quota refusals included: split by code in Requests/s by code.")


def tokens_per_second(matchers: str = "", width: int = 8) -> dict:
    return timeseries("Tokens/s", [
        Target(sum_rate("flora_generated_tokens_total", matchers), "generated"),
        Target(sum_rate("flora_prompt_tokens_total", matchers), "prompt"),
    ], "short", axis_label="tokens/s", width=width, description="Generated tokens per second as they stream to "
       "clients (cancelled requests' included) and prompt tokens per second of successful requests.")


def in_flight(matchers: str = "") -> dict:
    return timeseries("In-flight requests", [Target(sum_gauge("flora_requests_in_flight", matchers), "in flight")],
                      "short", axis_label="requests", description="Requests the router admitted that have not "
                      "finished yet.")


def rate_limited(matchers: str = "", by: tuple[str, ...] = ("limit",), width: int = 8) -> dict:
    legend = " ".join(f"{{{{{label}}}}}" for label in by)
    return timeseries(f"Rate-limited requests/s by {' and '.join(by)}",
                      [Target(sum_rate("flora_rate_limited_requests_total", matchers, by=by), legend)],
                      "reqps", width=width, description="Requests refused by a quota (requests_per_minute, "
                      "tokens_per_minute, concurrent_requests). Empty until a quota first refuses a request.")


def latency_panels(matchers: str = "") -> list[dict]:
    return [
        timeseries("End-to-end latency", quantile_targets("flora_request_duration_seconds", PERCENTILES, matchers),
                   "s", description="p50/p95/p99 from the router receiving a request to its last chunk, "
                   "successful requests, both methods."),
        timeseries("Time to first token", quantile_targets("flora_time_to_first_token_seconds", PERCENTILES, matchers),
                   "s", description="p50/p95/p99 from the router receiving a request to the first generated "
                   "token leaving it: queueing, adapter load and prefill."),
        timeseries("Time per output token", quantile_targets("flora_time_per_output_token_seconds", TAIL, matchers),
                   "s", description="p50/p99 of (last token - first token) / (generated tokens - 1), requests "
                   "with at least two tokens: the decode speed a client sees."),
    ]


def summary_stats(matchers: str = "") -> list[dict]:
    """Headline numbers; the charts below give their history and breakdown."""
    return [
        stat("Requests/s", Target(sum_rate("flora_requests_total", matchers)), "reqps",
             description="Finished requests per second, every status code."),
        stat("Generated tokens/s", Target(sum_rate("flora_generated_tokens_total", matchers)), "short",
             description="Tokens streamed to clients per second."),
        stat("p99 end-to-end latency", Target(quantile(0.99, "flora_request_duration_seconds", matchers)), "s",
             description="99th percentile from the router receiving a request to its last chunk."),
        stat("p99 time to first token", Target(quantile(0.99, "flora_time_to_first_token_seconds", matchers)), "s",
             description="99th percentile from the router receiving a request to its first generated token."),
    ]


def top_tenants() -> dict:
    expr = f"topk(10, {sum_rate('flora_generated_tokens_total', by=('tenant',))})"
    return bar_gauge("Top tenants by tokens/s", Target(expr, "{{tenant}}"), "short",
                     description="The ten tenants generating the most tokens per second now; generated tokens are "
                     "what occupies the engine's decode steps. Per-tenant detail: the Flora tenant dashboard.")


def gateway_overview() -> dict:
    return dashboard("flora-gateway-overview", "Flora gateway overview",
                     "Every tenant together, as the router sees them: traffic, errors, tokens, quotas and latency.", [
        row("Summary", *summary_stats()),
        row("Traffic", requests_by_code(), error_ratio_panel(), in_flight(),
            tokens_per_second(), top_tenants(), rate_limited(by=("tenant", "limit"))),
        row("Latency", *latency_panels()),
    ])


def tenant() -> dict:
    return dashboard("flora-tenant", "Flora tenant",
                     "One tenant's traffic, tokens, quotas and latency, as the router sees them.", [
        row("Summary", *summary_stats(TENANT)),
        row("Traffic", requests_by_code(TENANT), error_ratio_panel(TENANT), in_flight(TENANT),
            tokens_per_second(TENANT, width=12), rate_limited(TENANT, width=12)),
        row("Latency", *latency_panels(TENANT)),
    ], variables=(tenant_variable(),))


# ---- the worker replicas -----------------------------------------------------------------------


def scheduler_panels() -> list[dict]:
    used, total = "flora_engine_kv_cache_blocks_used", "flora_engine_kv_cache_blocks_capacity"
    return [
        timeseries("Running and waiting requests", [
            Target(sum_gauge("flora_engine_running_requests"), "running"),
            Target(sum_gauge("flora_engine_waiting_requests"), "waiting"),
        ], "short", axis_label="sequences", description="All replicas: sequences in the running batch, and "
           "admitted ones waiting for a batch slot, KV blocks or an adapter slot."),
        timeseries("KV cache blocks", [
            Target(sum_gauge(used), "used"),
            Target(sum_gauge(total), "total"),
        ], "short", axis_label="blocks", description="All replicas: KV cache blocks held by sequences, and "
           "the blocks the engines allocated."),
        timeseries("KV cache utilisation", [
            Target(f"{sum_gauge(used, by=('instance',))} / {sum_gauge(total, by=('instance',))}", "{{instance}}"),
        ], "percentunit", max_value=1, description="Per replica: used / allocated KV blocks. Near 100% the "
           "engine preempts sequences (Preemptions/s) and requests wait."),
        timeseries("Engine tokens/s", [Target(sum_rate("flora_engine_generated_tokens_total"), "generated")],
                   "short", axis_label="tokens/s", width=12, description="All replicas: tokens sampled by the "
                   "engines per second."),
        timeseries("Preemptions/s", [Target(sum_rate("flora_engine_preemptions_total"), "preempted")],
                   "short", axis_label="sequences/s", width=12, description="Sequences preempted for lack of KV "
                   "blocks (recomputed later): wasted work, a sign the KV cache is too small for the load."),
    ]


def step_panels() -> list[dict]:
    return [
        timeseries("Step time", quantile_targets("flora_engine_step_seconds", TAIL), "s",
                   description="p50/p99 of one engine step: a forward pass of the batch and sampling."),
        timeseries("Tokens per step", quantile_targets("flora_engine_step_tokens", TAIL), "short",
                   axis_label="tokens", description="p50/p99 batch size in tokens (prefill chunks + decodes)."),
        timeseries("Sequences per step", quantile_targets("flora_engine_step_sequences", TAIL), "short",
                   axis_label="sequences", description="p50/p99 sequences in a step's batch."),
    ]


def adapter_cache_panels() -> list[dict]:
    hits = "flora_adapter_cache_hits_total"
    return [
        timeseries("Adapter cache hits and misses/s by tier", [
            Target(sum_rate(hits, by=("tier",)), "hit {{tier}}"),
            Target(sum_rate("flora_adapter_cache_misses_total", by=("tier",)), "miss {{tier}}"),
        ], "short", axis_label="lookups/s", description="A hit at ram, disk or blob (S3) serves the adapter; "
           "a miss at ram or disk asks the next tier."),
        timeseries("Adapter cache evictions/s by tier", [
            Target(sum_rate("flora_adapter_cache_evictions_total", by=("tier",)), "{{tier}}"),
        ], "short", axis_label="evictions/s", description="Adapters evicted from ram or disk under their byte "
           "budgets: 0 until a budget first overflows."),
        timeseries("Adapter cache hit ratio by tier", [
            # Every adapter request ends in exactly one hit, so each tier's share of hits is
            # the share of requests it served: ram's is the in-memory hit ratio.
            Target(f"{sum_rate(hits, by=('tier',))} / ignoring(tier) group_left {sum_rate(hits)}", "{{tier}}"),
        ], "percentunit", max_value=1, description="Share of adapter requests served by each tier: ram is the "
           "in-memory hit ratio, ram + disk the share that did not touch the blob store."),
        timeseries("Adapter load time by source", quantile_targets("flora_adapter_load_seconds", TAIL, by=("source",)),
                   "s", description="p50/p99 fetch + decode + register of a cold adapter, by the tier it came "
                   "from (disk, blob)."),
        timeseries("Adapter load failures/s by reason", [
            Target(sum_rate("flora_adapter_load_failures_total", by=("reason",)), "{{reason}}"),
        ], "short", axis_label="failures/s", description="unavailable: blob store down, unreadable or corrupt "
           "blob; invalid: the adapter does not fit this engine. Empty until a load first fails."),
        timeseries("Adapter cache resident bytes by tier", [
            Target(sum_gauge("flora_adapter_cache_resident_bytes", by=("tier",)), "{{tier}}"),
        ], "bytes", description="All replicas: bytes held by ram (decoded tensors) and disk (files)."),
    ]


def engine() -> dict:
    return dashboard("flora-engine", "Flora engine",
                     "The worker replicas: the scheduler's queue and KV cache, engine steps, the adapter cache.", [
        row("Scheduler", *scheduler_panels()),
        row("Steps", *step_panels()),
        row("Adapter cache", *adapter_cache_panels()),
    ])


# ---- output ------------------------------------------------------------------------------------


def build_dashboards() -> dict[str, dict]:
    """File name -> dashboard."""
    return {"gateway-overview.json": gateway_overview(), "tenant.json": tenant(), "engine.json": engine()}


def render(dashboard_json: dict) -> str:
    return json.dumps(dashboard_json, indent=2, ensure_ascii=False) + "\n"


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, those inside a collapsed row's `panels` too."""
    for item in panels:
        yield item
        yield from iter_panels(item.get("panels", []))


def panel_queries(dashboard_json: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel, row headers aside (they have none).
    The exprs hold Grafana's variables ($__rate_interval, $tenant) for the caller to substitute."""
    return [(item["title"], target["expr"])
            for item in iter_panels(dashboard_json["panels"]) if item["type"] != "row"
            for target in item.get("targets", [])]


def main(out_dir: Path | str = DASHBOARDS_DIR) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dashboard_json in build_dashboards().items():
        path = out / name
        path.write_text(render(dashboard_json), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=DASHBOARDS_DIR, type=Path,
                        help="where to write the dashboards (default: deploy/grafana/dashboards)")
    for written_path in main(parser.parse_args().out_dir):
        print(written_path)
