"""ModelRunner: turns ragged per-sequence token slices into one ForwardBatch and runs a model.

The target and the draft model each get a runner; both read the same `request.block_ids`
(one allocation covers both caches) but write their own KV tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specdec.model.llama import ForwardBatch, LlamaForCausalLM


@dataclass(slots=True)
class SeqSlice:
    """Tokens of one sequence to run this forward: positions start .. start + len(token_ids) - 1."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    num_logits: int  # logits for the last num_logits tokens of this slice (0: none)
    lora_slot: int = -1  # the adapter's resident slot (specdec.model.lora); -1: the base


class ModelRunner:
    """Owns one model and its paged KV cache; `execute` returns float32 logits rows."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int,
                 use_kernels: bool = True, parallel=None):
        self.model = model
        # A specdec.model.parallel_workers.TensorParallelDriver when `model` is rank 0's shard:
        # every forward then goes through it (it sends the step's input to the other ranks).
        self.parallel = parallel
        self.device = model.device
        # CUDA: the CuPy kernels, checked here so that a missing or unsupported kernel is a
        # start-up error rather than a silent torch fallback (device.kernels = "torch" opts out).
        self.use_kernels = use_kernels and self.device.type == "cuda"
        if self.use_kernels:
            from specdec.kernels import cupy as kernels
            kernels.require(model.head_dim, model.dtype)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches = model.make_kv_caches(num_blocks, block_size)
        if parallel is not None:
            parallel.allocate_kv(num_blocks, block_size)
        self.graph_runners: dict = {}  # query_len -> CudaGraphRunner
        self.lora = None  # a LoRAManager when adapters are enabled (target only)
        # Timing model for adaptive speculation: seconds = fixed + per_token * num_tokens.
        self.cost = CostModel()

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def build_batch(self, seqs: list[SeqSlice]) -> ForwardBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        max_blocks = max(len(s.block_ids) for s in seqs)
        block_tables = []
        for s in seqs:
            n = len(s.token_ids)
            offset = len(input_ids)
            input_ids.extend(s.token_ids)
            pos = range(s.start, s.start + n)
            positions.extend(pos)
            table = s.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            logits_indices.extend(range(offset + n - s.num_logits, offset + n))
            query_lens.append(n)
            seq_lens.append(s.start + n)
            query_start_loc.append(offset + n)
            block_tables.append(table + [0] * (max_blocks - len(table)))
        dev = self.device
        lora = None
        if self.lora is not None and any(s.lora_slot >= 0 for s in seqs):
            lora = self.lora.make_batch(
                [s.lora_slot for s in seqs for _ in range(len(s.token_ids))], dev)
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(block_tables, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=dev),
            logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=dev),
            query_lens=query_lens,
            seq_lens_list=seq_lens,
            use_kernels=self.use_kernels,
            lora=lora,
        )

    @torch.inference_mode()
    def execute(self, seqs: list[SeqSlice], observe: bool = False) -> torch.Tensor:
        """Run one forward; returns logits [sum num_logits, vocab] float32 on the CPU."""
        if not seqs:
            return torch.empty(0, self.vocab_size)
        for s in seqs:
            needed = -(-(s.start + len(s.token_ids)) // self.block_size)
            assert len(s.block_ids) >= needed, "scheduler allocated too few KV blocks"
        batch = self.build_batch(seqs)
        t0 = time.perf_counter()
        graphs = self.graph_runners.get(batch.query_lens[0])
        if graphs is not None and batch.lora is None and graphs.can_run(batch):
            logits = graphs.run(batch)
        else:
            logits = self._forward(batch)
        logits = logits.float().cpu()
        if observe:
            self.cost.observe(len(batch.query_lens), int(batch.input_ids.shape[0]),
                              time.perf_counter() - t0)
        return logits

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        if self.parallel is not None:
            return self.parallel.forward(batch, self.kv_caches)
        return self.model(batch, self.kv_caches)

    def capture_graphs(self, query_lens: list[int], max_num_seqs: int, max_model_len: int,
                       debug: bool = False) -> bool:
        """Capture CUDA graphs for uniform batches of each query length; False if unsupported."""
        from specdec.kernels.graphs import CudaGraphRunner
        model = self.model
        if not self.use_kernels:  # NOTE: the torch reference reads CPU lists: eager only
            return False
        max_blocks = -(-max_model_len // self.block_size)
        for q in query_lens:
            runner = CudaGraphRunner(model, self.kv_caches, q, max_num_seqs, max_blocks, debug)
            runner.capture()
            self.graph_runners[q] = runner
        return True

    @torch.inference_mode()
    def calibrate(self, token_counts: list[int], repeats: int = 2) -> None:
        """Time forwards of the given sizes (one sequence, KV writes skipped) to seed the cost model."""
        bs = self.block_size
        for n in token_counts:
            blocks = list(range(min(-(-n // bs), self.num_blocks)))
            if len(blocks) * bs < n:
                continue
            batch = self.build_batch([SeqSlice([0] * n, 0, blocks, 1)])
            batch.slot_mapping.fill_(-1)  # NOTE: timing only; never touch the real cache
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                self._forward(batch).float().cpu()
                if i:  # the first run is a warm-up
                    self.cost.observe(1, n, time.perf_counter() - t0)


class CostModel:
    """Forward time as a function of the number of tokens in the batch.

    Keeps an exponential moving average per token count (exact up to 64, then per power of two)
    and interpolates linearly between the counts it has seen; beyond the largest it extrapolates
    with the slope of the last two. `calibrate` seeds it at start-up; live steps refine it.
    """

    __slots__ = ("table", "decay")

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.table: dict[int, float] = {}

    @staticmethod
    def _bucket(num_tokens: int) -> int:
        return num_tokens if num_tokens <= 64 else 1 << (num_tokens - 1).bit_length()

    def observe(self, num_seqs: int, num_tokens: int, seconds: float) -> None:
        key = self._bucket(num_tokens)
        old = self.table.get(key)
        self.table[key] = seconds if old is None else old * self.decay + seconds * (1 - self.decay)

    @property
    def ready(self) -> bool:
        return len(self.table) >= 2

    def predict(self, num_tokens: int) -> float:
        if not self.table:
            return 0.0
        keys = sorted(self.table)
        x = float(num_tokens)
        if len(keys) == 1:
            return self.table[keys[0]] * max(x / keys[0], 1.0)
        if x <= keys[0]:
            return self.table[keys[0]]
        lo, hi = keys[-2], keys[-1]
        for a, b in zip(keys, keys[1:]):
            if a <= x <= b:
                lo, hi = a, b
                break
        y0, y1 = self.table[lo], self.table[hi]
        slope = max((y1 - y0) / (hi - lo), 0.0)
        return y0 + slope * (x - lo)
