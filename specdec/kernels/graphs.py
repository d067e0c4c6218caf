"""CUDA graph capture and replay of a model's forward for uniform-query-length batches.

The draft's one- and two-token steps (query_len 1, 2) and the target's verify windows
(query_len 1 .. k + 1) are captured once per batch-size bucket (1, 2, 4, 8, 16, 24, 32, ... up
to max_num_seqs), largest first, all into one memory pool shared by every runner. Ragged
batches are padded in front to a captured length by the ModelRunner (runner.pad_windows). A replay copies the batch into static buffers
(sliced views of one set of max-size tensors) and pads the bucket: padding sequences have
seq_len 0 and slots -1, so the kernels skip their KV writes and write zeros for their rows.

Glossary
- bucket: the padded number of sequences a graph was captured for.
- query_len: tokens per sequence in every batch this runner serves (uniform).
- static buffers: tensors whose addresses the graphs baked in; they are written, never replaced.
"""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.model.llama import ForwardBatch


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 (16, 24, 32, ...), capped at and including max_num_seqs."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    buckets = [b for b in (1, 2, 4, 8) if b <= max_num_seqs]
    buckets += list(range(16, max_num_seqs + 1, 8))
    if buckets[-1] != max_num_seqs:
        buckets.append(max_num_seqs)
    return buckets


class CudaGraphRunner:
    """Replays captured forwards of `model` over `kv_caches` for batches of uniform query_len.

    `can_run(batch)` says whether a batch fits (uniform query_len, at most the largest bucket,
    block table no wider than max_blocks_per_seq); `run(batch)` returns the same float32 logits
    as `model(batch, kv_caches)` (rows for batch.logits_indices). With `debug`, each replay
    asserts that the static buffers still have the addresses the graphs captured.
    """

    def __init__(self, model, kv_caches: list[tuple[Tensor, Tensor]], query_len: int,
                 max_num_seqs: int, max_blocks_per_seq: int, debug: bool = False,
                 buckets: list[int] | None = None, pool=None) -> None:
        if query_len < 1:
            raise ValueError(f"query_len must be >= 1, got {query_len}")
        if max_blocks_per_seq < 1:
            raise ValueError(f"max_blocks_per_seq must be >= 1, got {max_blocks_per_seq}")
        self.model = model
        self.kv_caches = kv_caches
        self.query_len = query_len
        self.max_blocks_per_seq = max_blocks_per_seq
        self.debug = debug
        self.buckets = sorted(buckets or batch_size_buckets(max_num_seqs))
        self.device = model.device
        max_seqs = self.buckets[-1]
        max_rows = max_seqs * query_len
        dev = self.device
        # Static inputs, sized for the largest bucket; each graph uses a leading slice.
        self.input_ids = torch.zeros(max_rows, dtype=torch.long, device=dev)  # [max_rows]
        self.positions = torch.zeros(max_rows, dtype=torch.long, device=dev)  # [max_rows]
        self.slot_mapping = torch.full((max_rows,), -1, dtype=torch.long, device=dev)
        # [max_seqs, max_blocks_per_seq]
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32,
                                        device=dev)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=dev)  # [max_seqs]
        # NOTE: uniform windows: query_start_loc is the same for every batch, written once.
        self.query_start_loc = (torch.arange(max_seqs + 1, dtype=torch.int32, device=dev)
                                * query_len)  # [max_seqs + 1]
        self.logits_indices = torch.arange(max_rows, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Tensor] = {}  # bucket -> [bucket * query_len, vocab] float32
        # One memory pool for every bucket, and for every runner that passes the same `pool`
        # (NOTE: outputs stay alive, replays are sequential on one stream: sharing is safe).
        self.pool = pool
        self._pointers = self._buffer_pointers()

    # ------------------------------------------------------------------ capture

    def _static_batch(self, bucket: int) -> ForwardBatch:
        rows = bucket * self.query_len
        return ForwardBatch(
            input_ids=self.input_ids[:rows], positions=self.positions[:rows],
            slot_mapping=self.slot_mapping[:rows], block_tables=self.block_tables[:bucket],
            seq_lens=self.seq_lens[:bucket], query_start_loc=self.query_start_loc[:bucket + 1],
            logits_indices=self.logits_indices[:rows],
            query_lens=[self.query_len] * bucket, seq_lens_list=[self.query_len] * bucket)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up, then capture every bucket, largest first, into one memory pool.

        NOTE: the capture inputs never touch the live cache: all slots are -1 (no KV writes)
        and each sequence attends to query_len positions of block 0 (reads only).
        """
        from specdec.kernels import cupy as kernels

        if not kernels.available():
            raise RuntimeError("CUDA graphs need the specdec CUDA kernels (the torch reference "
                               f"reads CPU lists): {kernels.load_error()}")
        self.slot_mapping.fill_(-1)
        self.block_tables.zero_()
        self.seq_lens.fill_(self.query_len)
        self.positions.copy_(torch.arange(self.query_len, device=self.device)
                             .repeat(self.buckets[-1]))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for bucket in self.buckets[::-1]:  # compiles/loads every kernel before capture
                for _ in range(2):
                    self.model(self._static_batch(bucket), self.kv_caches)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        for bucket in self.buckets[::-1]:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bucket] = self.model(self._static_batch(bucket), self.kv_caches)
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.device)
        self.seq_lens.zero_()

    # ------------------------------------------------------------------ replay

    def bucket_for(self, num_seqs: int) -> int | None:
        for bucket in self.buckets:
            if bucket >= num_seqs:
                return bucket
        return None

    def can_run(self, batch: ForwardBatch) -> bool:
        num_seqs = len(batch.query_lens)
        return (bool(self.graphs) and num_seqs > 0
                and self.bucket_for(num_seqs) in self.graphs
                and all(q == self.query_len for q in batch.query_lens)
                and batch.block_tables.shape[1] <= self.max_blocks_per_seq
                and batch.input_ids.device == self.input_ids.device)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> Tensor:
        """Replay the smallest bucket that fits; returns logits [len(logits_indices), vocab]."""
        if not self.can_run(batch):
            raise ValueError(f"batch with query_lens={batch.query_lens[:8]} and "
                             f"{batch.block_tables.shape[1]} block-table columns does not fit "
                             f"the graphs (query_len={self.query_len}, buckets <= "
                             f"{self.buckets[-1]}, max_blocks_per_seq="
                             f"{self.max_blocks_per_seq})")
        num_seqs = len(batch.query_lens)
        bucket = self.bucket_for(num_seqs)
        rows = num_seqs * self.query_len
        width = batch.block_tables.shape[1]
        if self.debug:
            assert self._buffer_pointers() == self._pointers, "static buffers were replaced"
        self.input_ids[:rows].copy_(batch.input_ids, non_blocking=True)
        self.positions[:rows].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:rows].copy_(batch.slot_mapping, non_blocking=True)
        self.block_tables[:num_seqs, :width].copy_(batch.block_tables, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(batch.seq_lens, non_blocking=True)
        if bucket > num_seqs:  # padding sequences: no KV writes, zero context
            self.slot_mapping[rows:bucket * self.query_len].fill_(-1)
            self.seq_lens[num_seqs:bucket].zero_()
        self.graphs[bucket].replay()
        logits = self.outputs[bucket]  # [bucket * query_len, vocab]
        return logits.index_select(0, batch.logits_indices.to(logits.device))

    def _buffer_pointers(self) -> tuple[int, ...]:
        caches = [t for pair in self.kv_caches for t in pair]
        return tuple(t.data_ptr() for t in (
            self.input_ids, self.positions, self.slot_mapping, self.block_tables,
            self.seq_lens, self.query_start_loc, self.logits_indices, *caches))
