"""The throughput benchmark end to end at a toy size: every (weights, scenario) pair runs and is reported."""

from __future__ import annotations

import json

from benchmarks.throughput import SCENARIOS, main
from services.engine.base_weights import Quantization


def test_throughput_benchmark_reports_every_scenario_for_both_weight_formats(tmp_path):
    assert main(["--requests", "3", "--new-tokens", "2", "--rounds", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "throughput.json").read_text())
    pairs = [(r["weights"], r["scenario"]) for r in report["results"]]
    assert pairs == [(q.value, sc.name) for q in Quantization for sc in SCENARIOS]
    assert all(r["tokens_per_s"] > 0 for r in report["results"])
    assert [r["ratio"] for r in report["results"] if r["scenario"] == SCENARIOS[0].name] == [1.0, 1.0]
    mib = report["engine_mib"]
    assert mib["int8, no adapters"] < 0.7 * mib["none, no adapters"]  # int8 weights: a quarter of the fp32 bytes
    table = (tmp_path / "throughput.md").read_text()
    assert "| int8 | LoRA r8 on q,k,v,o, 2 adapters half/half |" in table and "Single stream" in table
