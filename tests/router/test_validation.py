"""check_request's boundaries, without servers: each limit's last allowed value passes, the
next one is INVALID_ARGUMENT with a one-line message that starts with the field's name, and
the first bad field (tenant_id, then prompt, then sampling) is the one reported."""

from __future__ import annotations

import math

import grpc
import pytest

from services.protos import gateway_pb2
from services.router.errors import GatewayError
from services.router.settings import RequestLimits
from services.router.validation import check_request

# Explicit values, so FLORA_ROUTER_* in the environment cannot move the boundaries under test.
LIMITS = RequestLimits(max_prompt_chars=32768, max_new_tokens=2048, max_temperature=2.0, max_stop_strings=4, max_stop_chars=64)


def make(tenant_id: str = "acme", prompt: str = "hello", **sampling) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(tenant_id=tenant_id, prompt=prompt, sampling=gateway_pb2.SamplingParams(**sampling))


def refusal(request: gateway_pb2.GenerateRequest, limits: RequestLimits = LIMITS) -> str:
    with pytest.raises(GatewayError) as caught:
        check_request(request, limits)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "\n" not in caught.value.message
    return caught.value.message


ALLOWED = {
    "sampling unset": make(),
    "prompt of exactly max_prompt_chars": make(prompt="x" * 32768),
    "one-character prompt": make(prompt="?"),
    "max_new_tokens 1": make(max_new_tokens=1),
    "max_new_tokens at the limit": make(max_new_tokens=2048),
    "temperature 0 (greedy)": make(temperature=0.0),
    "temperature at the limit": make(temperature=2.0),
    "top_p 1": make(top_p=1.0),
    "top_p just above 0": make(top_p=1e-6),
    "top_k 0 (off)": make(top_k=0),
    "top_k large": make(top_k=10**6),
    "seed at uint64 max": make(seed=2**64 - 1),
    "4 stop strings of 64 characters": make(stop=["a" * 64, "b" * 64, "c" * 64, "d" * 64]),
    "one-character stop string": make(stop=["\n"]),
    "64-character tenant": make(tenant_id="t" * 64),
    "tenant with . _ -": make(tenant_id="a.b_c-d"),
}


@pytest.mark.parametrize("request_", ALLOWED.values(), ids=ALLOWED.keys())
def test_values_at_the_boundaries_are_allowed(request_):
    check_request(request_, LIMITS)


REFUSED = [  # (id, request, the field its message must start with)
    ("prompt one over the limit", make(prompt="x" * 32769), "prompt"),
    ("empty prompt", make(prompt=""), "prompt"),
    ("NUL inside the prompt", make(prompt="a\x00b"), "prompt"),
    ("max_new_tokens 0", make(max_new_tokens=0), "sampling.max_new_tokens"),
    ("max_new_tokens one over the limit", make(max_new_tokens=2049), "sampling.max_new_tokens"),
    ("temperature above the limit", make(temperature=2.01), "sampling.temperature"),
    ("temperature -0.0001", make(temperature=-1e-4), "sampling.temperature"),
    ("temperature -inf", make(temperature=-math.inf), "sampling.temperature"),
    ("top_p 0", make(top_p=0.0), "sampling.top_p"),
    ("top_p just above 1", make(top_p=1.001), "sampling.top_p"),
    ("top_p inf", make(top_p=math.inf), "sampling.top_p"),
    ("top_k -1", make(top_k=-1), "sampling.top_k"),
    ("5 stop strings", make(stop=["a", "b", "c", "d", "e"]), "sampling.stop"),
    ("65-character stop string", make(stop=["ok", "s" * 65]), "sampling.stop[1]"),
    ("empty stop string", make(stop=[""]), "sampling.stop[0]"),
    ("65-character tenant", make(tenant_id="t" * 65), "tenant_id"),
    ("tenant starting with '.'", make(tenant_id=".hidden"), "tenant_id"),
    ("tenant with ':'", make(tenant_id="a:b"), "tenant_id"),
]


@pytest.mark.parametrize("request_,field", [(r, f) for _, r, f in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_values_past_the_boundaries_are_refused_naming_the_field(request_, field):
    assert refusal(request_).startswith(f"{field}: ")


def test_the_first_bad_field_is_reported_tenant_then_prompt_then_sampling():
    assert refusal(make(tenant_id="a/b", prompt="", max_new_tokens=0)).startswith("tenant_id: ")
    assert refusal(make(prompt="", max_new_tokens=0, top_p=2.0)).startswith("prompt: ")
    assert refusal(make(max_new_tokens=0, top_p=2.0)).startswith("sampling.max_new_tokens: ")


def test_configured_limits_move_the_boundaries():
    tight = RequestLimits(max_prompt_chars=10, max_new_tokens=8, max_temperature=1.0, max_stop_strings=1, max_stop_chars=3)
    check_request(make(prompt="x" * 10, max_new_tokens=8, temperature=1.0, stop=["abc"]), tight)
    assert refusal(make(prompt="x" * 11), tight) == "prompt: has 11 characters, the limit is 10"
    assert refusal(make(max_new_tokens=9), tight) == "sampling.max_new_tokens: must be in 1..8, got 9"
    assert refusal(make(temperature=1.5), tight).startswith("sampling.temperature: ")
    assert refusal(make(stop=["a", "b"]), tight) == "sampling.stop: has 2 strings, the limit is 1"
    assert refusal(make(stop=["abcd"]), tight) == "sampling.stop[0]: has 4 characters, the limit is 3"


def test_a_tenant_id_with_control_characters_stays_one_line_and_names_the_character():
    message = refusal(make(tenant_id="a\nb"))
    assert message.startswith("tenant_id: ") and "U+000A" in message
