"""deploy/prometheus/: the config and rules promtool accepts, their unit tests, and no drift
from docs/metrics.md (every series a rule reads is in the spec) or from `make run`'s ports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.launcher import LauncherSettings
from services.router.settings import RouterSettings
from services.worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RECORDING = PROMETHEUS / "rules" / "recording.yml"
ALERTS = PROMETHEUS / "rules" / "alerts.yml"
RECORDING_TEST = PROMETHEUS / "tests" / "recording_test.yml"
ALERTS_TEST = PROMETHEUS / "tests" / "alerts_test.yml"
SPEC = ROOT / "docs" / "metrics.md"

# A raw series name in an expression; a recorded name (level:flora_…:operations) is not one.
SERIES = re.compile(r"(?<![\w:])flora_[a-z_]+(?![\w:])")
RECORDED = re.compile(r"\b[a-z_]+:[a-z_0-9]+:[a-z_0-9]+\b")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def promtool(*args: str) -> None:
    """Run promtool from the repository root; fail with its output unless it exits 0."""
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed: scripts/install-system-deps.sh installs it (Debian's `prometheus` package)")
    done = subprocess.run(["promtool", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"promtool {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"


def rules(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def expressions() -> list[str]:
    return [rule["expr"] for path in (RECORDING, ALERTS) for rule in rules(path)]


def test_config_is_valid():
    promtool("check", "config", str(CONFIG.relative_to(ROOT)))


def test_recording_rules_are_valid():
    promtool("check", "rules", str(RECORDING.relative_to(ROOT)))


def test_alerting_rules_are_valid():
    promtool("check", "rules", str(ALERTS.relative_to(ROOT)))


def test_recording_rules_compute_the_expected_values():
    promtool("test", "rules", str(RECORDING_TEST.relative_to(ROOT)))


def test_alerts_fire_when_they_should_and_only_then():
    promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))


def test_config_loads_every_rule_file_relative_to_itself():
    config = yaml.safe_load(CONFIG.read_text())
    loaded = {path for pattern in config["rule_files"] for path in PROMETHEUS.glob(pattern)}
    assert not any(Path(pattern).is_absolute() for pattern in config["rule_files"])
    assert loaded == {RECORDING, ALERTS}


def test_scrape_targets_are_the_make_run_defaults():
    config = yaml.safe_load(CONFIG.read_text())
    targets = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]] for job in config["scrape_configs"]}
    assert targets == {
        "router": [f"127.0.0.1:{RouterSettings.model_fields['metrics_port'].default}"],
        "worker": [f"127.0.0.1:{WorkerSettings.model_fields['metrics_port'].default}"],
        "ray": [f"127.0.0.1:{LauncherSettings.model_fields['ray_metrics_port'].default}"],
    }
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "5s"


def test_every_series_the_rules_read_is_in_the_spec():
    specified = set(re.findall(r"`(flora_[a-z_]+)`", SPEC.read_text()))
    read = {HISTOGRAM_SUFFIX.sub("", name) for expr in expressions() for name in SERIES.findall(expr)}
    assert read, "no flora_ series found in the rules: is the pattern stale?"
    assert read <= specified, f"read by deploy/prometheus/rules but not in docs/metrics.md: {sorted(read - specified)}"


def test_every_recorded_series_the_rules_read_is_recorded():
    recorded = {rule["record"] for rule in rules(RECORDING)}
    read = {name for expr in expressions() for name in RECORDED.findall(expr)}
    assert read <= recorded, f"read but recorded by no rule: {sorted(read - recorded)}"


def test_recording_rules_follow_the_level_metric_operations_convention():
    for rule in rules(RECORDING):
        level, metric, operations = rule["record"].split(":")
        assert level in {"tenant", "job"} and metric.startswith("flora_") and operations, rule["record"]


def test_every_recording_rule_has_a_unit_test():
    tested = {test["expr"] for group in yaml.safe_load(RECORDING_TEST.read_text())["tests"] for test in group["promql_expr_test"]}
    untested = {rule["record"] for rule in rules(RECORDING)} - tested
    assert not untested, f"recording rules without a promql_expr_test in {RECORDING_TEST.name}: {sorted(untested)}"


def test_every_alert_is_tested_firing_and_not_firing():
    cases = [case for group in yaml.safe_load(ALERTS_TEST.read_text())["tests"] for case in group["alert_rule_test"]]
    for rule in rules(ALERTS):
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']}: no test where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']}: no test where it does not fire"


def test_every_alert_has_a_for_a_severity_and_annotations():
    for rule in rules(ALERTS):
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"].keys() >= {"summary", "description"}, rule["alert"]
