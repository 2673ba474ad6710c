"""The gateway's metrics through a real Prometheus (Debian's package) scraping the real endpoints.

A router of its own (a tenant-label cap of 3) in front of the session's worker, and
`prometheus` started on deploy/prometheus/prometheus.yml (its rules included) with the
targets pointed at this stack and a 1 s scrape interval. Traffic for three tenants (FLoRA,
LoRA, IA3), a fourth that is over the cap, a quota refusal and a bad key; then, through
Prometheus's HTTP API: each tenant's histograms and token counters hold exactly the counts
the clients saw, the fourth tenant is `other`, the recording rules produce series, and
every panel query of every committed dashboard returns data. `promtool check metrics` is
clean on the router's and the worker's endpoints.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from services.engine.adapter_format import AdapterKind
from services.protos import gateway_pb2, gateway_pb2_grpc
from services.router.metrics import OTHER, UNAUTHORIZED
from services.router.server import RouterThread
from services.router.settings import RouterSettings
from tests.adapters_store.helpers import free_port
from tests.gateway.helpers import Stack, Tenant, call_metadata, request

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARDS_DIR = REPO / "deploy" / "grafana" / "dashboards"
WINDOW = "2m"  # stands in for Grafana's $__rate_interval: covers the whole test's traffic


@dataclass
class Seen:
    """What the clients saw, per tenant: the counts Prometheus must report."""

    ok: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    codes: dict[str, int] = field(default_factory=dict)


@dataclass
class Observed:
    prometheus: str  # http://host:port
    tenants: list[Tenant]  # the three under the cap, then the fourth
    seen: dict[str, Seen]
    endpoints: dict[str, str]  # job -> its /metrics URL


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/install-system-deps.sh installs Debian's prometheus package"
    return path


def prometheus_config(path: Path, targets: dict[str, str]) -> None:
    """deploy/prometheus/prometheus.yml with this stack's targets, a 1 s scrape and rule evaluation."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / rule) for rule in config["rule_files"]]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    path.write_text(yaml.safe_dump(config))


def start_prometheus(workdir: Path, targets: dict[str, str]) -> tuple[subprocess.Popen, str]:
    config, port = workdir / "prometheus.yml", free_port()
    prometheus_config(config, targets)
    log = open(workdir / "prometheus.log", "wb")
    process = subprocess.Popen([binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=1)
            return process, url
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("prometheus did not become ready in 30 s")


def query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(prometheus: str, expr: str) -> float:
    result = query(prometheus, expr)
    return float(result[0]["value"][1]) if result else 0.0


def wait_for(prometheus: str, expr: str, expected: float, timeout_s: float = 30) -> None:
    """Until a scrape (or a rule evaluation) has caught up with the traffic."""
    deadline = time.monotonic() + timeout_s
    while (got := scalar(prometheus, expr)) != expected:
        assert time.monotonic() < deadline, f"{expr} = {got}, expected {expected}"
        time.sleep(0.5)


def send(stub: gateway_pb2_grpc.GatewayStub, tenant: Tenant, seen: Seen, n: int) -> str:
    """The tenant's n-th call (streams and unary calls alternate, lengths vary); its status code."""
    req = request(tenant, max_new_tokens=4 + 3 * (n % 4))
    try:
        if n % 2 == 0:
            usage = list(stub.GenerateStream(req, metadata=call_metadata(tenant), timeout=60))[-1].usage
        else:
            usage = stub.Generate(req, metadata=call_metadata(tenant), timeout=60).usage
    except grpc.RpcError as error:
        code = error.code().name
    else:
        code = "OK"
        seen.ok += 1
        seen.prompt_tokens += usage.prompt_tokens
        seen.generated_tokens += usage.completion_tokens
    seen.codes[code] = seen.codes.get(code, 0) + 1
    return code


def send_until_refused(stub: gateway_pb2_grpc.GatewayStub, tenant: Tenant, seen: Seen) -> None:
    for n in range(100):
        if send(stub, tenant, seen, n) == "RESOURCE_EXHAUSTED":
            return
    raise AssertionError(f"{tenant.name}'s quota never refused a call")


def traffic(stub: gateway_pb2_grpc.GatewayStub, tenants: list[Tenant], limited: Tenant, prometheus: str) -> dict[str, Seen]:
    """Two rounds with a scrape between them, so that every series has grown between two samples
    (rate() needs two; a series born with its only increment shows none). Round one: one call
    per tenant, and `limited` calls until its quota refuses one. Round two, a second later (the
    quota has refilled a call): tenant i makes i + 2 calls, `limited` again until refused; then
    one call with a bad key."""
    seen = {t.name: Seen() for t in tenants}
    for tenant in tenants:
        send(stub, tenant, seen[tenant.name], 0)
    send_until_refused(stub, limited, seen[limited.name])
    wait_for(prometheus, f'sum(flora_requests_total{{job="router"}})', sum(sum(s.codes.values()) for s in seen.values()))
    time.sleep(1.0)
    for i, tenant in enumerate(tenants):
        if tenant is limited:
            send_until_refused(stub, limited, seen[limited.name])
        else:
            for n in range(i + 2):
                send(stub, tenant, seen[tenant.name], n + 1)
    send(stub, Tenant(tenants[0].name, "fk_not-a-key", ""), Seen(), 0)
    return seen


@pytest.fixture(scope="module")
def observed(stack: Stack, ray_cluster: int, tmp_path_factory) -> Iterator[Observed]:
    from ray import serve

    workdir = tmp_path_factory.mktemp("prometheus")
    settings = RouterSettings(listen="127.0.0.1:0", metrics_port=0, metrics_max_tenants=3,
                              worker_address=f"127.0.0.1:{stack.worker.grpc_port}")  # fmt: skip
    router = RouterThread(settings, stack.store.settings)
    worker_port = serve.get_app_handle(stack.worker.app_name).metrics_port.remote().result()
    endpoints = {"router": f"127.0.0.1:{router.router.metrics_server.port}", "worker": f"127.0.0.1:{worker_port}",
                 "ray": f"127.0.0.1:{ray_cluster}"}  # fmt: skip
    prometheus, url = start_prometheus(workdir, endpoints)
    try:
        kinds = ((AdapterKind.FLORA, 2), (AdapterKind.LORA, 4), (AdapterKind.IA3, 1))
        named = [stack.new_tenant(kind, rank=rank, seed=40 + i) for i, (kind, rank) in enumerate(kinds)]
        fourth = stack.new_tenant(None)
        stack.store.registry.set_quota(named[0].name, {"requests_per_minute": 60})  # a burst of 10, then one a second
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(router.address))
        wait_for(url, 'count(up{job=~"router|worker"} == 1)', 2)  # scraping before the first request
        seen = traffic(stub, [*named, fourth], named[0], url)
        total = sum(sum(s.codes.values()) for s in seen.values()) + 1  # + the bad key
        wait_for(url, "sum(flora_requests_total)", total)
        for rule in ("tenant:flora_request_duration_seconds:p99_1m", "tenant:flora_generated_tokens:rate1m"):
            wait_for(url, f"count({rule} > 0)", 4)  # each rule group has run on the last scrape: 3 named + other
        yield Observed(url, [*named, fourth], seen, {job: f"http://{target}/metrics" for job, target in endpoints.items()})
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        router.stop()


def test_each_tenants_histograms_and_token_counters_hold_what_its_clients_saw(observed: Observed):
    p = observed.prometheus
    for tenant in observed.tenants[:3]:
        seen, t = observed.seen[tenant.name], f'tenant="{tenant.name}"'
        assert seen.ok >= 2
        assert scalar(p, f"sum(flora_request_duration_seconds_count{{{t}}})") == seen.ok
        assert scalar(p, f"flora_time_to_first_token_seconds_count{{{t}}}") == seen.ok
        assert scalar(p, f"flora_time_per_output_token_seconds_count{{{t}}}") == seen.ok  # every request made >= 2 tokens
        assert scalar(p, f"flora_prompt_tokens_total{{{t}}}") == seen.prompt_tokens
        assert scalar(p, f"flora_generated_tokens_total{{{t}}}") == seen.generated_tokens
        for code, count in seen.codes.items():
            assert scalar(p, f'sum(flora_requests_total{{{t}, code="{code}"}})') == count


def test_the_quota_refusal_and_the_bad_key_are_counted_where_they_belong(observed: Observed):
    p, limited = observed.prometheus, observed.tenants[0].name
    assert observed.seen[limited].codes["RESOURCE_EXHAUSTED"] == 2  # one per round
    assert scalar(p, f'flora_rate_limited_requests_total{{tenant="{limited}", limit="requests_per_minute"}}') == 2
    assert scalar(p, f'sum(flora_requests_total{{tenant="{UNAUTHORIZED}", code="UNAUTHENTICATED"}})') == 1


def test_the_fourth_tenant_is_over_the_cap_and_counted_as_other(observed: Observed):
    p, fourth = observed.prometheus, observed.tenants[3]
    seen = observed.seen[fourth.name]
    assert query(p, f'{{tenant="{fourth.name}"}}') == []
    assert scalar(p, f'sum(flora_request_duration_seconds_count{{tenant="{OTHER}"}})') == seen.ok
    assert scalar(p, f'flora_generated_tokens_total{{tenant="{OTHER}"}}') == seen.generated_tokens
    tenants = {r["metric"]["tenant"] for r in query(p, "flora_requests_total")}
    assert tenants == {t.name for t in observed.tenants[:3]} | {OTHER, UNAUTHORIZED}


def test_the_worker_reports_the_engine_and_the_adapter_cache(observed: Observed):
    p = observed.prometheus
    generated = sum(s.generated_tokens for s in observed.seen.values())
    wait_for(p, f"flora_engine_generated_tokens_total >= bool {generated}", 1)  # the next worker scrape; other tests add theirs
    assert scalar(p, "flora_engine_kv_cache_blocks_capacity") > 0
    assert scalar(p, "flora_engine_step_seconds_count") > 0
    assert scalar(p, 'flora_adapter_cache_hits_total{tier="blob"}') >= 3  # the three adapters were cold
    assert scalar(p, 'flora_adapter_cache_resident_bytes{tier="ram"}') > 0
    assert scalar(p, 'up{job="ray"}') == 1  # Ray's own metrics are scraped too


def test_recording_rules_give_per_tenant_tokens_per_second_and_latency_quantiles(observed: Observed):
    p, tenant = observed.prometheus, observed.tenants[1].name
    assert scalar(p, f'tenant:flora_generated_tokens:rate1m{{tenant="{tenant}"}}') > 0
    for rule in ("flora_request_duration_seconds:p99_1m", "flora_time_to_first_token_seconds:p50_1m"):
        assert 0 < scalar(p, f'tenant:{rule}{{tenant="{tenant}"}}') < 60


def load_generator():
    spec = importlib.util.spec_from_file_location("grafana_generate", REPO / "deploy" / "grafana" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_panel_query_of_every_dashboard_returns_data(observed: Observed):
    generator, empty = load_generator(), []
    dashboards = sorted(DASHBOARDS_DIR.glob("*.json"))
    assert len(dashboards) >= 3
    for path in dashboards:
        for title, expr in generator.panel_queries(json.loads(path.read_text())):
            concrete = expr.replace("$__rate_interval", WINDOW).replace("$tenant", observed.tenants[0].name)
            values = [float(r["value"][1]) for r in query(observed.prometheus, concrete)]
            if not any(math.isfinite(v) for v in values):  # a quantile of nothing is NaN: nothing to draw
                empty.append(f"{path.name} / {title}: {concrete} -> {values}")
    assert not empty, "panels with no data:\n" + "\n".join(empty)


@pytest.mark.parametrize("job", ["router", "worker"])
def test_promtool_check_metrics_is_clean_on_the_endpoint(observed: Observed, job: str):
    exposition = urllib.request.urlopen(observed.endpoints[job], timeout=10).read()
    checked = subprocess.run([binary("promtool"), "check", "metrics"], input=exposition, capture_output=True)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
