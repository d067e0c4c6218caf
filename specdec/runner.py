"""ModelRunner: turns ragged per-sequence token slices into one ForwardBatch and runs a model.

The target and the draft model each get a runner; both read the same `request.block_ids`
(one allocation covers both caches) but write their own KV tensors.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.kernels.graphs import pick_graphs
from specdec.model.llama import ForwardBatch, LlamaForCausalLM


@dataclass(slots=True)
class SeqSlice:
    """Tokens of one sequence to run this forward: positions start .. start + len(token_ids) - 1."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    num_logits: int  # logits for the last num_logits tokens of this slice (0: none)
    lora_slot: int = -1  # the adapter's resident slot (specdec.model.lora); -1: the base
    # Masked rows in front of the window (see pad_windows): token 0, slot -1, no logits; they
    # see no key, so the real rows are unchanged.
    num_pad: int = 0


def graph_query_len(query_lens: list[int], captured) -> int | None:
    """The captured window length a ragged batch is padded to: the smallest one that holds
    its longest window; None if none does (the batch runs eager)."""
    longest = max(query_lens)
    fits = [q for q in captured if q >= longest]
    return min(fits) if fits else None


def pad_windows(seqs: list[SeqSlice], query_len: int) -> list[SeqSlice]:
    """Every window padded in front to `query_len` rows, so a ragged batch (adaptive k, a
    1-token and a 2-token draft catch-up) replays one uniform-length graph.

    NOTE: in front, not behind: a window's row i sits at position seq_len - query_len + i, so
    the real rows keep their positions and causal masks while the padding rows see no key
    (the kernels write zeros there). Their outputs are never read (no logits)."""
    out = []
    for s in seqs:
        n = len(s.token_ids)
        if n > query_len:
            raise ValueError(f"pad_windows: a window of {n} tokens does not fit query_len "
                             f"{query_len}")
        out.append(SeqSlice(s.token_ids, s.start, s.block_ids, s.num_logits, s.lora_slot,
                            query_len - n))
    return out


class ModelRunner:
    """Owns one model and its paged KV cache; `execute` returns float32 logits rows.

    NOTE: the logits stay on the model's device; the caller samples and verifies there and
    brings back token ids only. A batch's inputs go up in one copy (`upload`): every index
    tensor is a view of one packed int32 buffer, staged in pinned memory on CUDA.
    """

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
        # Window lengths that ragged batches are padded to (the captured graphs' query lens;
        # tests set it on the CPU, where the padded batch runs eager with the same result).
        self.pad_lengths: tuple[int, ...] = ()
        self.lora = None  # a LoRAManager when adapters are enabled (specdec.engine_lora)
        self.lora_default_slot = -1  # the slot of base tokens (the draft's spec.draft_lora: 0)
        # Timing model for adaptive speculation: seconds = fixed + per_token * num_tokens.
        self.cost = CostModel()
        self.num_uploads = 0  # host -> device input copies (one per forward; see upload)
        self._staging = StagingRing(self.device)

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
            table = s.block_ids
            if s.num_pad:
                input_ids.extend([0] * s.num_pad)
                positions.extend([s.start] * s.num_pad)  # any valid position; masked rows
                slots.extend([-1] * s.num_pad)
            input_ids.extend(s.token_ids)
            pos = range(s.start, s.start + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            rows = n + s.num_pad
            logits_indices.extend(range(offset + rows - s.num_logits, offset + rows))
            query_lens.append(rows)
            seq_lens.append(s.start + n)
            query_start_loc.append(offset + rows)
            block_tables.append(table + [0] * (max_blocks - len(table)))
        dev = self.device
        lora = None
        if self.lora is not None:  # NOTE: lora_slot -1 falls back to the runner's default
            seq_slots = [s.lora_slot if s.lora_slot >= 0 else self.lora_default_slot
                         for s in seqs]
            if any(slot >= 0 for slot in seq_slots):
                lora = self.lora.make_batch(  # padding rows take their window's slot
                    [slot for s, slot in zip(seqs, seq_slots)
                     for _ in range(len(s.token_ids) + s.num_pad)], dev,
                    self.use_kernels, query_lens)
        flat_tables = [b for table in block_tables for b in table]
        (input_ids_t, positions_t, slots_t, logits_t, tables_t, seq_lens_t,
         qsl_t) = self.upload([input_ids, positions, slots, logits_indices],
                              [flat_tables, seq_lens, query_start_loc])
        return ForwardBatch(
            input_ids=input_ids_t, positions=positions_t, slot_mapping=slots_t,
            block_tables=tables_t.view(len(seqs), max_blocks), seq_lens=seq_lens_t,
            query_start_loc=qsl_t, logits_indices=logits_t,
            query_lens=query_lens,
            seq_lens_list=seq_lens,
            use_kernels=self.use_kernels,
            lora=lora,
        )

    def upload(self, int64_lists: list[list[int]], int32_lists: list[list[int]]
               ) -> list[Tensor]:
        """Copy index lists to the device in ONE transfer; returns one 1-D view per list
        (int64 lists first, then int32), all into the same device buffer.

        Layout (int32 words): each int64 list as 2 words per entry, then the int32 lists. On
        CUDA the packed bytes are staged in a pinned buffer and copied with non_blocking=True;
        on the CPU the packed tensor itself is the batch (no copy at all)."""
        packed = bytearray(array("q", [v for lst in int64_lists for v in lst]).tobytes())
        packed += array("i", [v for lst in int32_lists for v in lst]).tobytes()
        host = torch.frombuffer(packed, dtype=torch.int32) if packed else \
            torch.empty(0, dtype=torch.int32)
        device_buf = self._staging.to_device(host)  # [num_words] int32
        self.num_uploads += 1
        views, word = [], 0
        for lst in int64_lists:
            views.append(device_buf[word:word + 2 * len(lst)].view(torch.int64))
            word += 2 * len(lst)
        for lst in int32_lists:
            views.append(device_buf[word:word + len(lst)])
            word += len(lst)
        return views

    @torch.inference_mode()
    def execute(self, seqs: list[SeqSlice], observe: bool = False,
                input_ids: Tensor | None = None) -> torch.Tensor:
        """Run one forward; returns logits [sum num_logits, vocab] float32 on the device.

        `input_ids`: [len(seqs)] device token ids for one-token windows, replacing the
        placeholders in seqs (the draft loop feeds its last tokens without a host read)."""
        if not seqs:
            return torch.empty(0, self.vocab_size, device=self.device)
        for s in seqs:
            needed = -(-(s.start + len(s.token_ids)) // self.block_size)
            assert len(s.block_ids) >= needed, "scheduler allocated too few KV blocks"
        num_tokens = sum(len(s.token_ids) for s in seqs)
        if self.pad_lengths and self.lora is None:
            query_len = graph_query_len([len(s.token_ids) for s in seqs], self.pad_lengths)
            if query_len is not None:
                seqs = pad_windows(seqs, query_len)
        batch = self.build_batch(seqs)
        if input_ids is not None:
            if batch.input_ids.shape[0] != input_ids.shape[0] or any(
                    len(s.token_ids) != 1 or s.num_pad for s in seqs):
                raise ValueError(f"input_ids ({input_ids.shape[0]}) replace one token per "
                                 f"one-token window; got windows {batch.query_lens[:8]}")
            batch.input_ids.copy_(input_ids)
        timer = StepTimer(self.device) if observe else None
        logits = self._forward(batch).float()
        if timer is not None:
            # NOTE: on CUDA the time is read later from events (no sync here); see CostModel.
            self.cost.observe_timer(len(batch.query_lens), num_tokens, timer.stop())
        return logits

    def _forward(self, batch) -> Tensor:
        """The TP ranks together, a captured graph when one fits the batch, else the eager
        model."""
        graphs = pick_graphs(self.graph_runners, batch)  # can_run checks LoRA fits
        if self.parallel is not None:
            return self.parallel.forward(batch, self.kv_caches, graphs)
        if graphs is not None:
            return graphs.run(batch)
        return self.model(batch, self.kv_caches)

    def capture_graphs(self, query_lens: list[int], max_num_seqs: int, max_model_len: int,
                       debug: bool = False, pool=None) -> bool:
        """Capture CUDA graphs for uniform batches of each query length; False if unsupported.
        Ragged batches are then padded to the next captured length (`pad_windows`). `pool`: a
        graph memory pool shared with other runners (torch.cuda.graph_pool_handle())."""
        from specdec.kernels.graphs import capture_runners
        if not self.use_kernels:  # NOTE: the torch reference reads CPU lists: eager only
            return False
        max_blocks = -(-max_model_len // self.block_size)
        lengths = sorted(query_lens, reverse=True)  # NOTE: largest first into the shared pool
        if self.parallel is not None:  # the workers capture the same graphs alongside
            self.parallel.capture_graphs(lengths, max_num_seqs, max_blocks)
        runners, _ = capture_runners(self.model, self.kv_caches, lengths, max_num_seqs,
                                     max_blocks, debug,
                                     lora=self.lora.slots if self.lora is not None else None,
                                     pool=pool)
        self.graph_runners.update(runners)
        self.pad_lengths = tuple(sorted(self.graph_runners))
        return True

    @torch.inference_mode()
    def calibrate(self, token_counts: list[int], repeats: int = 2) -> float:
        """Time forwards of the given sizes (one sequence, KV writes skipped) to seed the cost
        model with the fastest of `repeats` timings each. Sizes with a captured graph are timed
        on graph replays (what live steps run).

        On the CPU a timing counts only if the calling thread ran for at least QUIET_SHARE
        of it (its CPU time over the wall time: other jobs on the cores preempt it); a busy
        one is timed again, up to BUSY_RETRIES more times. Returns the lowest share among the
        timings kept (1.0 on a GPU, or under tensor parallelism): below QUIET_SHARE, the
        tables are inflated by other jobs and should not be cached."""
        bs = self.block_size
        lowest = 1.0
        # NOTE: not under tensor parallelism, where rank 0's thread sleeps in collectives
        timed_by_cpu = self.device.type == "cpu" and getattr(self.model, "tp", None) is None
        for n in token_counts:
            blocks = list(range(min(-(-n // bs), self.num_blocks)))
            if len(blocks) * bs < n:
                continue
            batch = self.build_batch([SeqSlice([0] * n, 0, blocks, 1)])
            batch.slot_mapping.fill_(-1)  # NOTE: timing only; never touch the real cache
            self._forward(batch)  # warm-up
            quiet, busy = [], []
            for _ in range(repeats + BUSY_RETRIES):
                cpu = time.thread_time()
                timer = StepTimer(self.device)
                self._forward(batch)
                seconds = timer.stop().seconds(wait=True)
                share = ((time.thread_time() - cpu) / max(seconds, 1e-9)
                         if timed_by_cpu else 1.0)
                (quiet if share >= QUIET_SHARE else busy).append((seconds, share))
                if len(quiet) == repeats:
                    break
            seconds, share = min(quiet or busy)
            lowest = min(lowest, 1.0 if quiet else share)
            self.cost.observe(1, n, seconds)
        return lowest


# A CPU timing is quiet when the calling thread ran for at least this share of its wall time.
# NOTE: measured on the 2-core dev VM, 2 threads, the Qwen int4 pair: 0.94-1.0 with nothing
# else running (the thread works on tiles, or yields while it waits for the helper), 0.40-0.62
# beside two busy processes, when a 1-row target forward took up to 290 ms instead of 25, and
# a calibration cached then (a draft forward at 102 ms) held k at 0 on every later start.
QUIET_SHARE = 0.8
BUSY_RETRIES = 4  # timings beyond `repeats` before a busy machine's fastest is kept


class StagingRing:
    """Pinned host buffers for the per-forward upload (CUDA), reused round-robin.

    NOTE: a buffer is rewritten only after the copy that last read it has finished (an event
    recorded after the copy); with one host sync per step that wait is already over."""

    def __init__(self, device: torch.device, num_buffers: int = 2):
        self.device = device
        self.buffers: list[Tensor | None] = [None] * num_buffers
        self.events: list = [None] * num_buffers
        self.next = 0

    def to_device(self, host: Tensor) -> Tensor:
        if self.device.type != "cuda":
            return host if self.device.type == "cpu" else host.to(self.device)
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        if self.events[i] is not None:
            self.events[i].synchronize()
        buf = self.buffers[i]
        if buf is None or buf.numel() < host.numel():
            buf = torch.empty(max(host.numel(), 4096), dtype=torch.int32, pin_memory=True)
            self.buffers[i] = buf
        staged = buf[:host.numel()]
        staged.copy_(host)
        out = staged.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.events[i] = event
        return out


class StepTimer:
    """Wall time of a forward: perf_counter on the CPU, CUDA events on the GPU (read later,
    so timing a live step adds no sync)."""

    __slots__ = ("start", "end", "t0", "t1")

    def __init__(self, device: torch.device):
        self.start = self.end = None
        self.t1 = None
        if device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0 = time.perf_counter()

    def stop(self) -> "StepTimer":
        if self.end is not None:
            self.end.record()
        else:
            self.t1 = time.perf_counter()
        return self

    def done(self) -> bool:
        return self.end is None or self.end.query()

    def seconds(self, wait: bool = False) -> float:
        if self.end is None:
            return self.t1 - self.t0
        if wait:
            self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000.0


class CostModel:
    """Forward time as a function of the number of tokens in the batch.

    Keeps an exponential moving average per token count (exact up to 64, then per power of two)
    and interpolates linearly between the counts it has seen; beyond the largest it extrapolates
    with the slope of the last two. `calibrate` seeds it at start-up; live steps refine it.
    """

    __slots__ = ("table", "decay", "pending")

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.table: dict[int, float] = {}
        self.pending: list = []  # (num_seqs, num_tokens, StepTimer) not yet finished (CUDA)

    @staticmethod
    def _bucket(num_tokens: int) -> int:
        return num_tokens if num_tokens <= 64 else 1 << (num_tokens - 1).bit_length()

    def observe(self, num_seqs: int, num_tokens: int, seconds: float) -> None:
        key = self._bucket(num_tokens)
        old = self.table.get(key)
        self.table[key] = seconds if old is None else old * self.decay + seconds * (1 - self.decay)

    def observe_timer(self, num_seqs: int, num_tokens: int, timer: "StepTimer") -> None:
        """Record a forward timed by `timer`; CUDA timings are read once their events are done."""
        self.pending.append((num_seqs, num_tokens, timer))
        self._drain()

    def _drain(self) -> None:
        left = []
        for num_seqs, num_tokens, timer in self.pending:
            if timer.done():
                self.observe(num_seqs, num_tokens, timer.seconds())
            else:
                left.append((num_seqs, num_tokens, timer))
        self.pending = left[-64:]  # NOTE: bounded, should the reader never catch up

    @property
    def ready(self) -> bool:
        self._drain()
        return len(self.table) >= 2

    def predict(self, num_tokens: int) -> float:
        self._drain()
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
