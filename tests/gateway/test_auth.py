"""Who may call the gateway, for whom, and how much, through the running router.

- Authentication: a missing, malformed, wrong, rotated or deleted key is UNAUTHENTICATED;
  another tenant's key PERMISSION_DENIED; an unknown (or deleted) tenant NOT_FOUND;
  every refusal a one-line message.
- Isolation: tenant A's key never gets tenant B's adapter, whatever A sends, alone or
  in a crowd of concurrent requests of both.
- Change notices: `adapterctl tenant rotate-key`, `tenant delete` and `tenant set-quota`
  reach the router's caches through the registry's pub/sub within a second, no restart.
- Quotas: requests per minute and max_concurrent refuse with RESOURCE_EXHAUSTED (the
  arithmetic itself is in tests/router/test_quotas.py); other tenants are unaffected.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import grpc
import pytest

from adapters_store import cli as adapterctl
from services.engine.adapter_format import AdapterKind
from services.protos import gateway_pb2, gateway_pb2_grpc
from tests.gateway.helpers import Stack, Tenant, call_metadata, request

PROMPT = "def fibonacci(n):"
HINT = "send metadata 'authorization: Bearer <api key>'"
SHORT = 8  # tokens: enough to tell two adapters apart
LONG = 230  # tokens: a stream that runs for a good fraction of a second (the model's context is 256)
CHANGE_DEADLINE_S = 2.0  # how long a poll waits for a change notice before failing
CHANGE_LIMIT_S = 1.0  # how soon a change must be served


# ---- calls and outcomes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str = ""
    ref: str = ""  # the adapter version that served it (OK only)
    tokens: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK


def generate(stub: gateway_pb2_grpc.GatewayStub, tenant_id: str, metadata, max_new_tokens: int = SHORT) -> Outcome:
    try:
        reply = stub.Generate(request(tenant_id, PROMPT, max_new_tokens), metadata=metadata, timeout=30)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "")
    return Outcome(grpc.StatusCode.OK, ref=reply.adapter.ref, tokens=tuple(reply.token_ids))


def own(stub: gateway_pb2_grpc.GatewayStub, tenant: Tenant, max_new_tokens: int = SHORT) -> Outcome:
    """The tenant's request with its own key."""
    return generate(stub, tenant.name, call_metadata(tenant), max_new_tokens)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def assert_refused(outcome: Outcome, code: grpc.StatusCode, message: str) -> None:
    assert outcome.code is code, outcome
    assert outcome.details == message
    assert "\n" not in outcome.details  # one line


def poll_until(observe: Callable[[], Outcome], done: Callable[[Outcome], bool], what: str) -> tuple[Outcome, float]:
    """Observe until `done` (a change notice has reached the router); (the outcome, seconds it took)."""
    start = time.monotonic()
    while True:
        outcome = observe()
        elapsed = time.monotonic() - start
        if done(outcome):
            return outcome, elapsed
        if elapsed > CHANGE_DEADLINE_S:
            pytest.fail(f"{what}: still {outcome} after {CHANGE_DEADLINE_S} s")
        time.sleep(0.01)


def run_adapterctl(stack: Stack, monkeypatch, capsys, *args: str) -> dict:
    """`adapterctl ARGS --json` against the stack's registry and blob store; its JSON result."""
    settings = stack.store.settings
    monkeypatch.setenv("FLORA_S3_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("FLORA_S3_SECRET_ACCESS_KEY", "testing")
    capsys.readouterr()
    code = adapterctl.main([*args, "--json", "--redis-url", settings.redis_url, "--blob-url", settings.blob_url,
                            "--s3-endpoint-url", settings.s3.endpoint_url])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


@pytest.fixture
def stub(stack: Stack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    channel = grpc.insecure_channel(stack.router.address)
    yield gateway_pb2_grpc.GatewayStub(channel)
    channel.close()


@pytest.fixture
def two_tenants(stack: Stack, stub) -> tuple[Tenant, Tenant, Outcome, Outcome]:
    """Fresh tenants A (FLoRA) and B (LoRA), and what each gets alone."""
    a, b = stack.new_tenant(AdapterKind.FLORA, seed=11), stack.new_tenant(AdapterKind.LORA, rank=2, seed=12)
    alone_a, alone_b = own(stub, a), own(stub, b)
    assert (alone_a.ref, alone_b.ref) == (a.ref, b.ref)
    assert alone_a.tokens != alone_b.tokens  # else "B's tokens" could not be told from A's
    return a, b, alone_a, alone_b


# ---- authentication -----------------------------------------------------------------------------


def test_a_request_without_a_key_is_unauthenticated_and_says_how_to_send_one(stack: Stack, stub):
    tenant = stack.new_tenant(AdapterKind.FLORA)
    assert_refused(generate(stub, tenant.name, ()), grpc.StatusCode.UNAUTHENTICATED, f"missing API key: {HINT}")
    other_metadata = (("x-api-key", tenant.api_key), ("authorization-token", tenant.api_key))
    assert_refused(generate(stub, tenant.name, other_metadata), grpc.StatusCode.UNAUTHENTICATED, f"missing API key: {HINT}")


@pytest.mark.parametrize(
    "values",
    [
        ["Basic {key}"],
        ["Basic x"],
        ["Bearer"],
        ["{key}"],  # no scheme
        ["Bearer{key}"],  # no space
        ["Token {key}"],
        ["Bearer {key}", "Bearer {key}"],  # two values, even the same valid key
        ["Bearer {key}", "Basic x"],
    ],
    ids=["basic-key", "basic-x", "bearer-alone", "bare-key", "no-space", "token-scheme", "twice", "bearer-and-basic"],
)
def test_malformed_authorization_metadata_is_unauthenticated(stack: Stack, stub, values: list[str]):
    tenant = stack.new_tenant(AdapterKind.FLORA)
    metadata = tuple(("authorization", v.format(key=tenant.api_key)) for v in values)
    expected = f"malformed authorization metadata: {HINT}"
    assert_refused(generate(stub, tenant.name, metadata), grpc.StatusCode.UNAUTHENTICATED, expected)


def test_the_bearer_scheme_is_case_insensitive(stack: Stack, stub):
    tenant = stack.new_tenant(AdapterKind.FLORA)
    assert own(stub, tenant).ok  # the reference call
    assert generate(stub, tenant.name, (("authorization", f"bearer {tenant.api_key}"),)).ok  # RFC 6750: any case


def test_wrong_key_is_unauthenticated_before_the_tenant_is_even_looked_up(stack: Stack, stub):
    tenant = stack.new_tenant(AdapterKind.FLORA)
    key_hash = stack.store.registry.tenant(tenant.name).key_sha256
    invalid = "the API key is not valid (rotated, or its tenant deleted?)"
    for wrong in ("flk_not-a-key", tenant.api_key + "x", tenant.api_key[:-1], key_hash, tenant.name):
        assert_refused(generate(stub, tenant.name, bearer(wrong)), grpc.StatusCode.UNAUTHENTICATED, invalid)
    # Without a valid key nobody learns whether a tenant exists.
    assert_refused(generate(stub, "no-such-tenant", bearer("flk_not-a-key")), grpc.StatusCode.UNAUTHENTICATED, invalid)


def test_another_tenants_key_is_permission_denied_and_an_unknown_tenant_not_found(stack: Stack, stub):
    a, b = stack.new_tenant(AdapterKind.FLORA), stack.new_tenant(AdapterKind.LORA)
    assert_refused(generate(stub, b.name, call_metadata(a)), grpc.StatusCode.PERMISSION_DENIED,
                   f"this API key belongs to another tenant, not {b.name}")  # fmt: skip
    assert_refused(generate(stub, "no-such-tenant", call_metadata(a)), grpc.StatusCode.NOT_FOUND,
                   "tenant no-such-tenant does not exist")  # fmt: skip
    assert own(stub, a).ok and own(stub, b).ok


def test_rotate_key_stops_the_old_key_within_a_second_and_the_new_one_works(stack: Stack, stub, monkeypatch, capsys):
    tenant = stack.new_tenant(AdapterKind.FLORA)
    assert own(stub, tenant).ok  # the router now holds the old key in its cache
    rotated = run_adapterctl(stack, monkeypatch, capsys, "tenant", "rotate-key", tenant.name)
    refused, took = poll_until(lambda: own(stub, tenant), lambda o: not o.ok, "the old key after rotate-key")
    assert took < CHANGE_LIMIT_S, f"rotate-key took {took:.2f} s to reach the router"
    assert refused.code is grpc.StatusCode.UNAUTHENTICATED, refused
    renewed = own(stub, replace(tenant, api_key=rotated["api_key"]))
    assert renewed.ok and renewed.ref == tenant.ref


def test_delete_tenant_stops_its_key_within_a_second_and_its_name_is_then_not_found(stack: Stack, stub, monkeypatch, capsys):
    doomed, other = stack.new_tenant(AdapterKind.FLORA, seed=3), stack.new_tenant(AdapterKind.LORA)
    assert own(stub, doomed).ok  # its key and its adapter are now cached by the router
    assert generate(stub, doomed.name, call_metadata(other)).code is grpc.StatusCode.PERMISSION_DENIED
    run_adapterctl(stack, monkeypatch, capsys, "tenant", "delete", doomed.name, "--force")

    refused, took = poll_until(lambda: own(stub, doomed), lambda o: not o.ok, "the deleted tenant's own key")
    assert took < CHANGE_LIMIT_S, f"tenant delete took {took:.2f} s to reach the router"
    assert_refused(refused, grpc.StatusCode.UNAUTHENTICATED, "the API key is not valid (rotated, or its tenant deleted?)")
    assert_refused(generate(stub, doomed.name, call_metadata(other)), grpc.StatusCode.NOT_FOUND,
                   f"tenant {doomed.name} does not exist")  # fmt: skip
    assert own(stub, other).ok


def test_a_tenant_created_again_under_a_deleted_name_gets_a_new_key_and_not_the_old_adapter(stack: Stack, stub):
    old = stack.new_tenant(AdapterKind.FLORA, seed=4)
    assert own(stub, old).ref == old.ref
    stack.store.delete_tenant(old.name, force=True)
    poll_until(lambda: own(stub, old), lambda o: not o.ok, "the deleted tenant's key")
    new = Tenant(old.name, stack.store.create_tenant(old.name), "")
    reborn = own(stub, new)
    assert reborn.ok and reborn.ref == ""  # the base model: the old versions went with the old tenant
    assert own(stub, old).code is grpc.StatusCode.UNAUTHENTICATED


# ---- isolation ----------------------------------------------------------------------------------


def impersonations(a: Tenant, b: Tenant, b_key_hash: str) -> list[tuple[str, tuple]]:
    """(tenant_id, metadata) pairs with which A's key might try to reach B's adapter."""
    mine = call_metadata(a)
    # B's id in other cases, padded, with invisible or look-alike (fullwidth) characters, repeated past 64 characters.
    b_spellings = [b.name, b.name.upper(), b.name.title(), b.name[:-1] + b.name[-1].upper(), a.name.upper(),
                   f" {b.name}", f"{b.name} ", f"{b.name}\n", f"\t{b.name}", f"{b.name}\x00", f"\u200b{b.name}",
                   b.name.replace("t", "\uff54"), b.name * 8, b.name * 9]  # fmt: skip
    # B inside reference, path, Redis key and list syntax.
    b_in_syntax = [f"{b.name}/default", b.ref, f"{a.name}/../{b.name}", f"{b.name}:tenant", f"flora:tenant:{b.name}",
                   f"{a.name},{b.name}", f"{a.name} {b.name}", f"{a.name}\x00{b.name}"]  # fmt: skip
    attempts = [(name, mine) for name in b_spellings + b_in_syntax]
    naming_b = [("tenant_id", b.name), ("x-tenant-id", b.name), ("tenant", b.name), ("multiplexed_model_id", b.ref),
                ("serve_multiplexed_model_id", b.ref), ("application", "worker")]  # fmt: skip
    attempts += [(a.name, mine + (extra,)) for extra in naming_b]  # A's id, with metadata naming B
    attempts += [(a.name, mine + tuple(naming_b)), (b.name, mine + (("tenant_id", a.name),))]
    # B's name or stored key hash where the key goes, and A's key twice.
    keys_with_b = [f"Bearer {a.api_key} {b.name}", f"Bearer {a.api_key},{b.name}", f"Bearer {b_key_hash}", f"Bearer {b.name}"]
    attempts += [(b.name, (("authorization", v),)) for v in keys_with_b]
    attempts += [(b.name, mine * 2)]
    return attempts


def test_a_key_never_reaches_another_tenants_adapter_whatever_it_sends(stack: Stack, stub, two_tenants):
    a, b, alone_a, alone_b = two_tenants
    b_key_hash = stack.store.registry.tenant(b.name).key_sha256
    served = []
    for tenant_id, metadata in impersonations(a, b, b_key_hash):
        outcome = generate(stub, tenant_id, metadata)
        assert outcome.ref != b.ref and outcome.tokens != alone_b.tokens, (tenant_id, metadata)
        if outcome.ok:  # only ever as A, on A's adapter
            assert (outcome.ref, outcome.tokens) == (alone_a.ref, alone_a.tokens), (tenant_id, metadata)
            served.append(tenant_id)
    assert generate(stub, b.name, call_metadata(a)).code is grpc.StatusCode.PERMISSION_DENIED
    assert set(served) == {a.name}  # the only requests served named A itself


def test_concurrent_requests_of_two_tenants_each_get_their_own_adapter(stack: Stack, stub, two_tenants):
    a, b, alone_a, alone_b = two_tenants
    # (tenant_id, whose key, what it must get): own requests interleaved with cross-tenant ones.
    mix = [(a.name, a, alone_a), (b.name, b, alone_b), (b.name, a, None), (a.name, b, None)] * 10
    random.Random(0).shuffle(mix)

    def call(job) -> Outcome:
        tenant_id, key_owner, _ = job
        return generate(stub, tenant_id, call_metadata(key_owner))

    stack.replica_stats(reset_peaks=True)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, mix))
    assert stack.replica_stats().steps.peak_batch_adapters >= 2  # A's and B's rows were in one batch
    for (tenant_id, key_owner, expected), outcome in zip(mix, outcomes):
        if expected is None:
            assert outcome.code is grpc.StatusCode.PERMISSION_DENIED, (tenant_id, key_owner.name, outcome)
        else:
            assert (outcome.ref, outcome.tokens) == (expected.ref, expected.tokens), (tenant_id, outcome)


# ---- quotas -------------------------------------------------------------------------------------


def test_requests_per_minute_set_with_adapterctl_applies_without_restart_and_spares_other_tenants(
    stack: Stack, stub, monkeypatch, capsys
):
    limited, other = stack.new_tenant(AdapterKind.FLORA), stack.new_tenant(AdapterKind.FLORA)
    assert own(stub, limited).ok  # the router now holds its quota (none) in its cache
    run_adapterctl(stack, monkeypatch, capsys, "tenant", "set-quota", limited.name, "--requests-per-minute", "6")
    # The bucket holds one request (6 a minute, 10 s of burst): the second within 10 s is refused.
    refused, took = poll_until(lambda: own(stub, limited), lambda o: not o.ok, "requests past the new quota")
    assert took < CHANGE_LIMIT_S, f"set-quota took {took:.2f} s to reach the router"
    assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    prefix = f"tenant {limited.name} is over its quota of 6 requests per minute; retry in "
    assert refused.details.startswith(prefix) and refused.details.endswith(" s"), refused.details
    assert 0 < float(refused.details.removeprefix(prefix).removesuffix(" s")) <= 10
    assert all(own(stub, other).ok for _ in range(5))

    run_adapterctl(stack, monkeypatch, capsys, "tenant", "set-quota", limited.name, "--requests-per-minute", "0")
    _, took = poll_until(lambda: own(stub, limited), lambda o: o.ok, "requests after the quota was lifted")
    assert took < CHANGE_LIMIT_S, f"lifting the quota took {took:.2f} s to reach the router"


def open_stream(stub: gateway_pb2_grpc.GatewayStub, tenant: Tenant, max_new_tokens: int = LONG):
    """A started stream and its first chunk (so the request is admitted and generating)."""
    call = stub.GenerateStream(request(tenant, PROMPT, max_new_tokens), metadata=call_metadata(tenant), timeout=60)
    return call, next(call)


def drain(call, first: gateway_pb2.GenerateChunk) -> list[gateway_pb2.GenerateChunk]:
    """A stream's chunks from `first` to the last, which must carry a finish reason."""
    chunks = [first, *call]
    assert chunks[-1].finish_reason != gateway_pb2.FINISH_REASON_UNSPECIFIED
    return chunks


def stream_outcome(stub: gateway_pb2_grpc.GatewayStub, tenant: Tenant) -> Outcome:
    """A short stream of the tenant's, run to its end."""
    try:
        call, first = open_stream(stub, tenant, SHORT)
        chunks = drain(call, first)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "")
    return Outcome(grpc.StatusCode.OK, ref=first.adapter.ref, tokens=tuple(t for c in chunks for t in c.token_ids))


def test_max_concurrent_one_refuses_a_second_stream_while_the_first_runs(stack: Stack, stub):
    limited, other = stack.new_tenant(AdapterKind.FLORA, seed=1), stack.new_tenant(AdapterKind.LORA)
    stack.store.registry.set_quota(limited.name, {"max_concurrent": 1})  # before its first request: nothing cached yet
    first, first_chunk = open_stream(stub, limited)
    second = stream_outcome(stub, limited)
    assert_refused(second, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   f"tenant {limited.name} is over its quota of 1 concurrent requests; retry when one finishes")  # fmt: skip
    assert stream_outcome(stub, other).ok  # another tenant's requests are not counted against it
    drain(first, first_chunk)
    assert stream_outcome(stub, limited).ok  # the first one's place is free again


def test_a_cancelled_stream_gives_back_its_concurrency_place(stack: Stack, stub):
    limited = stack.new_tenant(AdapterKind.FLORA, seed=1)
    stack.store.registry.set_quota(limited.name, {"max_concurrent": 1})
    first, _ = open_stream(stub, limited)
    assert stream_outcome(stub, limited).code is grpc.StatusCode.RESOURCE_EXHAUSTED
    first.cancel()
    _, took = poll_until(lambda: stream_outcome(stub, limited), lambda o: o.ok, "a stream after the first was cancelled")
    assert took < CHANGE_LIMIT_S


def test_an_unreadable_change_notice_does_not_stop_the_router_following_changes(stack: Stack, stub, monkeypatch, capsys):
    tenant = stack.new_tenant(AdapterKind.FLORA)
    assert own(stub, tenant).ok
    registry = stack.store.registry
    for garbage in ("not json", "[]", '{"event": "key_rotated"}'):  # someone else's publisher on the same channel
        registry.client.publish(registry.channel, garbage)
    run_adapterctl(stack, monkeypatch, capsys, "tenant", "rotate-key", tenant.name)
    _, took = poll_until(lambda: own(stub, tenant), lambda o: not o.ok, "the old key after rotate-key")
    assert took < CHANGE_LIMIT_S
