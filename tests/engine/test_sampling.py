"""Sampling parameters and the sampler against what each filter must allow."""

from __future__ import annotations

import pytest
import torch

from services.engine.sampling import SamplingParams, sample

LOGITS = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0], [5.0, 0.0, 0.0, 0.0, 4.0]])


def draws(params: SamplingParams, row: int, n: int = 300) -> set[int]:
    gen = torch.Generator().manual_seed(0)
    return {sample(LOGITS[row : row + 1], [params], [gen])[0] for _ in range(n)}


def test_greedy_rows_take_the_argmax():
    assert sample(LOGITS, [SamplingParams(temperature=0.0)] * 2, [None, None]) == [1, 0]


def test_top_k_keeps_only_the_k_best():
    assert draws(SamplingParams(temperature=5.0, top_k=2), 0) == {1, 2}
    assert draws(SamplingParams(temperature=5.0, top_k=1), 0) == {1}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # row 1: p(0) ≈ 0.71, p(4) ≈ 0.26, the rest ≈ 0.01 each: 0.9 needs tokens 0 and 4 only
    assert draws(SamplingParams(temperature=1.0, top_p=0.9), 1) == {0, 4}
    assert draws(SamplingParams(temperature=1.0, top_p=0.5), 1) == {0}


def test_high_temperature_reaches_every_token():
    assert draws(SamplingParams(temperature=100.0), 0) == {0, 1, 2, 3, 4}


def test_same_seed_same_draws():
    params = SamplingParams(temperature=1.0, seed=7)
    a = [sample(LOGITS, [params] * 2, [torch.Generator().manual_seed(7)] * 2) for _ in range(3)]
    b = [sample(LOGITS, [params] * 2, [torch.Generator().manual_seed(7)] * 2) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(stop=("",)), "stop strings must be non-empty"),
    ],
)
def test_bad_parameters_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
