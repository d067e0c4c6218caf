"""CUDA graph capture and replay of a model's forward for uniform-query-length batches.

The draft's one- and two-token steps (query_len 1, 2) and the target's verify windows
(query_len 1 .. k + 1) are captured once per batch-size bucket (1, 2, 4, 8, 16, 24, 32, ... up
to max_num_seqs), largest first, all into one memory pool shared by every runner. Ragged
batches are padded in front to a captured length by the ModelRunner (runner.pad_windows). A replay copies the batch into static buffers
(sliced views of one set of max-size tensors) and pads the bucket: padding sequences have
seq_len 0 and slots -1, so the kernels skip their KV writes and write zeros for their rows.
Under tensor parallelism every rank captures the same query lengths and buckets in the same
order (the workers on rank 0's OP_CAPTURE message), so each graph holds its rank's part of the
all-reduces and of the logits gather, and a replay on one rank meets the same replay on all.

Glossary
- bucket: the padded number of sequences a graph was captured for.
- query_len: tokens per sequence in every batch this runner serves (uniform).
- static buffers: tensors whose addresses the graphs baked in; they are written, never replaced.
- LoRA (`lora` = the LoRASlots): every graph runs the LoRA kernels, each row on the slot in
  the static `lora_slots` buffer (-1: the base, and every padding row); swapping an adapter into
  a slot copies into the slot tensors, whose addresses stay, so the graphs stay valid.
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
                 buckets: list[int] | None = None, lora=None, pool=None) -> None:
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
        self.lora = lora  # LoRASlots or None
        self.lora_slots = (torch.full((max_rows,), -1, dtype=torch.int32, device=dev)
                           if lora is not None else None)  # [max_rows]: slot per row
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
            query_lens=[self.query_len] * bucket, seq_lens_list=[self.query_len] * bucket,
            lora=self._static_lora(bucket))

    def _static_lora(self, bucket: int):
        """The LoRA context the graph of `bucket` captures: per-row slots from the static
        buffer; the sequences (query_len rows each) are the SGMV segments."""
        if self.lora is None:
            return None
        from specdec.model.lora import LoRABatch
        rows = bucket * self.query_len
        if self.query_len == 1:
            return LoRABatch(self.lora, [], self.lora_slots[:rows])
        return LoRABatch(self.lora, [], self.lora_slots[:rows],
                         self.query_start_loc[:bucket + 1], self.query_len)

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
        if self.lora_slots is not None:
            self.lora_slots.fill_(-1)
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
        return (bool(self.graphs) and num_seqs > 0 and lora_fits(self.lora, batch.lora)
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
        bucket = self.stage(batch)
        self.graphs[bucket].replay()
        logits = self.outputs[bucket]  # [bucket * query_len, vocab]
        if logits is None:  # a tensor-parallel worker: the gathered logits are rank 0's
            return None
        return logits.index_select(0, batch.logits_indices.to(logits.device))

    def stage(self, batch: ForwardBatch) -> int:
        """Copy `batch` into the static buffers, pad to its bucket; returns the bucket.
        NOTE: no CUDA call of its own: the CPU tests run it on CPU buffers."""
        num_seqs = len(batch.query_lens)
        bucket = self.bucket_for(num_seqs)
        rows = num_seqs * self.query_len
        width = batch.block_tables.shape[1]
        if self.debug:
            assert self._buffer_pointers() == self._pointers, "static buffers were replaced"
        if self.lora_slots is not None:
            stage_lora_slots(self.lora_slots, batch.lora, rows, bucket * self.query_len)
        self.input_ids[:rows].copy_(batch.input_ids, non_blocking=True)
        self.positions[:rows].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:rows].copy_(batch.slot_mapping, non_blocking=True)
        self.block_tables[:num_seqs, :width].copy_(batch.block_tables, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(batch.seq_lens, non_blocking=True)
        if bucket > num_seqs:  # padding sequences: no KV writes, zero context
            self.slot_mapping[rows:bucket * self.query_len].fill_(-1)
            self.seq_lens[num_seqs:bucket].zero_()
        return bucket

    def _buffer_pointers(self) -> tuple[int, ...]:
        caches = [t for pair in self.kv_caches for t in pair]
        lora = []
        if self.lora is not None:
            lora = [self.lora_slots] + [t for per in self.lora.layers for a, bs in per.values()
                                        for t in (a, *bs)]
        return tuple(t.data_ptr() for t in (
            self.input_ids, self.positions, self.slot_mapping, self.block_tables,
            self.seq_lens, self.query_start_loc, self.logits_indices, *caches, *lora))


def capture_runners(model, kv_caches, query_lens: list[int], max_num_seqs: int,
                    max_blocks_per_seq: int, debug: bool = False, lora=None,
                    pool=None) -> tuple[dict, object]:
    """Capture one CudaGraphRunner per query length, in the given order, into one memory pool
    (`pool`, or a new one); returns ({query_len: runner}, the pool). Every tensor-parallel rank
    calls it with the same lengths in the same order."""
    runners = {}
    for q in query_lens:
        runner = CudaGraphRunner(model, kv_caches, q, max_num_seqs, max_blocks_per_seq, debug,
                                 lora=lora, pool=pool)
        runner.capture()
        pool = runner.pool
        runners[q] = runner
    return runners, pool


def pick_graphs(graph_runners: dict, batch: ForwardBatch) -> "CudaGraphRunner | None":
    """The captured runner (by query_len) that replays `batch`, or None: run it eagerly.
    Under tensor parallelism every rank decides by this rule over the same broadcast batch,
    so either all of them replay (their all-reduces captured in step) or none does."""
    if not graph_runners or not batch.query_lens:
        return None
    graphs = graph_runners.get(batch.query_lens[0])
    return graphs if graphs is not None and graphs.can_run(batch) else None


def lora_fits(graph_lora, batch_lora) -> bool:
    """Whether a batch's LoRA context can replay graphs captured with `graph_lora` (LoRASlots
    or None): a base-only batch always can; an adapter batch needs graphs captured with the
    same slots and a per-row slot tensor (the kernel path)."""
    if batch_lora is None:
        return True
    return (graph_lora is not None and batch_lora.slots is graph_lora
            and batch_lora.row_slots is not None)


def stage_lora_slots(static: Tensor, batch_lora, rows: int, padded_rows: int) -> None:
    """The per-row slots of a replay: the batch's rows (all -1 for a base-only batch), then -1
    for the bucket's padding rows."""
    if batch_lora is None:
        static[:padded_rows].fill_(-1)
        return
    static[:rows].copy_(batch_lora.row_slots, non_blocking=True)
    static[rows:padded_rows].fill_(-1)
