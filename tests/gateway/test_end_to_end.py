"""Requests through the whole gateway (router -> Serve's gRPC proxy -> replica -> engine) against
transformers and PEFT, and many tenants in one batch."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
import torch

from adapters_store import cli as adapterctl
from services.engine.adapter_format import AdapterKind
from services.protos import gateway_pb2
from tests.gateway.helpers import Stack, Tenant, call_metadata, request
from tests.gateway.tiny_model import BASE_MODEL_ID

PROMPT = "def fibonacci(n):"


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1] :].tolist()


def generate(stack: Stack, tenant: Tenant, prompt: str = PROMPT, max_new_tokens: int = 12) -> gateway_pb2.GenerateResponse:
    return stack.stub().Generate(request(tenant, prompt, max_new_tokens), metadata=call_metadata(tenant), timeout=60)


def test_base_tenant_gets_transformers_greedy_text(stack: Stack):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tenant = stack.new_tenant(None)
    reply = generate(stack, tenant, max_new_tokens=16)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(stack.model_dir).eval(), AutoTokenizer.from_pretrained(stack.model_dir)
    expected = hf_greedy(model, tokenizer, PROMPT, 16)
    assert list(reply.token_ids) == expected
    assert reply.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.adapter.ref == "" and reply.usage.completion_tokens == len(expected)


def test_peft_lora_directory_uploaded_with_adapterctl_gets_peft_greedy_text(stack: Stack, tmp_path, monkeypatch, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(stack.model_dir), config).eval()
    peft_model.save_pretrained(tmp_path / "acme-lora")
    settings = stack.store.settings
    monkeypatch.setenv("FLORA_S3_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("FLORA_S3_SECRET_ACCESS_KEY", "testing")
    code = adapterctl.main(["upload", str(tmp_path / "acme-lora"), "--tenant", "acme", "--base-model", BASE_MODEL_ID, "--json",
                            "--redis-url", settings.redis_url, "--blob-url", settings.blob_url,
                            "--s3-endpoint-url", settings.s3.endpoint_url, "--model-id", BASE_MODEL_ID,
                            "--model-config", str(settings.base_model_config)])  # fmt: skip
    assert code == 0
    uploaded = json.loads(capsys.readouterr().out)
    tenant = Tenant("acme", uploaded["api_key"], uploaded["version"]["ref"])

    reply = generate(stack, tenant, max_new_tokens=16)
    tokenizer = AutoTokenizer.from_pretrained(stack.model_dir)
    expected = hf_greedy(peft_model, tokenizer, PROMPT, 16)
    assert list(reply.token_ids) == expected
    assert reply.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert (reply.adapter.ref, reply.adapter.kind, reply.adapter.rank) == ("acme/default@1", "lora", 4)
    base = generate(stack, stack.new_tenant(None), max_new_tokens=16)
    assert list(base.token_ids) != expected  # the adapter changed the text


EIGHT = [  # (kind, rank, module types): FLoRA, LoRA, IA3 and the base model, several ranks
    (AdapterKind.FLORA, 1, ("attn.c_attn",)),
    (AdapterKind.FLORA, 4, ("attn.c_attn", "mlp.c_fc")),
    (AdapterKind.LORA, 2, ("attn.c_attn",)),
    (AdapterKind.LORA, 8, ("attn.c_attn", "attn.c_proj")),
    (AdapterKind.IA3, 1, ("attn.c_attn", "mlp.c_proj")),
    (None, 0, ()),
    (AdapterKind.FLORA, 2, ("mlp.c_fc",)),
    (AdapterKind.LORA, 4, ("mlp.c_proj",)),
]


def stream_tokens(stack: Stack, tenant: Tenant, max_new_tokens: int) -> tuple[list[int], str]:
    chunks = list(stack.stub().GenerateStream(request(tenant, PROMPT, max_new_tokens), metadata=call_metadata(tenant), timeout=60))
    assert chunks[-1].finish_reason != gateway_pb2.FINISH_REASON_UNSPECIFIED
    assert chunks[0].adapter.ref == tenant.ref
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def test_eight_tenants_streaming_at_once_get_their_tokens_alone_in_one_batch(stack: Stack):
    tenants = [stack.new_tenant(kind, rank, modules, seed=i) for i, (kind, rank, modules) in enumerate(EIGHT)]
    alone = [stream_tokens(stack, t, 60) for t in tenants]
    assert len({tuple(tokens) for tokens, _ in alone}) == 8  # every adapter changes the text

    stack.replica_stats(reset_peaks=True)
    together: list = [None] * 8
    start = threading.Barrier(8)

    def run(i: int) -> None:
        start.wait()
        together[i] = stream_tokens(stack, tenants[i], 60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone
    stats = stack.replica_stats()
    assert stats.steps.peak_batch_seqs == 8 and stats.steps.peak_batch_adapters == 8
    assert stats.load.running == stats.load.waiting == stats.load.adapter_refs == stats.load.kv_blocks_used == 0


@pytest.mark.parametrize("streaming", [True, False])
def test_deadline_propagates_to_the_worker_which_frees_the_request(stack: Stack, streaming: bool):
    tenant = stack.new_tenant(AdapterKind.LORA, 4, seed=3)
    long = request(tenant, PROMPT, 230, ignore_eos=True)
    stub = stack.stub()
    stub.Generate(long, metadata=call_metadata(tenant), timeout=60)  # the adapter is warm from now on
    start = time.monotonic()
    stub.Generate(long, metadata=call_metadata(tenant), timeout=60)
    deadline_s = (time.monotonic() - start) / 3  # a third of the whole request here: a fixed deadline races a fast machine
    before = stack.replica_stats().steps.generated_tokens
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as failure:
        if streaming:
            list(stub.GenerateStream(long, metadata=call_metadata(tenant), timeout=deadline_s))
        else:
            stub.Generate(long, metadata=call_metadata(tenant), timeout=deadline_s)
    assert failure.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < deadline_s + 2.0
    deadline = time.monotonic() + 10
    while (load := stack.replica_stats().load) != type(load)(0, 0, 0, load.kv_blocks_total, 0, 0):
        assert time.monotonic() < deadline, f"the worker still holds the request: {load}"
        time.sleep(0.05)
    assert 0 < stack.replica_stats().steps.generated_tokens - before < 230  # it reached the worker, which stopped it early
    assert sum(stack.router.router.gateway.quotas.in_flight.values()) == 0
    reply = stub.Generate(request(tenant, PROMPT, 8), metadata=call_metadata(tenant), timeout=30)
    assert reply.usage.completion_tokens == 8
