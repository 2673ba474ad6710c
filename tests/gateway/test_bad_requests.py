"""Bad requests through the real router (and, for a prompt longer than the model's context, the
real worker): each is INVALID_ARGUMENT with a one-line message that names the bad field, and
none of them disturbs another tenant's stream.

- a corpus of bad GenerateRequests (prompt, sampling, tenant_id), sent with a valid key;
- a prompt within the router's character limit but longer than the tiny model's context
  (256 positions): the router passes it, the worker refuses it, and the client still gets
  INVALID_ARGUMENT naming the prompt;
- oversized metadata: gRPC's transport refuses it before the router's code runs, with
  RESOURCE_EXHAUSTED (not INVALID_ARGUMENT), and the router keeps serving;
- a request with no sampling at all succeeds with the documented defaults;
- the whole corpus fired while another tenant's adapter stream runs: that stream keeps
  delivering chunks throughout and ends with the tokens it gets alone.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from services.engine.adapter_format import AdapterKind
from services.protos import gateway_pb2
from services.router.settings import RequestLimits
from services.router.validation import check_request
from tests.gateway.helpers import Stack, Tenant, call_metadata

LIMITS = RequestLimits()  # what the stack's router enforces (checked by the `tenant` fixture)
CONTEXT = 256  # the tiny model's positions (tests/gateway/tiny_model.py)
PROMPT = "def fibonacci(n):"
# ~30 tokens a sentence with the tiny BPE: 12 of them are far past the context, yet only 540 characters.
OVER_CONTEXT_PROMPT = "The quick brown fox jumps over the lazy dog. " * 12
STREAM_TOKENS = 240  # the concurrent stream: near the 256-position context, to outlast the corpus many times over


@dataclass(frozen=True)
class Bad:
    id: str
    field: str  # what the message must name
    tenant_id: str | None = None  # None: the valid tenant whose key is sent
    prompt: str = PROMPT
    sampling: dict = field(default_factory=dict)
    by_worker: bool = False  # passes the router's checks; the engine refuses it

    def request(self, tenant: Tenant) -> gateway_pb2.GenerateRequest:
        sampling = gateway_pb2.SamplingParams(**{"max_new_tokens": 4, **self.sampling})
        tenant_id = tenant.name if self.tenant_id is None else self.tenant_id
        return gateway_pb2.GenerateRequest(tenant_id=tenant_id, prompt=self.prompt, sampling=sampling)


def prompt(text: str, id: str) -> Bad:
    return Bad(id, "prompt", prompt=text)


def sampling(name: str, value, id: str, field_name: str | None = None) -> Bad:
    return Bad(id, field_name or f"sampling.{name}", sampling={name: value})


def tenant_id(name: str, id: str) -> Bad:
    return Bad(id, "tenant_id", tenant_id=name)


CORPUS = [
    prompt("", "empty prompt"),
    prompt("\x00", "prompt of NUL"),
    prompt("x" * (LIMITS.max_prompt_chars + 1), "prompt over max_prompt_chars"),
    Bad("prompt longer than the model's context", "prompt", prompt=OVER_CONTEXT_PROMPT, by_worker=True),
    sampling("max_new_tokens", 0, "max_new_tokens 0"),
    sampling("max_new_tokens", -1, "max_new_tokens -1"),
    sampling("max_new_tokens", LIMITS.max_new_tokens + 1, "max_new_tokens one over the limit"),
    sampling("max_new_tokens", 10**9, "max_new_tokens 10**9"),
    sampling("temperature", math.nan, "temperature NaN"),
    sampling("temperature", -0.5, "temperature -0.5"),
    sampling("temperature", math.inf, "temperature inf"),
    sampling("temperature", 3.0, "temperature 3.0"),
    sampling("top_p", 0.0, "top_p 0"),
    sampling("top_p", 1.5, "top_p 1.5"),
    sampling("top_p", math.nan, "top_p NaN"),
    sampling("top_k", -1, "top_k -1"),
    sampling("stop", ["a", "b", "c", "d", "e"], "5 stop strings"),
    sampling("stop", ["###", ""], "an empty stop string", "sampling.stop[1]"),
    sampling("stop", ["s" * 65], "a 65-character stop string", "sampling.stop[0]"),
    tenant_id("", "empty tenant id"),
    tenant_id("a/b", "tenant id with '/'"),
    tenant_id("a b", "tenant id with a space"),
    tenant_id("../etc", "tenant id '../etc'"),
    tenant_id("t" * 65, "65-character tenant id"),
    tenant_id("tenant\x00", "tenant id with NUL"),
    tenant_id("ünïcode", "non-ASCII tenant id"),
    tenant_id("a\nb", "tenant id with a newline"),
]


@pytest.fixture(scope="module")
def tenant(stack: Stack) -> Tenant:
    """The tenant whose valid key every bad request carries (on the base model)."""
    assert stack.router.router.gateway.settings.limits == LIMITS, "the corpus is sized for the default RequestLimits"
    return stack.new_tenant(None)


def names_field(details: str, field_name: str) -> bool:
    """`field_name` appears as a whole name: 'sampling.stop' is not named by 'sampling.stop[1]'."""
    return re.search(rf"(?<![\w.\[]){re.escape(field_name)}(?![\w.\[])", details) is not None


def assert_refused(error: grpc.RpcError, case: Bad) -> None:
    details = error.details() or ""
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, f"{case.id}: {error.code()} {details!r}"
    assert names_field(details, case.field), f"{case.id}: {details!r} does not name {case.field}"
    if not case.by_worker:  # the router's own form: "field: problem"
        assert details.startswith(f"{case.field}: "), f"{case.id}: {details!r}"
    assert "\n" not in details and len(details) < 300, f"{case.id}: not one short line: {details!r}"


def unary_refusal(stack: Stack, tenant: Tenant, case: Bad) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub().Generate(case.request(tenant), metadata=call_metadata(tenant), timeout=30)
    return caught.value


def stream_refusal(stub, tenant: Tenant, case: Bad) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GenerateStream(case.request(tenant), metadata=call_metadata(tenant), timeout=30))
    return caught.value


def test_the_corpus_is_large_and_covers_every_field():
    assert len(CORPUS) >= 24
    sampling_fields = {f"sampling.{f}" for f in ("max_new_tokens", "temperature", "top_p", "top_k", "stop")}
    assert {c.field.split("[")[0] for c in CORPUS} == {"prompt", "tenant_id", *sampling_fields}


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_a_bad_request_is_invalid_argument_naming_its_field(stack: Stack, tenant: Tenant, case: Bad):
    assert_refused(unary_refusal(stack, tenant, case), case)


def test_a_prompt_past_the_context_passes_the_router_and_is_refused_by_the_worker(stack: Stack, tenant: Tenant):
    from transformers import AutoTokenizer

    case = next(c for c in CORPUS if c.by_worker)
    check_request(case.request(tenant), LIMITS)  # the router's own checks let it through
    assert len(AutoTokenizer.from_pretrained(stack.model_dir).encode(OVER_CONTEXT_PROMPT)) > CONTEXT
    error = unary_refusal(stack, tenant, case)
    assert_refused(error, case)
    assert f"context is {CONTEXT}" in error.details()  # the engine's check, passed through by the router
    load = stack.replica_stats().load
    assert load.running == load.waiting == load.kv_blocks_used == 0  # nothing of it was admitted


def test_oversized_metadata_is_refused_by_grpc_and_the_router_keeps_serving(stack: Stack, tenant: Tenant):
    """grpc.max_metadata_size is 8192; 20 KB is past gRPC's hard limit too, so the transport refuses
    it every time, before the servicer (and its INVALID_ARGUMENT) is reached."""
    stub = stack.stub()
    padded = (*call_metadata(tenant), ("x-padding", "p" * 20_000))
    good = gateway_pb2.GenerateRequest(tenant_id=tenant.name, prompt=PROMPT, sampling=gateway_pb2.SamplingParams(max_new_tokens=2))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(good, metadata=padded, timeout=30)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, (caught.value.code(), caught.value.details())
    assert "metadata size exceeds" in caught.value.details()
    assert len(stub.Generate(good, metadata=call_metadata(tenant), timeout=30).token_ids) == 2  # same channel, still served


def test_a_request_without_sampling_gets_the_defaults(stack: Stack, tenant: Tenant):
    """Greedy text that runs past 128 tokens on the tiny model, so the default max_new_tokens shows."""
    stub, metadata, text = stack.stub(), call_metadata(tenant), "The quick brown fox"
    unset = stub.Generate(gateway_pb2.GenerateRequest(tenant_id=tenant.name, prompt=text), metadata=metadata, timeout=60)
    explicit = gateway_pb2.SamplingParams(max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0)  # proto/gateway.proto's defaults
    spelled_out = stub.Generate(gateway_pb2.GenerateRequest(tenant_id=tenant.name, prompt=text, sampling=explicit), metadata=metadata, timeout=60)
    assert list(unset.token_ids) == list(spelled_out.token_ids) and unset.text == spelled_out.text
    assert unset.finish_reason == gateway_pb2.FINISH_REASON_LENGTH
    assert unset.usage.completion_tokens == len(unset.token_ids) == 128


class BackgroundStream:
    """A GenerateStream read on a thread, each chunk with the time it arrived."""

    def __init__(self, stack: Stack, tenant: Tenant, request: gateway_pb2.GenerateRequest):
        self.arrivals: list[tuple[float, gateway_pb2.GenerateChunk]] = []
        self.error: grpc.RpcError | None = None
        self.first_chunk = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(stack.stub(), tenant, request), daemon=True)
        self._thread.start()

    def _read(self, stub, tenant: Tenant, request: gateway_pb2.GenerateRequest) -> None:
        try:
            for chunk in stub.GenerateStream(request, metadata=call_metadata(tenant), timeout=120):
                self.arrivals.append((time.monotonic(), chunk))
                self.first_chunk.set()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.first_chunk.set()  # wake the waiter on an early failure too

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the stream did not end within {timeout_s} s"
        assert self.error is None, f"the stream failed: {self.error.code()} {self.error.details()}"

    def arrived_between(self, start: float, end: float) -> int:
        return sum(start < t < end for t, _ in self.arrivals)

    @property
    def tokens(self) -> list[int]:
        return [t for _, c in self.arrivals for t in c.token_ids]


def stream_request(tenant: Tenant) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(tenant_id=tenant.name, prompt=PROMPT,
                                       sampling=gateway_pb2.SamplingParams(max_new_tokens=STREAM_TOKENS, temperature=0.0))  # fmt: skip


def test_other_tenants_stream_keeps_flowing_through_the_whole_corpus(stack: Stack, tenant: Tenant):
    streamer = stack.new_tenant(AdapterKind.LORA, 4, ("attn.c_attn", "mlp.c_fc"), seed=11)
    alone = BackgroundStream(stack, streamer, stream_request(streamer))  # also warms the adapter's cache tiers
    alone.join(120)
    assert len(alone.tokens) == STREAM_TOKENS, "the premise: this adapter's greedy text runs to max_new_tokens"

    stream = BackgroundStream(stack, streamer, stream_request(streamer))
    assert stream.first_chunk.wait(60) and stream.error is None, "the stream did not start"
    stub, start = stack.stub(), time.monotonic()
    for case in CORPUS:  # through the streaming RPC this time
        assert_refused(stream_refusal(stub, tenant, case), case)
    end = time.monotonic()
    stream.join(120)

    final_at, final = stream.arrivals[-1]
    assert final_at > end, f"the stream ended {end - final_at:.2f} s before the corpus did: make STREAM_TOKENS longer"
    assert stream.arrived_between(start, end) > 0, f"no chunk of the stream arrived during the {end - start:.2f} s of the corpus"
    assert final.finish_reason == gateway_pb2.FINISH_REASON_LENGTH
    assert stream.tokens == alone.tokens
    assert stream.arrivals[0][1].adapter.ref == streamer.ref
