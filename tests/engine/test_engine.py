"""The engine end to end on a tiny real checkpoint: oracles, continuous batching, memory."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPTBigCodeForCausalLM

from services.engine.adapter_format import AdapterKind, AdapterSpec
from services.engine.adapter_manager import Adapter
from services.engine.adapter_weights import LoraWeights
from services.engine.async_engine import AsyncEngine
from services.engine.base_weights import Quantization
from services.engine.sampling import SamplingParams
from services.engine.sequence import FinishReason
from tests.engine.engine_fixtures import adapter, make_engine, save_tiny_gpt_bigcode

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[5, 9, 14, 3, 22], [40, 41], [7] * 11, [60, 2, 61, 62, 63, 64, 65], [11, 12, 13]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_gpt_bigcode(tmp_path_factory.mktemp("tiny-gpt-bigcode"))


def with_adapters(engine, kinds):
    """Register one adapter per (id, kind, rank)."""
    for i, (adapter_id, kind, rank) in enumerate(kinds):
        engine.add_adapter(adapter(adapter_id, kind, rank, engine, seed=i))
    return engine


MIX = [("fl1", AdapterKind.FLORA, 1), ("fl4", AdapterKind.FLORA, 3), ("lo8", AdapterKind.LORA, 8), ("ia3", AdapterKind.IA3, 1)]


def run_alone(model_dir, prompt, adapter_id, params=GREEDY, quantization=Quantization.NONE) -> list[int]:
    engine = with_adapters(make_engine(model_dir, quantization=quantization), MIX)
    return engine.generate([prompt], [adapter_id], params)[0].output_ids


def test_base_greedy_matches_transformers(model_dir):
    engine = make_engine(model_dir)
    hf = GPTBigCodeForCausalLM.from_pretrained(model_dir).eval()
    seqs = engine.generate(PROMPTS, [None] * len(PROMPTS), GREEDY)
    for prompt, seq in zip(PROMPTS, seqs):
        assert seq.output_ids == hf_greedy(hf, prompt, 12)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, EOS not special (like ignore_eos): argmax of a full forward."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("quantization", list(Quantization))
def test_mixed_kinds_in_one_batch_match_running_alone(model_dir, quantization):
    engine = with_adapters(make_engine(model_dir, quantization=quantization), MIX)
    adapter_ids = ["fl1", "lo8", None, "ia3", "fl4"]
    seqs = engine.generate(PROMPTS, adapter_ids, GREEDY)
    outputs = [s.output_ids for s in seqs]
    for prompt, adapter_id, out in zip(PROMPTS, adapter_ids, outputs):
        assert out == run_alone(model_dir, prompt, adapter_id, quantization=quantization)
    # the adapters must change the output, or this test shows nothing
    assert len({tuple(run_alone(model_dir, PROMPTS[0], a, quantization=quantization)) for a in ["fl1", "lo8", None, "ia3", "fl4"]}) == 5


def test_request_arriving_mid_run_joins_without_waiting(model_dir):
    engine = make_engine(model_dir)
    first = engine.add_request(PROMPTS[0], None, SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    second = engine.add_request(PROMPTS[1], None, GREEDY)
    outputs = engine.step()
    assert {o.seq_id for o in outputs} == {first, second}  # joined at the very next step
    tokens = {second: list(next(o.new_token_ids for o in outputs if o.seq_id == second))}
    while engine.has_unfinished():
        for o in engine.step():
            tokens.setdefault(o.seq_id, []).extend(o.new_token_ids)
    assert tokens[second] == run_alone(model_dir, PROMPTS[1], None)


def test_finished_request_leaves_at_once(model_dir):
    engine = make_engine(model_dir)
    short = engine.add_request(PROMPTS[0], None, SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True))
    engine.add_request(PROMPTS[1], None, GREEDY)
    engine.step(), engine.step()
    assert [s.seq_id for s in engine.scheduler.running] != [] and short not in [s.seq_id for s in engine.scheduler.running]
    assert short not in engine.sequences


def test_kv_exhaustion_preempts_and_still_completes_correctly(model_dir):
    # 2 layers · 1 kv head · 8 dims · 4 positions · 4 bytes · 2 (k, v) = 512 bytes a block; 12 blocks = 48 positions
    engine = with_adapters(make_engine(model_dir, kv_cache_bytes=12 * 512), MIX)
    adapter_ids = ["fl1", "lo8", None, "ia3", "fl4"]
    seqs = engine.generate(PROMPTS, adapter_ids, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    for prompt, adapter_id, seq in zip(PROMPTS, adapter_ids, seqs):
        assert seq.output_ids == run_alone(model_dir, prompt, adapter_id)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_more_adapters_than_slots(model_dir):
    engine = make_engine(model_dir)  # FLoRA rank<=1 pool: 2 slots
    names = [f"tenant{i}" for i in range(6)]
    with_adapters(engine, [(n, AdapterKind.FLORA, 1) for n in names])
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(6)]
    seqs = engine.generate(prompts, names, GREEDY)
    for i, seq in enumerate(seqs):
        alone = with_adapters(make_engine(model_dir), [(n, AdapterKind.FLORA, 1) for n in names])
        assert seq.output_ids == alone.generate([prompts[i]], [names[i]], GREEDY)[0].output_ids
    assert engine.adapters.stats.evictions >= 4


def test_same_seed_same_output_whatever_the_batch(model_dir):
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=20, seed=1234, ignore_eos=True)
    alone = run_alone(model_dir, PROMPTS[2], "lo8", sampled)
    engine = with_adapters(make_engine(model_dir), MIX)
    others = [SamplingParams(max_new_tokens=7, temperature=1.0, seed=s) for s in (1, 2)]
    ids = [engine.add_request(PROMPTS[0], "fl1", others[0]), engine.add_request(PROMPTS[2], "lo8", sampled), engine.add_request(PROMPTS[1], None, others[1])]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.seq_id].extend(o.new_token_ids)
    assert tokens[ids[1]] == alone


def test_eos_and_stop_strings(model_dir):
    engine = make_engine(model_dir)
    free = engine.generate([PROMPTS[0]], [None], SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))[0]
    text = engine.tokenizer.decode(free.output_ids)
    stop = text[3:5]
    assert stop and stop not in text[:3] + text[4:4]  # the first occurrence starts at 3
    seq_id = engine.add_request(PROMPTS[0], None, SamplingParams(max_new_tokens=12, temperature=0.0, stop=(stop,)))
    streamed, reason = "", None
    while engine.has_unfinished():
        for o in engine.step():
            streamed += o.text
            reason = o.finish_reason or reason
    assert reason is FinishReason.STOP and streamed == text[: text.find(stop)]
    assert seq_id not in engine.sequences


def test_prompt_too_long_or_empty_is_rejected(model_dir):
    engine = make_engine(model_dir, kv_cache_bytes=4 * 512)
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.add_request([], None, GREEDY)
    with pytest.raises(ValueError, match="the KV cache holds 16 positions in all"):
        engine.add_request([5] * 20, None, GREEDY)
    with pytest.raises(ValueError, match="this model's context is 128"):
        make_engine(model_dir).add_request([5] * 200, None, GREEDY)


def test_streaming_cancel_frees_kv_and_adapter(model_dir):
    engine = with_adapters(make_engine(model_dir), MIX)
    server = AsyncEngine(engine)

    async def consume_two_then_leave():
        chunks = []
        async for chunk in server.generate(PROMPTS[0], "lo8", SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True)):
            chunks.append(chunk)
            if len(chunks) == 2:
                break
        return chunks

    async def full():
        return [c async for c in server.generate(PROMPTS[1], "fl1", GREEDY)]

    try:
        chunks = asyncio.run(consume_two_then_leave())
        assert len(chunks) == 2 and chunks[0].timings.first_token is not None
        done = asyncio.run(full())  # the loop keeps serving; the cancelled request is gone by now
        assert [t for c in done for t in c.new_token_ids] == run_alone(model_dir, PROMPTS[1], "fl1")
        assert done[-1].finish_reason is FinishReason.LENGTH
        with server._lock:
            assert engine.blocks.num_free == engine.blocks.num_blocks
            assert all(r.refs == 0 for r in engine.adapters.resident.values())
            assert not engine.sequences
    finally:
        server.shutdown()


def test_request_waits_for_its_adapter_without_stalling_others(model_dir):
    engine = make_engine(model_dir)
    pending = engine.add_request(PROMPTS[0], "late", GREEDY)
    other = engine.add_request(PROMPTS[1], None, GREEDY)
    outputs = engine.step()
    assert [o.seq_id for o in outputs] == [other]
    engine.add_adapter(adapter("late", AdapterKind.FLORA, 1, engine, seed=7))
    assert pending in {o.seq_id for o in engine.step()}


def test_peft_lora_adapter_gives_peft_greedy_tokens(model_dir):
    """A PEFT LoRA adapter (r=4 on c_attn) in the engine, beside a base request, gives PEFT's greedy tokens."""
    torch.manual_seed(5)
    hf = GPTBigCodeForCausalLM.from_pretrained(model_dir).eval()
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)).eval()
    with torch.no_grad():  # a trained-looking adapter: large enough to change greedy tokens
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                module.lora_B["default"].weight.mul_(3)
    engine = make_engine(model_dir)
    weights = {}
    for name in engine.model.adapted_layers():
        if name.endswith("attn.c_attn"):
            peft_layer = peft_model.get_submodule(f"base_model.model.{name}")
            weights[name] = LoraWeights(peft_layer.lora_A["default"].weight.detach(), peft_layer.lora_B["default"].weight.detach(), peft_layer.scaling["default"])
    engine.add_adapter(Adapter("peft", AdapterSpec(AdapterKind.LORA, 4, tuple(weights), "tiny", alpha=8.0), weights))
    seqs = engine.generate([PROMPTS[0], PROMPTS[0]], ["peft", None], GREEDY)
    assert seqs[0].output_ids == hf_greedy(peft_model, PROMPTS[0], 12)
    with peft_model.disable_adapter():
        assert seqs[1].output_ids == hf_greedy(peft_model, PROMPTS[0], 12)
    assert seqs[0].output_ids != seqs[1].output_ids


def test_sequence_longer_than_the_whole_kv_cache_finishes_instead_of_waiting_forever(model_dir):
    engine = make_engine(model_dir, kv_cache_bytes=4 * 512)  # 16 positions in all
    seq = engine.generate([PROMPTS[0]], [None], SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_tokens == 16
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_stream_min_interval_batches_outputs_into_fewer_messages(model_dir):
    engine = with_adapters(make_engine(model_dir), MIX)
    server = AsyncEngine(engine)
    params = SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)

    async def batches(interval: float) -> list[list]:
        return [batch async for batch in server.stream(PROMPTS[0], "lo8", params, min_interval_s=interval)]

    try:
        every_step, held = asyncio.run(batches(0.0)), asyncio.run(batches(0.2))
        tokens = [[t for b in bs for o in b for t in o.new_token_ids] for bs in (every_step, held)]
        assert tokens[0] == tokens[1] == run_alone(model_dir, PROMPTS[0], "lo8", params)
        assert len(held) < len(every_step) and held[-1][-1].finish_reason is FinishReason.LENGTH
    finally:
        server.shutdown()


def test_async_engine_build_runs_the_factory_on_the_step_loop_thread(model_dir):
    built_on = []

    def factory():
        built_on.append(threading.current_thread().name)
        return with_adapters(make_engine(model_dir), MIX)

    server = AsyncEngine.build(factory)
    try:
        async def generate():
            return [t async for o in server.generate(PROMPTS[1], "fl1", GREEDY) for t in o.new_token_ids]

        assert built_on == ["engine-loop"]  # the thread that steps it: the process's one OpenMP master
        assert asyncio.run(generate()) == run_alone(model_dir, PROMPTS[1], "fl1")
    finally:
        server.shutdown()


def test_async_engine_build_raises_the_factory_error():
    def factory():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        AsyncEngine.build(factory)
