"""A minimal engine loop for the model tests, and transformers as the oracle.

`PagedRunner` does what the engine's model runner will do, in the plainest way:
each sequence owns a block table, a step is one ragged batch of new tokens from
any subset of the sequences, and every adapted module type gets its AdapterBatch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.engine.adapter_batch import AdapterBatch
from services.engine.adapter_slots import NO_ADAPTER
from services.engine.adapter_weights import LoraWeights
from services.engine.attention import AttentionBatch, SequenceChunk
from services.engine.context import StepContext, using_step
from services.engine.cost_model import FixedPaths
from services.engine.models import CausalLM

BLOCK = 4
TOLERANCE = 1e-4  # max |ours - transformers| on fp32 logits


class PagedRunner:
    """Sequences 0..n-1 with interleaved cache blocks (sequence i owns blocks i, i+n, i+2n, ...)."""

    def __init__(self, model: CausalLM, num_seqs: int, max_len: int, slot_ids: Sequence[int] | None = None):
        self.model = model
        blocks = -(-max_len // BLOCK)
        self.tables = [tuple(i + j * num_seqs for j in range(blocks)) for i in range(num_seqs)]
        shape = (model.num_layers, num_seqs * blocks * BLOCK, model.num_kv_heads, model.head_dim)
        model.attach_kv_cache(torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
        self.cached = [0] * num_seqs
        self.slot_ids = list(slot_ids) if slot_ids is not None else [NO_ADAPTER] * num_seqs
        # (d_in, d_out) of each adapted module type, by the batch index its layers read
        dims = {layer.batch_index: (layer.d_in, layer.d_out, layer.slots.layout) for layer in model.adapted_layers().values()}
        self.module_dims = [dims[i] for i in range(len(dims))]

    def step(self, seqs: Sequence[int], tokens: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Run tokens[j] as the next tokens of sequence seqs[j]; -> per sequence logits [len(tokens[j]), vocab]."""
        chunks = [SequenceChunk(self.cached[s], len(t), self.tables[s]) for s, t in zip(seqs, tokens)]
        batch = AttentionBatch.build(chunks, BLOCK)
        input_ids = torch.tensor([tok for t in tokens for tok in t], dtype=torch.long)  # [T]
        rows = [self.slot_ids[s] for s, t in zip(seqs, tokens) for _ in t]  # [T] slot per token
        adapters = tuple(AdapterBatch.build(rows, layout, FixedPaths(), d_in, d_out) for d_in, d_out, layout in self.module_dims)
        with using_step(StepContext(adapters, batch)):
            hidden = self.model(input_ids, batch.positions)  # [T, d]
            logits = self.model.compute_logits(hidden)  # [T, vocab]: every row, so prefill is checked too
        for s, t in zip(seqs, tokens):
            self.cached[s] += len(t)
        return list(logits.split([len(t) for t in tokens]))


def load_peft_lora(model: CausalLM, peft_model: torch.nn.Module, slot: int) -> None:
    """Copy the PEFT model's "default" LoRA into `slot` of every adapted layer of ours (same HF module names)."""
    for name, layer in model.adapted_layers().items():
        peft_layer = peft_model.get_submodule(f"base_model.model.{name}")
        a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        layer.slots.load(slot, LoraWeights(a, b, peft_layer.scaling["default"]))


def hf_logits(hf_model: torch.nn.Module, tokens: Sequence[int]) -> torch.Tensor:
    """transformers' logits [n, vocab] for one whole sequence."""
    return hf_model(torch.tensor([list(tokens)])).logits[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def random_tokens(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=gen).tolist()  # 0-2: unk, bos, eos


def perturb_small_params(model: torch.nn.Module, gen: torch.Generator) -> None:
    """HF initializes biases to 0 and norms to 1: make them random, or a test cannot see them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def check_ragged_steps(runner: PagedRunner, hf_model: torch.nn.Module, prompts: list[list[int]], plan, gen, vocab: int) -> float:
    """Prefill all prompts in one ragged step, then each step of `plan` ({seq: new token count});
    every row's logits must match transformers' on the whole sequence. -> the largest difference."""
    seqs = [list(p) for p in prompts]
    worst = 0.0
    steps = [{i: len(p) for i, p in enumerate(prompts)}, *plan]
    for k, step in enumerate(steps):
        ids = list(step)
        new = [prompts[i] if k == 0 else random_tokens(gen, step[i], vocab) for i in ids]
        got = runner.step(ids, new)
        for i, toks, logits in zip(ids, new, got):
            if k:
                seqs[i] += toks
            expected = hf_logits(hf_model, seqs[i])[-len(toks) :]
            diff = max_diff(logits, expected)
            assert diff <= TOLERANCE, f"step {k}, sequence {i}: max logit diff {diff:.2e}"
            worst = max(worst, diff)
    return worst


def saved_checkpoint(hf_model: torch.nn.Module, directory) -> tuple[torch.nn.Module, object]:
    """A transformers model with its small parameters perturbed, saved as safetensors: (model, dir)."""
    hf_model.eval()
    perturb_small_params(hf_model, torch.Generator().manual_seed(1))
    hf_model.save_pretrained(directory)
    return hf_model, directory


def assert_matches_transformers(ours: CausalLM, hf_model: torch.nn.Module, prompt_lengths, plan, max_len: int, vocab: int) -> None:
    """Our logits equal transformers' for a ragged prefill of `prompt_lengths` and every step of `plan`."""
    gen = torch.Generator().manual_seed(2)
    prompts = [random_tokens(gen, n, vocab) for n in prompt_lengths]
    with torch.inference_mode():
        worst = check_ragged_steps(PagedRunner(ours, len(prompts), max_len), hf_model, prompts, plan, gen, vocab)
        scale = hf_logits(hf_model, max(prompts, key=len)).abs().max()
    assert worst <= TOLERANCE and scale > 1.0  # logits big enough that 1e-4 means something
