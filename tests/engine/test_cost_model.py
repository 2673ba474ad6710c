"""The cost model: calibration on this machine, path choice, eq. 7, profiles."""

from __future__ import annotations

import math

import pytest
import torch

from services.engine.adapter_batch import PATHS_BY_KIND, GroupShape, KernelPath
from services.engine.adapter_format import AdapterKind
from services.engine.base_weights import Quantization
from services.engine.cost_model import CostModel, PathCost, calibrate


@pytest.fixture(scope="module")
def measured() -> CostModel:
    return calibrate(torch.float32)


def test_calibration_fits_every_path(measured):
    assert set(measured.paths) == set(KernelPath)
    for cost in (measured.base, *measured.paths.values()):
        assert cost.overhead_s >= 0 and cost.per_mac_s >= 0
        assert cost.overhead_s + cost.per_mac_s > 0
    assert measured.threads == torch.get_num_threads()


@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.int8])
def test_calibration_with_narrow_lora_slots(lora_dtype):
    """The served engine's slot storage is what gets timed, and recorded in the profile."""
    model = calibrate(torch.float32, Quantization.INT8, d_in=64, d_out=64, repeats=1, lora_dtype=lora_dtype)
    assert set(model.paths) == set(KernelPath) and model.lora_dtype == str(lora_dtype).removeprefix("torch.")
    assert model.choose(GroupShape(AdapterKind.LORA, 32, 32, 8, 64, 64)) in PATHS_BY_KIND[AdapterKind.LORA]


def test_choices_are_valid_for_kind(measured):
    for kind, paths in PATHS_BY_KIND.items():
        for rows, adapters in [(1, 1), (32, 32), (2048, 8), (2048, 2048)]:
            assert measured.choose(GroupShape(kind, rows, adapters, 8, 2048, 2304)) in paths


def test_prefill_of_few_adapters_avoids_per_row_copies(measured):
    """Eight 256-token prompts: merging W0 ∘ (BA)ᵀ once per adapter beats 8 rank terms per row;
    for LoRA, a path that reads A and B in place (one GEMM pair per adapter, or the BGMV kernel:
    measured 11 ms and 8 ms here) beats gathering 2048 copies of them (bmm: 159 ms)."""
    few = GroupShape(AdapterKind.FLORA, 2048, 8, 8, 2048, 2304)
    assert measured.choose(few) is KernelPath.FLORA_SEGMENT
    assert measured.choose(GroupShape(AdapterKind.LORA, 2048, 8, 8, 2048, 2304)) in (KernelPath.LORA_SEGMENT, KernelPath.LORA_BGMV)


def test_decode_with_distinct_adapters_avoids_merging(measured):
    """32 decode rows, 32 adapters: merging costs (R + 1)·d² MACs per adapter plus a GEMM per
    row, more than the R·d² per row of the stacked path (3× the MACs at R = 1)."""
    decode = GroupShape(AdapterKind.FLORA, 32, 32, 1, 2048, 2304)
    assert measured.choose(decode) is KernelPath.FLORA
    assert measured.predict(KernelPath.FLORA_SEGMENT, decode) > measured.predict(KernelPath.FLORA, decode)


def test_eq7_matches_its_closed_form():
    # c1 = 100·c2: 2·c1/(d·c2) = 200/d. d = 400 -> 1/2 -> FLoRA wins up to rank 2 exactly.
    model = CostModel(PathCost(0, 1e-11), {p: PathCost(0, 1e-9 if p is KernelPath.LORA_BMM else 1e-11) for p in KernelPath}, "float32", "none", 1)
    assert model.c1 / model.c2 == pytest.approx(100)
    assert model.eq7_crossover_rank(400) == pytest.approx(2.0)
    assert model.flora_beats_bmm(2, 400) and not model.flora_beats_bmm(3, 400)
    assert model.eq7_crossover_rank(150) == math.inf  # 2·c1/(d·c2) ≥ 1: FLoRA always cheaper


def test_profile_round_trip(measured, tmp_path):
    path = tmp_path / "profile.json"
    measured.save(path)
    assert CostModel.load(path) == measured


def test_bad_profile_is_rejected(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text('{"dtype": "float32", "quantization": "none", "threads": 1, "lora_dtype": "auto", "base": {"overhead_s": 0, "per_mac_s": 1}, "paths": {"flora": {"overhead_s": 0, "per_mac_s": 1}}}')
    with pytest.raises(ValueError, match="lacks costs for paths"):
        CostModel.load(path)
    path.write_text('{"dtype": "float32"}')
    with pytest.raises(ValueError, match="is not a cost-model profile"):
        CostModel.load(path)
