"""KV-cache block bookkeeping: which fixed-size blocks each sequence owns.

Paged blocks rather than one max-length slot per sequence: a slot must reserve
the model's whole context (8192 positions for StarCoder) for every sequence, so a
fixed budget would hold only a handful of sequences; blocks of 16 positions waste
at most 15 per sequence, so the same bytes hold many more concurrent requests, and
preemption frees exactly what a sequence used. Blocks are never shared between
sequences: cached KV depends on the adapter (it changes k and v projections), and
sharing it across adapters returns one tenant's state for another's request.
"""

from __future__ import annotations

from services.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1 - self.num_free / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_positions: int) -> int:
        """Extra blocks seq needs to hold positions [0, num_positions)."""
        return max(0, -(-num_positions // self.block_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, num_positions: int) -> bool:
        """Grow seq's block table to hold num_positions; False (and no change) if blocks run out."""
        need = self.blocks_needed(seq, num_positions)
        if need > self.num_free:
            return False
        seq.block_table.extend(self.free_blocks.pop() for _ in range(need))
        return True

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(reversed(seq.block_table))
        seq.block_table.clear()
        seq.num_cached = 0
