"""A GenerateRequest's checks, before anything is looked up: each failure names its field."""

from __future__ import annotations

import math

from adapters_store.errors import UsageError
from adapters_store.names import check_name
from services.protos import gateway_pb2
from services.router.errors import invalid
from services.router.settings import RequestLimits


def check_request(request: gateway_pb2.GenerateRequest, limits: RequestLimits) -> None:
    """Raise INVALID_ARGUMENT for the first bad field."""
    try:
        check_name(request.tenant_id)
    except UsageError as e:
        raise invalid("tenant_id", str(e)) from None
    check_prompt(request.prompt, limits)
    check_sampling(request.sampling, limits)


def check_prompt(prompt: str, limits: RequestLimits) -> None:
    if not prompt:
        raise invalid("prompt", "is empty")
    if len(prompt) > limits.max_prompt_chars:
        raise invalid("prompt", f"has {len(prompt)} characters, the limit is {limits.max_prompt_chars}")
    if "\x00" in prompt:
        raise invalid("prompt", "contains a NUL character")


def check_sampling(s: gateway_pb2.SamplingParams, limits: RequestLimits) -> None:
    if s.HasField("max_new_tokens") and not 1 <= s.max_new_tokens <= limits.max_new_tokens:
        raise invalid("sampling.max_new_tokens", f"must be in 1..{limits.max_new_tokens}, got {s.max_new_tokens}")
    if s.HasField("temperature") and not (math.isfinite(s.temperature) and 0 <= s.temperature <= limits.max_temperature):
        raise invalid("sampling.temperature", f"must be a number in 0..{limits.max_temperature:g}, got {s.temperature}")
    if s.HasField("top_p") and not (math.isfinite(s.top_p) and 0 < s.top_p <= 1):
        raise invalid("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    if s.HasField("top_k") and s.top_k < 0:
        raise invalid("sampling.top_k", f"must be >= 0 (0: off), got {s.top_k}")
    check_stop(list(s.stop), limits)


def check_stop(stop: list[str], limits: RequestLimits) -> None:
    if len(stop) > limits.max_stop_strings:
        raise invalid("sampling.stop", f"has {len(stop)} strings, the limit is {limits.max_stop_strings}")
    for i, text in enumerate(stop):
        if not text:
            raise invalid(f"sampling.stop[{i}]", "is empty")
        if len(text) > limits.max_stop_chars:
            raise invalid(f"sampling.stop[{i}]", f"has {len(text)} characters, the limit is {limits.max_stop_chars}")
