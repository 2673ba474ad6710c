"""Paged attention over ragged chunks against per-sequence dense causal attention."""

from __future__ import annotations

import pytest
import torch

from services.engine.attention import AttentionBatch, PaddedChunks, SequenceChunk, pad_chunks, padded_sdpa, paged_attention

BLOCK = 4


def dense_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int, scale: float) -> torch.Tensor:
    """q [n, H, D] at positions first_pos.., keys/values [total, kvH, D] -> [n, H, D], causal."""
    group = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)  # [total, H, D]
    out = []
    for j in range(q.shape[0]):
        p = first_pos + j
        w = torch.softmax(torch.einsum("hd,lhd->hl", q[j], k[: p + 1]) * scale, dim=-1)
        out.append(torch.einsum("hl,lhd->hd", w, v[: p + 1]))
    return torch.stack(out)


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (6, 2), (3, 3)])
def test_ragged_step_matches_dense(heads, kv_heads):
    gen = torch.Generator().manual_seed(heads)
    d, num_blocks = 8, 40
    plan = [(0, 7), (5, 1), (9, 3), (0, 1), (12, 1)]  # (num_cached, num_new): prefill, decode, chunked prefill
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # blocks scattered through the cache
    k_cache = torch.zeros(num_blocks * BLOCK, kv_heads, d, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    chunks, full_k, full_v = [], [], []
    for cached, new in plan:
        need = -(-(cached + new) // BLOCK)
        table = tuple(perm.pop() for _ in range(need))
        keys = torch.randn(cached + new, kv_heads, d, dtype=torch.float64, generator=gen)
        values = torch.randn(cached + new, kv_heads, d, dtype=torch.float64, generator=gen)
        for p in range(cached):  # what earlier steps wrote
            slot = table[p // BLOCK] * BLOCK + p % BLOCK
            k_cache[slot], v_cache[slot] = keys[p], values[p]
        chunks.append(SequenceChunk(cached, new, table))
        full_k.append(keys)
        full_v.append(values)
    batch = AttentionBatch.build(chunks, BLOCK)
    total_new = sum(n for _, n in plan)
    q = torch.randn(total_new, heads, d, dtype=torch.float64, generator=gen)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, plan)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, plan)])
    out = paged_attention(q, new_k, new_v, k_cache, v_cache, batch, scale=d**-0.5)

    row = 0
    for (cached, new), keys, values in zip(plan, full_k, full_v):
        expected = dense_attention(q[row : row + new], keys, values, cached, d**-0.5)
        assert torch.allclose(out[row : row + new], expected, atol=1e-12), f"sequence with {cached} cached, {new} new"
        row += new
    assert batch.positions.tolist() == [p for c, n in plan for p in range(c, c + n)]
    assert batch.last_token_rows.tolist() == [6, 7, 10, 11, 12]


def test_block_table_too_short():
    with pytest.raises(ValueError, match="1 blocks of 4 cannot hold 6 positions"):
        AttentionBatch.build([SequenceChunk(2, 4, (0,))], BLOCK)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (16, 1, 128), (4, 4, 24)])
def test_decode_kernel_equals_the_padded_sdpa_path(dtype, tol, heads, kv_heads, head_dim):
    """Decode rows (one new token each) go through the C++ kernel; the padded SDPA path, run on the
    same rows, is its reference. Context lengths 1..70 cross the kernel's vector widths."""
    gen = torch.Generator().manual_seed(heads + head_dim)
    lengths = [1, 2, 17, 70, 33, 16]
    perm = torch.randperm(64, generator=gen).tolist()
    chunks = [SequenceChunk(n - 1, 1, tuple(perm.pop() for _ in range(-(-n // BLOCK)))) for n in lengths]
    batch = AttentionBatch.build(chunks, BLOCK)
    assert batch.prefill is None and batch.decode.lengths.tolist() == lengths
    k_cache = torch.randn(64 * BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(64 * BLOCK, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(len(lengths), heads, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(len(lengths), kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    out = paged_attention(q, k, v, k_cache, v_cache, batch, scale=head_dim**-0.5)
    reference = padded_sdpa(q, k_cache, v_cache, _padded_chunks_of(chunks, batch), head_dim**-0.5)
    assert (out.float() - reference.float()).abs().max() <= tol


def _padded_chunks_of(chunks: list[SequenceChunk], batch: AttentionBatch) -> PaddedChunks:
    """The same sequences as one padded SDPA problem (what the engine did before the kernel)."""
    cached = torch.tensor([c.num_cached for c in chunks])
    new = torch.tensor([c.num_new for c in chunks])
    first_row = new.cumsum(0) - new
    kv_index = torch.zeros(len(chunks), int((cached + new).max()), dtype=torch.long)
    kv_index[:, : batch.decode.kv_index.shape[1]] = batch.decode.kv_index
    return pad_chunks(cached, new, first_row, kv_index, "cpu")


def test_a_prefill_only_step_has_no_decode_part():
    batch = AttentionBatch.build([SequenceChunk(0, 3, (0,)), SequenceChunk(4, 2, (1, 2))], BLOCK)
    assert batch.decode is None and batch.prefill.rows.tolist() == [0, 1, 2, 3, 4]
    assert batch.slot_mapping.tolist() == [0, 1, 2, 8, 9] and batch.positions.tolist() == [0, 1, 2, 4, 5]
