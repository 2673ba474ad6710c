"""The kernel benchmark runs end to end (tiny shapes) and writes its table, JSON and plot."""

from __future__ import annotations

import json

from benchmarks.kernels import main
from services.engine.adapter_batch import KernelPath


def test_quick_run_writes_complete_report(tmp_path, capsys):
    assert main(["--quick", "--rows", "4", "16", "--ranks", "1", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernels.json").read_text())
    measured = {(c["rows"], c["rank"], c["path"]) for c in report["cells"]}
    lora_and_flora = {KernelPath.FLORA.value, KernelPath.LORA_BMM.value, KernelPath.LORA_BGMV.value, KernelPath.LORA_SEGMENT.value}
    assert {(r, k, p) for r in (4, 16) for k in (1, 2) for p in lora_and_flora} <= measured
    assert all(c["seconds"] > 0 and c["base_seconds"] > 0 and c["ratio"] > 0 for c in report["cells"])
    assert {(x["rows"], x["shape"]) for x in report["crossover"]} == {(4, "tiny"), (16, "tiny")}
    assert all(x["c1_over_c2"] > 0 for x in report["crossover"])
    assert len(report["rank_isolation"]["ratios"]) == 2 and len(report["per_sequence_prefill"]["ratios"]) == 8
    table = (tmp_path / "kernels.md").read_text()
    assert "| rank | base ms | flora |" in table and "Crossover" in table and report["command"] in table
    assert (tmp_path / "kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table in capsys.readouterr().out
