"""The tensor-parallel processes: rank 0's driver and the worker processes it spawns.

Rank 0 is the serving process (scheduler, drafter, sampling, server); ranks 1..N-1 are its
child processes (torch.multiprocessing, spawn), started by `start_tensor_parallel`; no torchrun.
Each step rank 0 broadcasts the step's plain input (token ids, positions, slot mapping, block
tables, sequence lengths, query starts, logits rows) as one int64 tensor after a fixed 8-entry
header, and every rank runs the target forward over its own shard (specdec/model/parallel.py)
and its own KV-cache shard. Block ids are the same on every rank, so the scheduler's
bookkeeping does not change.

Two process groups: `meta` (gloo, on the CPU) carries the step header and input, with a long
group timeout because a worker waits there while the server is idle (the sender bounds its own
wait by `parallel.timeout_s`); `compute` (gloo on the CPU, NCCL on CUDA) carries the
all-reduces and the gather, with `parallel.timeout_s`.

Faults: a watchdog thread on rank 0 waits on the workers' process sentinels, and a worker that
exits while the engine runs makes the process exit 1 within a fraction of a second (after the
worker's own error, which it stores in the TCPStore, is logged). A collective that fails or
times out raises in the engine step (the server then exits 1). Each worker polls its parent
and exits when the parent is gone, so no orphan outlives a killed server. `close()` (also at
interpreter exit) stops the workers in order.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.connection
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from specdec.model.parallel import TensorParallel, load_sharded, shard_layout

logger = logging.getLogger("specdec.parallel")

# Header entries (int64): op, num_tokens, num_seqs, max_blocks, num_logits, use_kernels, a, b.
HEADER_LEN = 8
OP_FORWARD, OP_ALLOCATE, OP_SHUTDOWN, OP_CAPTURE = 1, 2, 3, 4
IDLE_TIMEOUT = timedelta(days=365)  # the meta group: a worker waits on it while the server idles
LOAD_TIMEOUT = timedelta(minutes=30)  # the first message waits for every rank's weights
PARENT_POLL_S = 0.2
EXIT_FAULT = 1


# ---------------------------------------------------------------------------------- step input

def pack_batch(batch) -> tuple[Tensor, Tensor]:
    """ForwardBatch -> (header [8] int64, payload [n] int64), both on the CPU."""
    num_seqs, max_blocks = batch.block_tables.shape
    header = torch.tensor([OP_FORWARD, batch.input_ids.shape[0], num_seqs, max_blocks,
                           batch.logits_indices.shape[0], int(batch.use_kernels), 0, 0],
                          dtype=torch.int64)
    payload = torch.cat([batch.input_ids.to("cpu", torch.int64),
                         batch.positions.to("cpu", torch.int64),
                         batch.slot_mapping.to("cpu", torch.int64),
                         batch.block_tables.to("cpu", torch.int64).reshape(-1),
                         batch.seq_lens.to("cpu", torch.int64),
                         batch.query_start_loc.to("cpu", torch.int64),
                         batch.logits_indices.to("cpu", torch.int64)])
    return header, payload


def payload_len(header: Tensor) -> int:
    _, tokens, seqs, blocks, logits = header[:5].tolist()
    return 3 * tokens + seqs * blocks + seqs + (seqs + 1) + logits


def unpack_batch(header: Tensor, payload: Tensor, device: torch.device):
    """The inverse of pack_batch, with the tensors on `device`."""
    from specdec.model.llama import ForwardBatch

    _, tokens, seqs, blocks, logits, use_kernels = header[:6].tolist()
    sizes = [tokens, tokens, tokens, seqs * blocks, seqs, seqs + 1, logits]
    ids, pos, slots, tables, seq_lens, qsl, rows = payload.split(sizes)
    query_lens = (qsl[1:] - qsl[:-1]).tolist()
    seq_lens_list = seq_lens.tolist()
    dev = device
    return ForwardBatch(
        input_ids=ids.to(dev), positions=pos.to(dev), slot_mapping=slots.to(dev),
        block_tables=tables.view(seqs, blocks).to(dev, torch.int32),
        seq_lens=seq_lens.to(dev, torch.int32), query_start_loc=qsl.to(dev, torch.int32),
        logits_indices=rows.to(dev), query_lens=query_lens, seq_lens_list=seq_lens_list,
        use_kernels=bool(use_kernels))


# ---------------------------------------------------------------------------------- processes

@dataclass(frozen=True, slots=True)
class WorkerArgs:
    """What a worker needs: the target's path, dtype and length, its device and threads."""

    rank: int
    world_size: int
    store_port: int
    model_path: str
    dtype: str
    max_model_len: int | None
    device: str  # this rank's device ("cpu" or "cuda:K")
    num_threads: int
    timeout_s: float
    use_kernels: bool = True  # CUDA: require the CuPy kernels (device.kernels = "cupy")


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the CPU, or the r-th CUDA device after the configured one."""
    if device.type != "cuda":
        return torch.device("cpu")
    index = (device.index or 0) + rank
    return torch.device("cuda", index)


def per_rank_threads(num_threads: int, world_size: int) -> int:
    """device.num_threads applies per rank; 0 (unset) shares the cores between the ranks."""
    return num_threads or max(1, (os.cpu_count() or 1) // world_size)


def _init_groups(rank: int, world_size: int, store, device: torch.device, timeout_s: float):
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=IDLE_TIMEOUT)
    backend = "nccl" if device.type == "cuda" else "gloo"
    return dist.new_group(list(range(world_size)), timeout=timedelta(seconds=timeout_s),
                          backend=backend)


def _load_shard(args: WorkerArgs, tp: TensorParallel, device: torch.device):
    from specdec.fetch import resolve_model_path
    from specdec.model.llama import LlamaForCausalLM
    from specdec.model.weights import load_config, parse_dtype

    path = resolve_model_path(args.model_path)
    model = LlamaForCausalLM(load_config(path), parse_dtype(args.dtype), device,
                             max_model_len=args.max_model_len, tp=tp)
    load_sharded(model, path)
    return model.eval()


def _watch_parent(parent_pid: int) -> None:
    """Worker side: exit as soon as the serving process is gone (no orphans)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(EXIT_FAULT)


def worker_main(args: WorkerArgs, parent_pid: int) -> None:
    """A worker's life: join the groups, load its shard, then run forwards until shutdown."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # NOTE: Ctrl-C reaches rank 0, which stops us
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    torch.set_num_threads(args.num_threads)
    store = dist.TCPStore("127.0.0.1", args.store_port, args.world_size, is_master=False,
                          timeout=timedelta(seconds=max(args.timeout_s, 60.0)))
    try:
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        group = _init_groups(args.rank, args.world_size, store, device, args.timeout_s)
        tp = TensorParallel(args.rank, args.world_size, group)
        model = _load_shard(args, tp, device)
        if device.type == "cuda" and args.use_kernels:
            # NOTE: as ModelRunner does on rank 0: a missing kernel fails the start, and the
            # kernels read this rank's head counts from the tensors' shapes
            from specdec.kernels import cupy as kernels
            kernels.require(model.head_dim, model.dtype)
        _serve_steps(model, device)
    except BaseException as exc:
        store.set(f"error/{args.rank}", f"{type(exc).__name__}: {exc}")
        raise
    dist.destroy_process_group()


def capture_header(query_lens: list[int], max_num_seqs: int,
                   max_blocks_per_seq: int) -> tuple[Tensor, Tensor]:
    """OP_CAPTURE: (header [8], payload = the query lengths in capture order) int64."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[:4] = torch.tensor([OP_CAPTURE, max_num_seqs, max_blocks_per_seq, len(query_lens)])
    return header, torch.tensor(query_lens, dtype=torch.int64)


@torch.inference_mode()
def _serve_steps(model, device: torch.device) -> None:
    from specdec.kernels.graphs import capture_runners, pick_graphs

    kv_caches = None
    graph_runners: dict = {}  # query_len -> CudaGraphRunner (CUDA, once OP_CAPTURE came)
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    while True:
        dist.broadcast(header, src=0)
        op = int(header[0])
        if op == OP_SHUTDOWN:
            return
        if op == OP_ALLOCATE:
            kv_caches = model.make_kv_caches(int(header[1]), int(header[2]))
            continue
        if op == OP_CAPTURE:
            query_lens = torch.empty(int(header[3]), dtype=torch.int64)
            dist.broadcast(query_lens, src=0)
            # the same lengths, buckets and order as rank 0's (ModelRunner.capture_graphs)
            graph_runners, _ = capture_runners(model, kv_caches, query_lens.tolist(),
                                               int(header[1]), int(header[2]))
            continue
        payload = torch.empty(payload_len(header), dtype=torch.int64)
        dist.broadcast(payload, src=0)
        batch = unpack_batch(header, payload, device)
        graphs = pick_graphs(graph_runners, batch)  # the rule rank 0 follows: same choice
        if graphs is not None:
            graphs.run(batch)
        else:
            model(batch, kv_caches)


class TensorParallelDriver:
    """Rank 0's side: the workers, the groups, and `forward` (broadcast, then the local shard).

    `broadcast_s` adds up the seconds spent sending step inputs; `tp.comm_s` those in the
    forward's collectives; `steps` counts forwards."""

    def __init__(self, world_size: int, device: torch.device, model_path: str, dtype: str,
                 max_model_len: int | None, num_threads: int, timeout_s: float,
                 use_kernels: bool = True) -> None:
        self.world_size = world_size
        self.device = rank_device(device, 0)
        self.timeout_s = timeout_s
        self.broadcast_s = 0.0
        self.steps = 0
        self._closing = False
        self._failed = False
        self._lock = threading.Lock()
        if device.type == "cuda" and torch.cuda.device_count() < (device.index or 0) + world_size:
            raise ValueError(f"parallel.tensor_parallel_size={world_size} needs "
                             f"{world_size} CUDA devices from {device}, "
                             f"{torch.cuda.device_count()} are visible")
        self.store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True,
                                   wait_for_workers=False,
                                   timeout=timedelta(seconds=max(timeout_s, 60.0)))
        ctx = torch.multiprocessing.get_context("spawn")
        self.workers = []
        for rank in range(1, world_size):
            args = WorkerArgs(rank, world_size, self.store.port, model_path, dtype,
                              max_model_len, str(rank_device(device, rank)), num_threads,
                              timeout_s, use_kernels)
            proc = ctx.Process(target=worker_main, args=(args, os.getpid()), daemon=True,
                               name=f"specdec-tp-worker-{rank}")
            proc.start()
            self.workers.append(proc)
        atexit.register(self.close)
        self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                          name="specdec-tp-watchdog")
        self._watchdog.start()
        self.tp: TensorParallel | None = None
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            group = _init_groups(0, world_size, self.store, self.device, timeout_s)
            self.tp = TensorParallel(0, world_size, group)
            self.model = _load_shard(WorkerArgs(0, world_size, self.store.port, model_path,
                                                dtype, max_model_len, str(self.device),
                                                num_threads, timeout_s), self.tp, self.device)
        except BaseException:
            self._failed = True  # NOTE: no half-started group or worker outlives a failed start
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.workers]

    def _watch(self) -> None:
        ready = multiprocessing.connection.wait([p.sentinel for p in self.workers])
        if self._closing:
            return
        dead = [p for p in self.workers if p.sentinel in ready]
        for proc in dead:  # NOTE: the sentinel closes a moment before the exit status exists
            proc.join(timeout=2.0)
        for proc in dead:
            rank = self.workers.index(proc) + 1
            try:
                error = self.store.get(f"error/{rank}").decode() if self.store.check(
                    [f"error/{rank}"]) else "no error recorded"
            except Exception:  # the store itself may be unreachable now
                error = "no error recorded"
            logger.critical("tensor-parallel worker rank %d (pid %d) exited with code %s "
                            "(%s); stopping", rank, proc.pid, proc.exitcode, error)
        for proc in self.workers:
            if proc.is_alive():
                proc.kill()
        logging.shutdown()
        os._exit(EXIT_FAULT)

    def _broadcast(self, header: Tensor, payload: Tensor | None = None,
                   timeout: timedelta | None = None) -> None:
        # NOTE: the meta group's own timeout is long (a worker waits there while the server
        # idles), so the sender bounds each wait by parallel.timeout_s itself.
        t0 = time.perf_counter()
        timeout = timeout or timedelta(seconds=self.timeout_s)
        try:
            dist.broadcast(header, src=0, async_op=True).wait(timeout)
            if payload is not None:
                dist.broadcast(payload, src=0, async_op=True).wait(timeout)
        except BaseException:
            self._failed = True
            raise
        self.broadcast_s += time.perf_counter() - t0

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        """Every worker allocates its KV shard with the same block count as rank 0 (the first
        message: a worker may still be loading its shard, so the wait is LOAD_TIMEOUT; a
        worker that dies meanwhile is caught by the watchdog)."""
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[:3] = torch.tensor([OP_ALLOCATE, num_blocks, block_size])
        with self._lock:
            self._broadcast(header, timeout=LOAD_TIMEOUT)

    def capture_graphs(self, query_lens: list[int], max_num_seqs: int,
                       max_blocks_per_seq: int) -> None:
        """Every worker captures CUDA graphs of these query lengths (in this order), while
        rank 0 captures the same ones (ModelRunner.capture_graphs): the warm-up forwards and
        the captures meet in their collectives."""
        header, payload = capture_header(query_lens, max_num_seqs, max_blocks_per_seq)
        with self._lock:
            self._broadcast(header, payload)

    def forward(self, batch, kv_caches, graphs=None) -> Tensor:
        """Send the step's input to every worker, run rank 0's shard (a replay of `graphs`,
        the runner pick_graphs chose, as every worker chooses it too); the gathered logits.
        NOTE: `tp.comm_s` times eager collectives only; a replay's run inside the graph."""
        header, payload = pack_batch(batch)
        with self._lock:
            self._broadcast(header, payload)
            self.steps += 1
            try:
                if graphs is not None:
                    return graphs.run(batch)
                return self.model(batch, kv_caches)
            except BaseException:
                self._failed = True  # the group is unusable now: close() kills the workers
                raise

    def comm_stats(self) -> dict:
        """Seconds in collectives so far: broadcast of inputs, the forward's all-reduces and
        gather, per step."""
        steps = max(self.steps, 1)
        return {"steps": self.steps, "broadcast_s": self.broadcast_s,
                "forward_comm_s": self.tp.comm_s,
                "per_step_ms": 1e3 * (self.broadcast_s + self.tp.comm_s) / steps}

    def close(self) -> None:
        """Stop the workers (a shutdown message, then join; kill after the timeout)."""
        if self._closing:
            return
        self._closing = True
        alive = [p for p in self.workers if p.is_alive()]
        if alive and len(alive) == len(self.workers) and not self._failed:
            try:
                header = torch.zeros(HEADER_LEN, dtype=torch.int64)
                header[0] = OP_SHUTDOWN
                if self._lock.acquire(timeout=self.timeout_s):
                    try:
                        self._broadcast(header)
                    finally:
                        self._lock.release()
            except Exception as exc:  # a broken group: fall through to kill
                logger.warning("tensor-parallel shutdown message failed: %s", exc)
        for proc in self.workers:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        if dist.is_initialized():
            dist.destroy_process_group()
        atexit.unregister(self.close)


def check_layout(path: str, world_size: int) -> None:
    """ValueError naming the sizes when the model does not split over `world_size` ranks,
    before any process starts."""
    from specdec.model.llama import _Arch
    from specdec.model.weights import load_config

    arch = _Arch.from_hf(load_config(path))
    for rank in range(world_size):
        shard_layout(arch, rank, world_size)


def start_tensor_parallel(config, device: torch.device) -> TensorParallelDriver:
    """Spawn the N-1 workers of `config.parallel.tensor_parallel_size` and load rank 0's shard."""
    from specdec.fetch import resolve_model_path

    par = config.parallel
    threads = per_rank_threads(config.device.num_threads, par.tensor_parallel_size)
    torch.set_num_threads(threads)
    # NOTE: resolved (fetched, verified) once here; the workers get the directory
    path = resolve_model_path(config.model.path, verify=True)
    check_layout(path, par.tensor_parallel_size)
    return TensorParallelDriver(par.tensor_parallel_size, device, path,
                                config.model.dtype, config.model.max_model_len, threads,
                                par.timeout_s, config.device.kernels == "cupy")
