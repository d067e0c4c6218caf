"""Engine.step(): schedule -> draft -> verify -> accept/reject -> update; and the offline LLM API.

One step, for all running requests at once:
1. the speculation controller picks k per decoding request; the scheduler fills the token budget
   (prefill chunks, one position per decode plus its k draft slots) and allocates KV blocks;
2. the drafter proposes up to k tokens per decoding request;
3. one target forward over every request's window: prefill chunks and [last token, d1..dk];
4. greedy requests keep the longest prefix equal to the target's argmax, sampled requests use
   exact rejection sampling on the processed distributions; then one bonus/recovered token;
5. stop checks and detokenization trim the new tokens; the scheduler's update moves
   num_computed_tokens past the verified positions only (rollback is bookkeeping).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from specdec.spec.adaptive import SpeculationController
from specdec.core.config import Config, ConfigError, check_device
from specdec.core.kv_budget import auto_num_blocks, short_pool_message
from specdec.spec.drafters import DraftModelDrafter, NgramDrafter, Proposal
from specdec.core.detokenizer import IncrementalDetokenizer
from specdec.spec.rejection import (draft_uniforms, greedy_verify_device,
                                    rejection_sample_device, unpack_verified)
from specdec.core.request import Request, RequestStatus, SamplingParams
import specdec.runner
from specdec.runner import ModelRunner, SeqSlice
from specdec.sample.grammar import (GrammarCompiler, GrammarMatcher, allowed_token_ids,
                                    apply_token_bitmask_, new_bitmask)
from specdec.sample.sampling import (RowState, build_request_constants, compute_logprobs,
                                     compute_probs, process_logits)
from specdec.core.scheduler import Scheduler
from specdec.fetch import resolve_model_path
from specdec.model.weights import load_model, load_tokenizer
from specdec.generation_config import (eos_token_ids, load_generation_config,
                                       sampling_defaults, split_special_stops)

logger = logging.getLogger("specdec.engine")


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_forced_tokens: int = 0  # accepted drafts the grammar forced (one-hot, no draft forward)

    @property
    def acceptance_length(self) -> float:
        """vLLM's mean acceptance length: 1 + accepted / drafts (1.0 without speculation)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Per token: (logprob of the chosen token, [(token id, logprob), ...] top-N); None if off.
    logprobs: list | None = None
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list | None = None  # set once, on the first output, when asked for


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks_total: int
    num_blocks_free: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    spec_num_drafts: int
    spec_num_draft_tokens: int
    spec_num_accepted_tokens: int
    spec_accepted_per_pos: list[int]
    spec_num_forced_tokens: int = 0
    spec_num_lookup_tokens: int = 0  # accepted drafts that came from prompt lookup (draft model)
    spec_mean_k: float = 0.0  # mean draft length chosen for the running decodes
    lora_info: object = None  # specdec.engine_lora.LoRAInfo when LoRA is enabled


@dataclass(slots=True)
class _Tracked:
    """Engine-side state of one request: its detokenizer and what was already reported."""

    request: Request
    detokenizer: IncrementalDetokenizer
    stop_token_ids: frozenset[int]
    text: str = ""
    logprobs: list | None = None
    matcher: GrammarMatcher | None = None  # structured output: advances with verified tokens
    num_forced_tokens: int = 0
    # prompt_logprobs: entry j is prompt token j's (logprob, top-N); entry 0 is None.
    prompt_logprobs: list | None = None


def memory_usage() -> dict:
    """This process's resident memory now and at its peak, in MB (Linux /proc)."""
    usage = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name = "rss_mb" if line.startswith("VmRSS") else "peak_rss_mb"
                    usage[name] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return usage


def weight_loads(config: Config) -> dict[str, dict | None]:
    """The load_model() arguments (but the device) of the target and of the draft model
    (None without one): `specdec fetch --config` packs the same quantized weights ahead."""
    spec = config.spec
    draft = None
    if spec.enabled and spec.method == "draft":
        # NOTE: high_bits="int4": an int4 draft from a GGUF keeps even its Q6_K / Q8_0
        # modules (the 0.5B's output) at 4 bits: a cheaper step; it moves acceptance only.
        draft = {"path": spec.draft_model, "dtype": spec.draft_dtype or config.model.dtype,
                 "quantization": spec.draft_quantization, "high_bits": "int4"}
    return {"target": {"path": config.model.path, "dtype": config.model.dtype,
                       "quantization": config.model.quantization,
                       "high_bits": config.model.gguf_high_bits},
            "draft": draft}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    """Owns the models, their KV caches, the scheduler and the drafter. Not thread-safe."""

    def __init__(self, config: Config, defer_startup_work: bool = False):
        """`defer_startup_work` (the server): start without the work a request does not need
        first, and leave it to `run_idle_work()` between requests: the adaptive calibration
        when none is cached (k stays conservative until it is measured) and the grammar
        tokenizer for structured outputs."""
        started = time.perf_counter()
        self.config = config
        # Deferred start-up work, run piece by piece by run_idle_work(): callables returning
        # nothing; the calibration adds one piece per forward size it still has to time.
        self._idle_work: list = []
        # What the start cost: seconds since the start at each stage, calibration, memory.
        self.startup: dict = {}
        dev = config.device
        if dev.num_threads:
            torch.set_num_threads(dev.num_threads)
        torch.manual_seed(dev.seed)
        self.device = resolve_device(dev.device)
        check_device(config, self.device.type)  # e.g. an int4 draft on CUDA: fail at start-up
        use_kernels = dev.kernels == "cupy"
        if self.device.type == "cuda" and use_kernels:
            from specdec.kernels import cupy as kernels
            kernels.require(128, torch.float32)  # fail before loading any weights
        target_path = resolve_model_path(config.model.path, verify=True)
        self.tokenizer = load_tokenizer(target_path)
        self.startup["tokenizer_s"] = round(time.perf_counter() - started, 3)
        self.parallel = None  # TensorParallelDriver: the target's other ranks (TP > 1)
        if config.parallel.tensor_parallel_size > 1:
            from specdec.model.parallel_workers import start_tensor_parallel
            self.parallel = start_tensor_parallel(config, self.device)
            target = self.parallel.model  # rank 0's shard
        else:
            target = load_model(**{**weight_loads(config)["target"], "path": target_path},
                                device=str(self.device))
        self.startup["target_s"] = round(time.perf_counter() - started, 3)
        self.vocab_size = target.vocab_size
        self.model_name = config.server.served_model_name or os.path.basename(
            os.path.normpath(config.model.path))
        spec = config.spec
        draft = None
        if spec.enabled and spec.method == "draft":
            draft = load_model(device=str(self.device), **weight_loads(config)["draft"])
            if draft.vocab_size != target.vocab_size:
                self._pad_vocabularies(target, draft)
            if spec.draft_vocab_size is not None:
                if spec.draft_vocab_size > draft.num_real_tokens:
                    raise ConfigError(f"spec.draft_vocab_size must be at most the draft's "
                                      f"vocabulary ({draft.num_real_tokens}), got "
                                      f"{spec.draft_vocab_size}")
                try:
                    draft.prune_head(spec.draft_vocab_size)
                except ValueError as e:  # e.g. an int4 head keeps whole tiles of 16 rows
                    raise ConfigError(f"spec.draft_vocab_size={spec.draft_vocab_size}: "
                                      f"{e}") from e
            self.startup["draft_s"] = round(time.perf_counter() - started, 3)
            if spec.draft_quantization:  # "cache": packed tensors reused; "source": quantized now
                self.startup["draft_quantized_from"] = getattr(draft, "quantized_from", None)
        self.max_model_len = self._max_model_len(target, draft)
        block_size = config.cache.block_size
        self.num_blocks = config.cache.num_blocks or self._auto_num_blocks(target, draft)
        if config.cache.num_blocks:
            short = short_pool_message(self.num_blocks, block_size, self.max_model_len)
            if short:
                logger.warning("%s", short)
        self.target_runner = ModelRunner(target, self.num_blocks, block_size, use_kernels,
                                         parallel=self.parallel)
        self.draft_runner = (ModelRunner(draft, self.num_blocks, block_size, use_kernels)
                             if draft else None)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.num_blocks,
                                   self.max_model_len)
        self.lora = None  # LoRAManager of request adapters (target only; the draft: spec.draft_lora)
        if config.lora.active:
            from specdec.engine_lora import make_lora_manager
            self.lora = make_lora_manager(config.lora, target, self.target_runner,
                                          self.scheduler)
        if spec.draft_lora and self.draft_runner is not None:  # before any graph capture
            from specdec.engine_lora import make_draft_lora
            make_draft_lora(spec.draft_lora, draft, self.draft_runner)
        self.drafter = None
        if spec.enabled:
            lookup = NgramDrafter(spec.ngram_min, spec.ngram_max)
            self.drafter = (DraftModelDrafter(self.draft_runner,
                                              config.scheduler.max_num_batched_tokens,
                                              lookup if spec.prompt_lookup else None,
                                              spec.prompt_lookup_min)
                            if draft is not None else lookup)
        self.k_max = spec.num_speculative_tokens if spec.enabled else 0
        self.controller = SpeculationController(
            self.k_max, spec.adaptive, self.target_runner.cost,
            self.draft_runner.cost if self.draft_runner else None, self.max_model_len)
        self.cuda_graphs = False
        # NOTE: under tensor parallelism the workers capture the target's graphs in step with
        # rank 0 (ModelRunner.capture_graphs; NCCL captures the all-reduces).
        if self.device.type == "cuda" and dev.cuda_graphs:
            # The verify window is [last, d1..dk] for any k the controller may pick.
            max_seqs = config.scheduler.max_num_seqs
            pool = torch.cuda.graph_pool_handle()  # one pool for every runner and bucket
            self.cuda_graphs = self.target_runner.capture_graphs(
                list(range(1, self.k_max + 2)), max_seqs, self.max_model_len, pool=pool)
            if self.draft_runner is not None and self.cuda_graphs:
                # Draft step 0 catches up 1 token (after a rejection) or 2 (after full
                # acceptance): a q=2 graph, with 1-token windows padded to it.
                self.draft_runner.capture_graphs([1, 2], max_seqs, self.max_model_len,
                                                 pool=pool)
        gen_config = load_generation_config(target_path)
        self.eos_token_ids = eos_token_ids(self.tokenizer, gen_config)
        # Sampling defaults a request inherits when it omits a field (generation_config).
        self.generation_defaults = (sampling_defaults(gen_config)
                                    if config.model.generation_config == "auto" else {})
        self.grammar_compiler = GrammarCompiler(self.tokenizer, self.vocab_size,
                                                self.eos_token_ids)
        # NOTE: built before the first structured request (about a second for a 150k
        # vocabulary), which would otherwise stall every stream in the batch: now, or (server)
        # as the first idle work after the start.
        if defer_startup_work:
            self._idle_work.append(self.grammar_compiler.prepare)
        else:
            self.grammar_compiler.prepare()
        self.tracked: dict[str, _Tracked] = {}
        self.counters = dict(prompt_tokens=0, generation_tokens=0, drafts=0, draft_tokens=0,
                             accepted_tokens=0, forced_tokens=0, lookup_tokens=0)
        self.accepted_per_pos = [0] * max(self.k_max, 1)
        self._forced_now: set[str] = set()  # this step's requests whose drafts are forced
        self._forced_pos: dict[str, tuple[int, ...]] = {}  # this step's forced draft indices
        # this step's proposals that end in prompt-lookup drafts: how many the model drafted
        self._model_drafts: dict[str, int] = {}
        self.startup["load_s"] = round(time.perf_counter() - started, 3)
        self.startup["calibration"] = "off"
        if self.k_max and spec.adaptive:
            self._calibrate(background=defer_startup_work)
        self.startup["start_s"] = round(time.perf_counter() - started, 3)
        self.startup.update(memory_usage())

    @classmethod
    def from_config(cls, config: Config, defer_startup_work: bool = False) -> "Engine":
        return cls(config, defer_startup_work)

    # ---- deferred start-up work -----------------------------------------------------------

    @property
    def has_idle_work(self) -> bool:
        return bool(self._idle_work)

    def run_idle_work(self) -> bool:
        """Run one piece of the deferred start-up work (at most one calibration forward size,
        about a second on the dev VM); call only between steps, with nothing else running on
        the models. Returns True while more remains."""
        if self._idle_work:
            self._idle_work.pop(0)()
        return bool(self._idle_work)

    def close(self) -> None:
        """Stop the tensor-parallel workers (also done at interpreter exit); a no-op at TP 1."""
        if self.parallel is not None:
            self.parallel.close()

    # ---- set-up helpers -------------------------------------------------------------------

    def _max_model_len(self, target, draft) -> int:
        """The configured length, capped by every loaded model's context (the draft's too: it
        runs over the same positions, and its rotary table ends at its own limit)."""
        limits = [("model.max_model_len", self.config.model.max_model_len)]
        for name, model in (("target", target), ("draft", draft)):
            hf_max = getattr(model.config, "max_position_embeddings", None) if model else None
            if hf_max:
                limits.append((f"the {name}'s max_position_embeddings", int(hf_max)))
        source, value = min(limits, key=lambda item: item[1])
        logger.info("max_model_len = %d (set by %s; limits: %s)", value, source,
                    ", ".join(f"{n} {v}" for n, v in limits))
        return value

    def _pad_vocabularies(self, target, draft) -> None:
        """Same tokenizer, embedding tables padded to different sizes (Qwen2.5-7B has 152064
        rows, 0.5B 151936): pad the smaller model's vocabulary to the larger (as vLLM does);
        its padded rows embed to zero and their logits are -inf, so they are never sampled."""
        draft_tokenizer = load_tokenizer(self.config.spec.draft_model)
        if draft_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"spec.draft_model vocabulary ({draft.vocab_size}) differs from "
                             f"the target's ({target.vocab_size}) and so does its tokenizer; "
                             f"they must share a tokenizer")
        vocab_size = max(target.vocab_size, draft.vocab_size)
        for name, model in (("target", target), ("draft", draft)):
            if model.vocab_size < vocab_size:
                logger.info("padding the %s's vocabulary from %d to %d rows (masked)", name,
                            model.vocab_size, vocab_size)
                model.pad_vocab(vocab_size)

    def _auto_num_blocks(self, target, draft) -> int:
        bs = self.config.cache.block_size
        per_block = target.kv_bytes_per_block(bs) + (draft.kv_bytes_per_block(bs) if draft else 0)
        return auto_num_blocks(self.config.cache.memory_gb, per_block, bs,
                               self.config.scheduler.max_num_seqs, self.max_model_len)

    def _calibrate(self, background: bool = False) -> None:
        """Seed the cost tables: from the calibration cache when this machine, these models
        and this thread count were measured before, else by timing forwards (then saved).
        `background`: when nothing is cached, time the forwards later, one size per
        run_idle_work(); until then the controller plans a conservative k."""
        from specdec.spec import calibration

        k = self.k_max
        counts = {"target": sorted({1, 2, k + 1, 2 * (k + 1)})}
        runners = {"target": self.target_runner}
        models = {"target": {"path": resolve_model_path(self.config.model.path),
                             "dtype": self.config.model.dtype,
                             "quantization": self.config.model.quantization,
                             "tensor_parallel_size": self.config.parallel.tensor_parallel_size}}
        if self.draft_runner is not None:
            spec = self.config.spec
            # NOTE: the larger sizes price catch-up (a new request's prompt, or the tokens a
            # request missed while held at k = 0); a forward of 256 tokens is compute-bound.
            counts["draft"] = [1, 2, 4, 16, 64, 256]
            runners["draft"] = self.draft_runner
            models["draft"] = {"path": resolve_model_path(spec.draft_model),
                               "dtype": spec.draft_dtype or self.config.model.dtype,
                               "quantization": spec.draft_quantization}
        t0 = time.perf_counter()
        key = calibration.calibration_key(self.device, models, counts,
                                          self.config.cache.block_size)
        tables = calibration.load(key)
        if tables is not None and set(tables) == set(runners):
            for role, runner in runners.items():
                runner.cost.table.update(tables[role])
            self.startup["calibration"] = "cached"
        elif background:
            self.controller.calibrating = True
            self.startup["calibration"] = "running in background"
            shares: list[float] = []
            for role, runner in runners.items():
                for n in counts[role]:
                    self._idle_work.append(
                        lambda runner=runner, n=n: shares.append(runner.calibrate([n])))
            self._idle_work.append(lambda: self._calibrated_in_background(
                key, runners, t0, min(shares, default=1.0)))
            logger.info("calibration: running in background (no cached calibration; k <= %d "
                        "until it is measured)", self.controller.conservative_k)
            return
        else:
            share = min(runner.calibrate(counts[role]) for role, runner in runners.items())
            self.startup["calibration"] = self._save_calibration(key, runners, share, "measured")
        self.startup["calibration_s"] = round(time.perf_counter() - t0, 3)
        logger.info("calibration: %s in %.2f s (%d threads)", self.startup["calibration"],
                    self.startup["calibration_s"], torch.get_num_threads())

    @staticmethod
    def _save_calibration(key: dict, runners: dict, share: float, how: str) -> str:
        """Cache the measured tables, unless other jobs held the cores meanwhile (`share`
        below specdec.runner's QUIET_SHARE): a table timed then would mislead the controller
        on every later start. Returns what startup["calibration"] says."""
        from specdec.spec import calibration

        quiet = specdec.runner.QUIET_SHARE
        if share < quiet:
            logger.warning("calibration: %s while the CPU was busy (other jobs left the engine "
                           "thread %.0f %% of the time, below %.0f %%): not cached, a later "
                           "start measures again", how, 100 * share, 100 * quiet)
            return f"{how} on a busy CPU (not saved)"
        saved = calibration.save(key, {role: dict(r.cost.table) for role, r in runners.items()})
        return how if saved else f"{how} (not saved)"

    def _calibrated_in_background(self, key: dict, runners: dict, t0: float,
                                  share: float) -> None:
        self.controller.calibrating = False
        self.startup["calibration"] = self._save_calibration(key, runners, share,
                                                             "measured in background")
        self.startup["calibration_s"] = round(time.perf_counter() - t0, 3)
        logger.info("calibration: %s, %.2f s after the start (%d threads); adaptive k from now",
                    self.startup["calibration"], self.startup["calibration_s"],
                    torch.get_num_threads())

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, priority: int = 0,
                    lora_request=None) -> None:
        """`lora_request`: an adapter name, a specdec.model.lora.LoRARequest (registered on
        first use) or None (the base model)."""
        if request_id in self.tracked:
            raise ValueError(f"request_id {request_id!r} is already in use")
        lora = None
        if lora_request is not None:
            from specdec.engine_lora import resolve_lora
            lora = resolve_lora(self.lora, lora_request)
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self.tokenizer(prompt).input_ids
        elif not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt must be a string or a list of token ids, got "
                             f"{type(prompt).__name__}")
        else:
            prompt_text, prompt_ids = None, list(prompt)
        if not prompt_ids:
            raise ValueError("prompt must not be empty")
        for t in prompt_ids:
            if not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt contains token id {t!r} outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"input_tokens: the prompt has {len(prompt_ids)} tokens, which "
                             f"leaves no room to generate within max_model_len "
                             f"{self.max_model_len}")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=room,
                                         min_tokens=min(params.min_tokens, room))
        elif params.max_tokens > room:
            raise ValueError(f"input_tokens: prompt ({len(prompt_ids)} tokens) + max_tokens "
                             f"({params.max_tokens}) = {len(prompt_ids) + params.max_tokens} "
                             f"exceeds max_model_len {self.max_model_len}")
        if params.stop:
            stop, special_ids = split_special_stops(params.stop, self.tokenizer)
            if special_ids:
                params = dataclasses.replace(params, stop=stop, stop_token_ids=list(dict.fromkeys(
                    [*params.stop_token_ids, *special_ids])))
        # NOTE: every EOS id (tokenizer + generation_config) so min_tokens masks all of them.
        eos = frozenset(self.eos_token_ids) if self.eos_token_ids else None
        req = Request(request_id, prompt_ids, params, eos_token_id=eos,
                      arrival_time=arrival_time or time.monotonic(), prompt=prompt_text,
                      priority=priority)
        if lora is not None:
            req.lora_name, req.lora_int_id = lora.lora_name, lora.lora_int_id
        matcher = None
        if params.structured_output is not None:  # ValueError naming its parameter
            matcher = self.grammar_compiler.matcher(params.structured_output)
        # Validates logit_bias ids; built once, used by every row of every step.
        req.sampling_constants = build_request_constants(params, eos, self.vocab_size)
        self.scheduler.add_request(req)  # raises ValueError if it can never fit
        try:
            stop_ids = set(params.stop_token_ids)
            if not params.ignore_eos:
                stop_ids.update(self.eos_token_ids)
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                           params.skip_special_tokens, params.stop,
                                           params.include_stop_str_in_output,
                                           min_tokens=params.min_tokens)
            self.tracked[request_id] = _Tracked(
                req, detok, frozenset(stop_ids),
                logprobs=[] if params.logprobs is not None else None, matcher=matcher,
                prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        except BaseException:
            # NOTE: atomic: a request the scheduler accepted must not outlive a failure here
            # (the next step would find it scheduled but untracked).
            self.tracked.pop(request_id, None)
            self.scheduler.abort_request(request_id)
            self.controller.forget(request_id)
            raise
        self.counters["prompt_tokens"] += len(prompt_ids)

    def abort_request(self, request_id: str) -> None:
        if self.tracked.pop(request_id, None) is not None:
            self.scheduler.abort_request(request_id)
            self.controller.forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.tracked)

    # ---- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.lora is not None and self.lora.failed:
            return self._fail_unreadable_adapters()
        decodes = [r for r in self.scheduler.running if not r.is_prefill]
        self.controller.choose(decodes)
        self._forced_now.clear()
        self._forced_pos.clear()
        self._model_drafts.clear()
        forced = self._forced_drafts(decodes)
        output = self.scheduler.schedule()
        if not output.scheduled:
            return []
        now = time.monotonic()
        wanted = [(s.request, s.num_lookahead_tokens) for s in output.scheduled
                  if s.num_lookahead_tokens > 0]
        proposals = (self._propose(wanted, forced) if wanted and self.drafter is not None
                     else {})

        seqs: list[SeqSlice] = []
        sampled: list[tuple[Request, list[int], torch.Tensor | None]] = []
        prompt_rows: list[tuple[Request | None, int]] = []  # per seq, see _prompt_logprobs
        lora_slots = {}
        if self.lora is not None:  # NOTE: the scheduler keeps these within lora.max_loras
            lora_slots = self.lora.activate({s.request.lora_int_id for s in output.scheduled
                                             if s.request.lora_int_id},
                                            {r.lora_int_id for r in self.scheduler.running})
        for s in output.scheduled:
            req = s.request
            start = req.num_computed_tokens
            tokens = req.token_ids_slice(start, start + s.num_new_tokens)
            prop = proposals.get(req.request_id)
            drafts = prop.draft_token_ids if prop else []
            final = start + s.num_new_tokens == req.num_tokens
            num_logits = 1 + len(drafts) if final else 0
            num_prompt_rows = 0
            if req.sampling_params.prompt_logprobs is not None and start < req.num_prompt_tokens:
                # Rows predicting tokens start+1 .. of this chunk, ahead of the sampling row.
                num_prompt_rows = s.num_new_tokens - (1 if final else 0)
                num_logits += num_prompt_rows
            prompt_rows.append((req if num_prompt_rows else None, num_prompt_rows))
            seqs.append(SeqSlice(tokens + drafts, start, req.block_ids, num_logits,
                                 lora_slots.get(req.lora_int_id, -1)))
            if final:
                sampled.append((req, drafts, prop.draft_probs if prop and drafts else None))
        all_decode = all(s.num_new_tokens == 1 for s in output.scheduled)
        logits = self.target_runner.execute(seqs, observe=all_decode)  # [rows, vocab]
        if any(n for _, n in prompt_rows):
            logits = self._prompt_logprobs(seqs, prompt_rows, logits)

        errors: dict[str, str] = {}
        new_tokens, num_accepted = self._accept(sampled, logits, errors)
        return self._update(output, new_tokens, num_accepted, now, errors)

    def _forced_drafts(self, decodes: list[Request]) -> dict[str, list[int]]:
        """Grammar-forced tokens per structured decode, computed before scheduling: they are
        free drafts of probability 1 (no draft forward; the masked target almost always agrees),
        so each such request gets look-ahead slots for them whatever k the controller picked
        (its k models the drafter, which may be at 0)."""
        forced: dict[str, list[int]] = {}
        if self.drafter is None:
            return forced
        for req in decodes:
            matcher = self.tracked[req.request_id].matcher
            if matcher is None:
                continue
            tokens = matcher.forced_tokens(self.controller.cap(req))
            if tokens:
                forced[req.request_id] = tokens
                req.num_lookahead_tokens = max(req.num_lookahead_tokens, len(tokens))
        return forced

    def _propose(self, wanted: list[tuple[Request, int]],
                 forced: dict[str, list[int]] | None = None) -> dict[str, Proposal]:
        """Drafts per request. Under a grammar: forced tokens first (free drafts of probability
        1; the drafter is skipped for that request this step), and every drafter's proposal is
        cut to its grammar-valid prefix."""
        proposals: dict[str, Proposal] = {}
        to_draft: list[tuple[Request, int]] = []
        forced = forced or {}
        for req, k in wanted:
            tokens = forced.get(req.request_id, [])[:k]
            if tokens:
                proposals[req.request_id] = Proposal(tokens, None, tuple(range(len(tokens))))
                self._forced_now.add(req.request_id)
            else:
                to_draft.append((req, k))
        if to_draft:
            matchers = [self.tracked[req.request_id].matcher for req, _ in to_draft]
            # NOTE: matchers only when some request has a grammar, so a drafter written for
            # propose(requests) keeps working on unstructured traffic.
            drafted = (self.drafter.propose(to_draft, matchers) if any(matchers)
                       else self.drafter.propose(to_draft))
            for (req, _), prop, matcher in zip(to_draft, drafted, matchers):
                if matcher is not None and prop.draft_token_ids:
                    valid = matcher.validate(prop.draft_token_ids)
                    if valid < len(prop.draft_token_ids):
                        probs = prop.draft_probs[:valid] if prop.draft_probs is not None else None
                        prop = Proposal(prop.draft_token_ids[:valid], probs,
                                        tuple(j for j in prop.forced if j < valid))
                proposals[req.request_id] = prop
        for rid, prop in proposals.items():
            if prop.forced:
                self._forced_pos[rid] = prop.forced
            if prop.num_model is not None:
                self._model_drafts[rid] = prop.num_model
        return proposals

    def _grammar_rows(self, sampled, rows: list[RowState], errors: dict[str, str]):
        """Bitmask rows for the structured requests' windows; None if there are none.

        Returns (row indices [m] into `rows`, bitmask [m, words]). A row whose grammar allows
        only tokens min_tokens would ban gets min_tokens 0 (the grammar wins)."""
        structured = [(i, self.tracked[req.request_id].matcher) for i, (req, _, _)
                      in enumerate(sampled) if self.tracked[req.request_id].matcher is not None]
        if not structured:
            return None
        offsets = list(itertools.accumulate([len(d) + 1 for _, d, _ in sampled], initial=0))
        num_rows = sum(len(sampled[i][1]) + 1 for i, _ in structured)
        bitmask = new_bitmask(num_rows, self.vocab_size)
        row_index: list[int] = []
        for i, matcher in structured:
            req, drafts, _ = sampled[i]
            first = len(row_index)
            row_index.extend(range(offsets[i], offsets[i + 1]))
            if matcher.error is None:
                try:
                    matcher.fill_window(bitmask, first, drafts)
                except ValueError as exc:
                    errors[req.request_id] = f"structured output: {exc}"
            if matcher.error is not None:
                errors[req.request_id] = f"structured output: {matcher.error}"
            if req.request_id in errors:
                bitmask[first:first + len(drafts) + 1] = -1  # keep the rows finite; discarded
                continue
            params = req.sampling_params
            for j in range(len(drafts) + 1):
                if len(req.output_token_ids) + j >= params.min_tokens:
                    break
                banned = set(params.stop_token_ids) | set(self.eos_token_ids)
                allowed = allowed_token_ids(bitmask[first + j], self.vocab_size, len(banned))
                if allowed is not None and set(allowed) <= banned:
                    rows[offsets[i] + j] = dataclasses.replace(
                        rows[offsets[i] + j], params=dataclasses.replace(params, min_tokens=0))
        return torch.tensor(row_index, dtype=torch.long), bitmask

    def _prompt_logprobs(self, seqs: list[SeqSlice], prompt_rows, logits: torch.Tensor
                         ) -> torch.Tensor:
        """Record prompt logprobs from their rows; returns the rows left for sampling.

        prompt_rows[i] = (request, num prompt rows) for seqs[i], (None, 0) for the others;
        a request's prompt rows come first among its rows (row r predicts token start+1+r)."""
        keep: list[int] = []
        row = 0
        for seq, (req, n) in zip(seqs, prompt_rows):
            if req is not None:
                tr = self.tracked[req.request_id]
                first = seq.start + 1
                have = len(tr.prompt_logprobs)  # NOTE: a recompute after preemption skips these
                take = [r for r in range(n) if have <= first + r < req.num_prompt_tokens]
                if take:
                    targets = [req.prompt_token_ids[first + r] for r in take]
                    top_n = req.sampling_params.prompt_logprobs
                    tr.prompt_logprobs.extend(compute_logprobs(
                        logits[[row + r for r in take]], torch.tensor(targets),
                        [top_n] * len(take)))
            keep.extend(range(row + n, row + seq.num_logits))
            row += seq.num_logits
        return logits[keep]

    def _accept(self, sampled, logits: torch.Tensor, errors: dict[str, str]):
        """Verify drafts and sample; returns new tokens and accepted-draft counts per request.
        Structured requests whose grammar cannot advance get no tokens and an entry in
        `errors`."""
        rows: list[RowState] = []
        for req, drafts, _ in sampled:
            for j in range(len(drafts) + 1):
                rows.append(RowState(req.sampling_params, req.prompt_token_ids,
                                     req.output_token_ids + drafts[:j], req.eos_token_id,
                                     req.sampling_constants))
        new_tokens: dict[str, list[int]] = {}
        num_accepted: dict[str, int] = {}
        if not rows:
            return new_tokens, num_accepted
        grammar = self._grammar_rows(sampled, rows, errors)
        offsets = list(itertools.accumulate([len(d) + 1 for _, d, _ in sampled], initial=0))
        if grammar is None:
            processed = process_logits(logits, rows)
        else:
            # NOTE: the mask goes on the raw logits, before every processor: the distribution
            # speculation preserves is the masked, processed target distribution.
            row_index, bitmask = grammar
            row_index = row_index.to(logits.device)
            masked = logits.clone()
            masked[row_index] = apply_token_bitmask_(masked[row_index], bitmask)
            processed = process_logits(masked, rows)
            dead = torch.isneginf(processed[row_index].amax(dim=-1)).tolist()
            for r in [int(row_index[j]) for j, d in enumerate(dead) if d]:
                i = next(i for i in range(len(sampled)) if offsets[i] <= r < offsets[i + 1])
                errors.setdefault(sampled[i][0].request_id,
                                  "structured output: no token the grammar allows is left "
                                  "after the logits processors")
            for i, (req, _, _) in enumerate(sampled):
                if req.request_id in errors:  # keep its rows finite; they are discarded
                    processed[offsets[i]:offsets[i + 1]] = 0.0
        greedy = [i for i, (req, _, _) in enumerate(sampled) if req.sampling_params.greedy]
        random = [i for i, (req, _, _) in enumerate(sampled) if not req.sampling_params.greedy]
        # NOTE: verification runs where the logits are; both halves return packed rows
        # [num_accepted, tokens..., -1...] of one width, brought back in ONE transfer per step.
        width = max(len(d) for _, d, _ in sampled)
        device = processed.device
        packed = []
        if greedy:
            idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in greedy]).to(device)
            argmax = processed[idx].argmax(dim=-1)
            drafts = [sampled[i][1] for i in greedy]
            packed.append(greedy_verify_device(
                argmax, torch.tensor(sum(drafts, []), dtype=torch.long),
                list(itertools.accumulate(map(len, drafts), initial=0)), width))
        if random:
            idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in random])
            random_rows = [rows[j] for j in idx.tolist()]
            target_probs = compute_probs(processed[idx.to(device)], random_rows)
            packed.append(self._rejection(sampled, random, target_probs, width))
        verified, _ = unpack_verified(torch.cat(packed).tolist())  # the step's one sync
        results: dict[int, list[int]] = dict(zip(greedy + random, verified))
        for i, (req, drafts, _) in enumerate(sampled):
            if req.request_id in errors:
                new_tokens[req.request_id], num_accepted[req.request_id] = [], 0
                continue
            tokens = results[i]
            accepted = len(tokens) - 1
            new_tokens[req.request_id] = tokens
            num_accepted[req.request_id] = accepted
            if drafts:
                self._count_spec(req, len(drafts), accepted)
                # forced tokens: the grammar-forced drafts that were accepted
                num_forced = sum(j < accepted for j in self._forced_pos.get(req.request_id, ()))
                self.tracked[req.request_id].num_forced_tokens += num_forced
                self.counters["forced_tokens"] += num_forced
            logprobs = self.tracked[req.request_id].logprobs
            if logprobs is not None:
                top_n = req.sampling_params.logprobs
                raw = logits[offsets[i]:offsets[i] + len(tokens)]
                lp = compute_logprobs(raw, torch.tensor(tokens), [top_n] * len(tokens))
                logprobs.extend(lp)
        return new_tokens, num_accepted

    def _rejection(self, sampled, which: list[int], target_probs: torch.Tensor, width: int):
        draft_ids, cu, draft_probs, seeds, starts, onehot = [], [0], [], [], [], True
        for i in which:
            req, drafts, probs = sampled[i]
            draft_ids.extend(drafts)
            cu.append(cu[-1] + len(drafts))
            if drafts and probs is not None:
                onehot = False
            seeds.append(req.sampling_params.seed)
            starts.append(len(req.output_token_ids))
        vocab = target_probs.shape[-1]
        if onehot:
            dp = None
        else:
            # NOTE: model drafts and one-hot drafts (forced tokens) may share a batch.
            for i in which:
                _, drafts, probs = sampled[i]
                if drafts and probs is None:
                    probs = torch.zeros(len(drafts), vocab, device=target_probs.device)
                    probs[torch.arange(len(drafts)), torch.tensor(drafts)] = 1.0
                if drafts:
                    draft_probs.append(probs.to(target_probs.device))
            dp = (torch.cat(draft_probs) if draft_probs
                  else torch.empty(0, vocab, device=target_probs.device))
        uniforms = draft_uniforms(seeds, starts, cu)
        return rejection_sample_device(torch.tensor(draft_ids, dtype=torch.long), cu, dp,
                                       target_probs, uniforms, seeds=seeds,
                                       num_output_tokens=starts, width=width)

    def _count_spec(self, req: Request, num_draft: int, accepted: int) -> None:
        req.num_drafts += 1
        req.num_draft_tokens += num_draft
        req.num_accepted_tokens += accepted
        self.counters["drafts"] += 1
        self.counters["draft_tokens"] += num_draft
        self.counters["accepted_tokens"] += accepted
        for pos in range(accepted):
            self.accepted_per_pos[pos] += 1
        num_model = self._model_drafts.get(req.request_id)
        if num_model is not None:  # the drafts after the model's came from prompt lookup
            self.counters["lookup_tokens"] += max(accepted - num_model, 0)
            num_draft, accepted = num_model, min(accepted, num_model)
        # alpha models the draft model: not the grammar's forced tokens, nor prompt lookup's
        if req.request_id not in self._forced_now and num_draft:
            self.controller.observe(req.request_id, num_draft, accepted)

    def _uncount_accepted(self, req: Request, kept: int, accepted: int) -> None:
        """Accepted drafts cut off by a stop never reach the output: take them back out of the
        speculation counters (the controller's acceptance estimate keeps them)."""
        req.num_accepted_tokens -= accepted - kept
        self.counters["accepted_tokens"] -= accepted - kept
        for pos in range(kept, accepted):
            self.accepted_per_pos[pos] -= 1

    def _update(self, output, new_tokens, num_accepted, now, errors) -> list[RequestOutput]:
        finished: list[tuple[str, RequestStatus, str | int | None]] = []
        deltas: dict[str, tuple[list[int], str]] = {}
        for rid, tokens in new_tokens.items():
            tr = self.tracked[rid]
            req = tr.request
            tokens, status, reason = self._check_stop(tr, tokens)
            if rid in errors:
                status, reason = RequestStatus.FINISHED_ERROR, errors[rid]
            consumed = 0  # tokens the grammar advanced by this step
            if tr.matcher is not None and tokens and status != RequestStatus.FINISHED_ERROR:
                # The grammar advances with verified tokens only, after stop trimming (stop
                # tokens above, stop strings below: what they cut is rolled back); a complete
                # grammar ends the request (it wins over min_tokens and ignore_eos).
                for j, token_id in enumerate(tokens):
                    if not tr.matcher.consume([token_id]):
                        tokens = tokens[:j]
                        status = RequestStatus.FINISHED_ERROR
                        reason = f"structured output: {tr.matcher.error}"
                        break
                    consumed += 1
                    if tr.matcher.is_stopped:
                        if j + 1 < len(tokens) or status is None:
                            status, reason = RequestStatus.FINISHED_STOPPED, None
                        tokens = tokens[:j + 1]
                        break
            delta_text = ""
            if tokens:
                delta = tr.detokenizer.add_tokens(tokens)
                delta_text = delta.text_delta
                if delta.stop_string is not None:
                    tokens = tokens[:delta.num_tokens_used]
                    status, reason = RequestStatus.FINISHED_STOPPED, delta.stop_string
            if consumed > len(tokens):  # a stop string cut tokens the grammar had taken
                tr.matcher.rollback(consumed - len(tokens))
            if status is not None and (not isinstance(reason, str)
                                       or status == RequestStatus.FINISHED_ERROR):
                delta_text += tr.detokenizer.flush()  # release text held back for stop strings
            new_tokens[rid] = tokens
            kept = min(num_accepted[rid], len(tokens))
            if kept < num_accepted[rid]:  # a stop inside an accepted run
                self._uncount_accepted(req, kept, num_accepted[rid])
            num_accepted[rid] = kept
            if tr.logprobs is not None:
                del tr.logprobs[len(req.output_token_ids) + len(tokens):]
            deltas[rid] = (tokens, delta_text)
            if status is not None:
                finished.append((rid, status, reason))
        self.scheduler.update(output, new_tokens, num_accepted)
        for s in output.scheduled:
            req = s.request
            req.draft_num_computed_tokens = min(req.draft_num_computed_tokens,
                                                req.num_computed_tokens)
        done_time = time.monotonic()
        outputs: list[RequestOutput] = []
        finished_status = {rid: (status, reason) for rid, status, reason in finished}
        for rid, (tokens, delta_text) in deltas.items():
            tr = self.tracked[rid]
            req = tr.request
            if req.first_token_time is None and tokens:
                req.first_token_time = done_time
            self.counters["generation_tokens"] += len(tokens)
            tr.text += delta_text
            status, reason = finished_status.get(rid, (None, None))
            if status is not None:
                req.finished_time = done_time
                self.scheduler.finish_request(rid, status)
                self.controller.forget(rid)
                del self.tracked[rid]
            if not tokens and status is None:
                continue
            outputs.append(self._make_output(tr, tokens, delta_text, status, reason))
        return outputs

    def _fail_unreadable_adapters(self) -> list[RequestOutput]:
        """The waiting requests of an adapter whose directory could not be read again (its
        host copy was evicted, then the files went away or broke) finish with finish_reason
        "error" naming it; every other request goes on (the step after this one)."""
        failed = self.lora.take_failed()
        outputs = []
        for req in [r for r in self.scheduler.waiting if r.lora_int_id in failed]:
            tr = self.tracked.pop(req.request_id)
            req.finished_time = time.monotonic()
            self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ERROR)
            self.controller.forget(req.request_id)
            logger.error("request %s: %s", req.request_id, failed[req.lora_int_id])
            outputs.append(self._make_output(tr, [], tr.detokenizer.flush(),
                                             RequestStatus.FINISHED_ERROR,
                                             str(failed[req.lora_int_id])))
        return outputs

    def _check_stop(self, tr: _Tracked, tokens: list[int]):
        """Trim tokens at EOS / stop token ids / max_tokens / max_model_len."""
        req = tr.request
        params = req.sampling_params
        have = len(req.output_token_ids)
        for i, t in enumerate(tokens):
            n = have + i + 1
            if t in tr.stop_token_ids and n > params.min_tokens:
                reason = None if t in self.eos_token_ids and t not in params.stop_token_ids else t
                return tokens[:i + 1], RequestStatus.FINISHED_STOPPED, reason
            if n >= params.max_tokens or req.num_prompt_tokens + n >= self.max_model_len:
                return tokens[:i + 1], RequestStatus.FINISHED_LENGTH, None
        return tokens, None, None

    def _make_output(self, tr: _Tracked, tokens, delta_text, status, reason) -> RequestOutput:
        req = tr.request
        n_new = len(tokens)
        logprobs_delta = tr.logprobs[len(tr.logprobs) - n_new:] if tr.logprobs is not None \
            else None
        metrics = RequestMetrics(
            arrival_time=req.arrival_time, first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time, finished_time=req.finished_time,
            num_prompt_tokens=req.num_prompt_tokens,
            num_generation_tokens=len(req.output_token_ids), num_cached_tokens=req.num_cached_tokens,
            num_preemptions=req.num_preemptions, num_drafts=req.num_drafts,
            num_draft_tokens=req.num_draft_tokens, num_accepted_tokens=req.num_accepted_tokens,
            num_forced_tokens=tr.num_forced_tokens)
        # NOTE: token_ids and logprobs are the request's own lists, not copies (copying them
        # every step is O(n^2) per request). They only grow, until the request finishes;
        # an intermediate output's are current until the next step(), the deltas are final.
        completion = CompletionOutput(
            index=0, text=tr.text, token_ids=req.output_token_ids,
            finish_reason=status.finish_reason if status is not None else None,
            stop_reason=reason, logprobs=tr.logprobs,
            text_delta=delta_text, token_ids_delta=list(tokens), logprobs_delta=logprobs_delta)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion],
                             status is not None, metrics, tr.prompt_logprobs)

    def stats(self) -> EngineStats:
        pool = self.scheduler.block_pool
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=pool.usage, num_blocks_total=self.num_blocks,
            num_blocks_free=pool.num_free_blocks,
            prefix_cache_queries=pool.num_queried_tokens, prefix_cache_hits=pool.num_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.counters["prompt_tokens"],
            generation_tokens_total=self.counters["generation_tokens"],
            spec_num_drafts=self.counters["drafts"],
            spec_num_draft_tokens=self.counters["draft_tokens"],
            spec_num_accepted_tokens=self.counters["accepted_tokens"],
            spec_accepted_per_pos=list(self.accepted_per_pos[:self.k_max]),
            spec_num_forced_tokens=self.counters["forced_tokens"],
            spec_num_lookup_tokens=self.counters["lookup_tokens"],
            spec_mean_k=self._mean_k(),
            lora_info=self._lora_info())

    def _mean_k(self) -> float:
        decodes = [r for r in self.scheduler.running if not r.is_prefill]
        return sum(r.num_lookahead_tokens for r in decodes) / len(decodes) if decodes else 0.0

    def _lora_info(self):
        if self.lora is None:
            return None
        from specdec.engine_lora import lora_info
        return lora_info(self)

