"""Paged attention over a block KV cache, plain torch, for ragged batches.

One step mixes sequences at different points: decode rows (1 new token), prefill
chunks (many new tokens), each with its own context length and block table.
`AttentionBatch` (built once per step by the model runner) pads them into one
[B, Qmax] x [B, Cmax] problem so that every layer makes a single SDPA call:

    q_index  [B, Qmax]  row of each sequence's j-th new token in the flat [T] batch
    kv_index [B, Cmax]  cache slot of each sequence's p-th context position
    mask     [B, 1, Qmax, Cmax]  causal within the sequence, False on padding

The KV cache of a layer is flat: k_cache [num_blocks · block_size, kv_heads, head_dim];
slot = block_table[pos // block_size] · block_size + pos % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's part of a step: `num_new` tokens after `num_cached` already in the cache."""

    num_cached: int
    num_new: int
    block_table: tuple[int, ...]  # cache blocks holding positions [0, num_cached + num_new)


@dataclass(frozen=True)
class AttentionBatch:
    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot where each new token's K/V is written
    q_index: torch.Tensor  # [B, Qmax] int64 into [T] (padding: 0)
    kv_index: torch.Tensor  # [B, Cmax] int64 cache slots (padding: 0)
    mask: torch.Tensor  # [B, 1, Qmax, Cmax] bool, True = attend
    out_index: torch.Tensor  # [T] int64 into the padded [B · Qmax] rows
    last_token_rows: torch.Tensor  # [B] int64, row in [T] of each sequence's last new token

    @staticmethod
    def build(chunks: list[SequenceChunk], block_size: int, device: torch.device | str = "cpu") -> "AttentionBatch":
        q_max = max(c.num_new for c in chunks)
        c_max = max(c.num_cached + c.num_new for c in chunks)
        b = len(chunks)
        q_index = torch.zeros(b, q_max, dtype=torch.long)
        kv_index = torch.zeros(b, c_max, dtype=torch.long)
        mask = torch.zeros(b, 1, q_max, c_max, dtype=torch.bool)
        mask[:, :, :, 0] = True  # padded query rows attend somewhere (their output is dropped), avoiding NaN
        positions, out_index, last = [], [], []
        row = 0
        for i, c in enumerate(chunks):
            total = c.num_cached + c.num_new
            slots = _slots(c.block_table, total, block_size)  # [total]
            kv_index[i, :total] = slots
            pos = torch.arange(c.num_cached, total)
            q_index[i, : c.num_new] = torch.arange(row, row + c.num_new)
            mask[i, 0, : c.num_new, :total] = torch.arange(total)[None, :] <= pos[:, None]
            positions.append(pos)
            out_index.append(torch.arange(c.num_new) + i * q_max)
            row += c.num_new
            last.append(row - 1)
        positions_t = torch.cat(positions)
        slot_mapping = kv_index.new_empty(row)
        slot_mapping[:] = torch.cat([kv_index[i, c.num_cached : c.num_cached + c.num_new] for i, c in enumerate(chunks)])
        to = lambda t: t.to(device)  # noqa: E731
        return AttentionBatch(
            to(positions_t), to(slot_mapping), to(q_index), to(kv_index), to(mask), to(torch.cat(out_index)), to(torch.tensor(last))
        )


def _slots(block_table: tuple[int, ...], length: int, block_size: int) -> torch.Tensor:
    if len(block_table) * block_size < length:
        raise ValueError(f"{len(block_table)} blocks of {block_size} cannot hold {length} positions")
    pos = torch.arange(length)
    return torch.tensor(block_table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """Semantics: for each new token t of sequence i at position p,
    out[t] = softmax(q[t] · K_i[:p+1]ᵀ · scale) V_i[:p+1], with K_i/V_i the sequence's cached
    keys/values including this step's (written to the cache first). GQA/MQA: kv heads are shared
    by H / kv_heads query heads each.

    q [T, H, D], k/v [T, kvH, D], k_cache/v_cache [slots, kvH, D] -> [T, H, D]
    """
    k_cache.index_copy_(0, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    keys = k_cache[batch.kv_index].transpose(1, 2)  # [B, kvH, Cmax, D]
    values = v_cache[batch.kv_index].transpose(1, 2)
    queries = q[batch.q_index].transpose(1, 2)  # [B, H, Qmax, D]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=batch.mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).flatten(0, 1)[batch.out_index]  # [T, H, D]
