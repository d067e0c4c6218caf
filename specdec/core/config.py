"""Deployment configuration: frozen dataclasses loaded from TOML (standard library only).

A config file has one table per section; every key is a field of that section's dataclass:

    [model]      path, dtype, max_model_len, quantization
    [cache]      block_size, num_blocks, enable_prefix_caching
    [scheduler]  max_num_seqs, max_num_batched_tokens
    [spec]       method, draft_model, draft_dtype, draft_quantization, draft_lora,
                 num_speculative_tokens, ...
    [server]     host, port, api_key, max_queued_requests, shutdown_timeout, served_model_name, ui, ...
    [device]     device, num_threads, cuda_graphs, seed
    [lora]       enabled, modules, max_loras, max_lora_rank, max_cpu_loras, allow_runtime_updates
    [parallel]   tensor_parallel_size, timeout_s

Unknown sections or keys and bad values raise ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")
FIM_STYLES = ("auto", "none", "qwen", "starcoder", "deepseek", "codellama")
SCHEDULER_POLICIES = ("fcfs", "priority")


class ConfigError(ValueError):
    pass


def _check(ok: bool, key: str, value, limit: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {limit}, got {value!r}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """`path`: a local Hugging Face directory, or a name that `specdec fetch` knows."""

    path: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    max_model_len: int = 2048
    quantization: str | None = None  # None, "int8" or "int4" (weight-only, CPU)
    # int4 from a GGUF: what its Q6_K / Q8_0 modules become, "int8" (closer to the source) or
    # "int4" (smaller and faster; see specdec/model/gguf_q4k.py)
    gguf_high_bits: str = "int8"
    trust_remote_code: bool = False
    # "auto": sampling defaults (temperature, top_p, top_k, repetition_penalty) from the
    # model's generation_config.json apply when a request omits them; "none": ignore them.
    generation_config: str = "auto"
    # Fill-in-the-middle prompt style: "auto" detects it from the tokenizer's special tokens.
    fim_style: str = "auto"

    def __post_init__(self) -> None:
        _check(bool(self.path), "model.path", self.path, "a directory or a model name")
        _check(self.gguf_high_bits in ("int8", "int4"), "model.gguf_high_bits",
               self.gguf_high_bits, '"int8" or "int4"')
        _check(self.generation_config in ("auto", "none"), "model.generation_config",
               self.generation_config, '"auto" or "none"')
        _check(self.fim_style in FIM_STYLES, "model.fim_style", self.fim_style,
               f"one of {FIM_STYLES}")
        _check(self.dtype in DTYPES, "model.dtype", self.dtype, f"one of {DTYPES}")
        _check(self.max_model_len >= 16, "model.max_model_len", self.max_model_len, ">= 16")
        _check(self.quantization in (None, "int8", "int4"), "model.quantization",
               self.quantization, 'unset, "int8" or "int4"')


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """`num_blocks` 0 sizes the pool from `memory_gb`."""

    block_size: int = 16
    num_blocks: int = 0
    memory_gb: float = 2.0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(self.block_size in (8, 16, 32, 64), "cache.block_size", self.block_size,
               "one of 8, 16, 32, 64")
        _check(self.num_blocks >= 0, "cache.num_blocks", self.num_blocks, ">= 0 (0 = auto)")
        _check(self.memory_gb > 0, "cache.memory_gb", self.memory_gb, "> 0")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    # "fcfs": arrival order; "priority": lower `priority` first (ties by arrival), and a
    # waiting request may preempt a running one of a worse priority (vLLM's semantics).
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        _check(self.policy in SCHEDULER_POLICIES, "scheduler.policy", self.policy,
               f"one of {SCHEDULER_POLICIES}")
        _check(self.max_num_seqs >= 1, "scheduler.max_num_seqs", self.max_num_seqs, ">= 1")
        _check(self.max_num_batched_tokens >= 16, "scheduler.max_num_batched_tokens",
               self.max_num_batched_tokens, ">= 16")


SPEC_METHODS = ("none", "draft", "ngram")


@dataclass(frozen=True, slots=True)
class SpecConfig:
    """Speculative decoding. `num_speculative_tokens` is k_max; `adaptive` picks k per step."""

    method: str = "none"
    draft_model: str | None = None
    draft_dtype: str | None = None  # None: the target's dtype
    draft_quantization: str | None = None  # None, "int8" or "int4" (weight-only, CPU)
    # A PEFT LoRA directory applied to the draft model on every draft forward (a draft-side
    # adapter, e.g. one trained alongside the target's); verification stays target + request
    # adapter, so it moves acceptance only. None: the draft runs its base weights.
    draft_lora: str | None = None
    num_speculative_tokens: int = 4
    adaptive: bool = True
    ngram_min: int = 1
    ngram_max: int = 4
    # The draft's lm_head keeps only token ids below this (None: all): a cheaper draft step;
    # the draft never proposes the others, and verification keeps the output exact.
    draft_vocab_size: int | None = None
    # Prompt lookup beside the draft model (method "draft"; ignored otherwise: "ngram" is
    # prompt lookup alone, and a config's method may be switched on the command line). A
    # request whose last `prompt_lookup_min` tokens occurred before proposes what followed
    # them, with no draft forward; otherwise a match of ngram_min..ngram_max tokens that
    # agrees with the draft token just sampled proposes the rest of its continuation. Exact
    # (one-hot drafts). The device draft loop then reads each step's tokens back (free on a
    # CPU, a sync on a GPU).
    prompt_lookup: bool = False
    prompt_lookup_min: int = 4

    def __post_init__(self) -> None:
        _check(self.draft_vocab_size is None or self.draft_vocab_size > 0,
               "spec.draft_vocab_size", self.draft_vocab_size, "unset or positive")
        _check(self.method in SPEC_METHODS, "spec.method", self.method, f"one of {SPEC_METHODS}")
        _check(self.method != "draft" or bool(self.draft_model), "spec.draft_model",
               self.draft_model, 'set when spec.method = "draft"')
        _check(self.draft_dtype in (None, *DTYPES), "spec.draft_dtype", self.draft_dtype,
               f"unset or one of {DTYPES}")
        _check(self.draft_quantization in (None, "int8", "int4"), "spec.draft_quantization",
               self.draft_quantization, 'unset, "int8" or "int4"')
        _check(self.draft_lora is None or (self.method == "draft" and bool(self.draft_lora)),
               "spec.draft_lora", self.draft_lora,
               'unset, or a non-empty adapter path with spec.method = "draft"')
        _check(0 <= self.num_speculative_tokens <= 16, "spec.num_speculative_tokens",
               self.num_speculative_tokens, "in [0, 16]")
        _check(1 <= self.ngram_min <= self.ngram_max, "spec.ngram_min", self.ngram_min,
               f"in [1, ngram_max={self.ngram_max}]")
        _check(1 <= self.prompt_lookup_min <= 64, "spec.prompt_lookup_min",
               self.prompt_lookup_min, "in [1, 64]")

    @property
    def enabled(self) -> bool:
        return self.method != "none" and self.num_speculative_tokens > 0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # also SPECDEC_API_KEY
    served_model_name: str | None = None  # default: the model path's last component
    max_queued_requests: int = 256
    shutdown_timeout: float = 30.0
    max_body_bytes: int = 4 * 1024 * 1024
    log_requests: bool = True
    ui: bool = True  # the built-in chat page at GET / (server/ui/)
    # Per-request limits (400 past each; see server/limits.py and docs/LIMITS.md).
    max_stop_strings: int = 16
    max_stop_string_chars: int = 1024
    max_logit_bias_entries: int = 1024
    max_stop_token_ids: int = 1024
    max_prompt_chars: int = 0  # per prompt, before tokenization; 0: 32 x max_model_len
    max_choices_per_request: int = 128  # n x number of prompts
    # More names the model answers to (comma-separated), besides served_model_name.
    served_model_aliases: str = ""
    # Prometheus: every series is exported as specdec:NAME and again under this prefix
    # (vLLM's names, for vLLM dashboards and autoscalers); "" exports specdec: only.
    metrics_prefix: str = "vllm"
    # CORS: comma-separated allowed origins ("*" for any); "" (default) sends no CORS headers.
    cors_origins: str = ""

    def __post_init__(self) -> None:
        _check(self.metrics_prefix == "" or (self.metrics_prefix.replace("_", "").isalnum()
                                             and self.metrics_prefix != "specdec"),
               "server.metrics_prefix", self.metrics_prefix,
               'empty or [A-Za-z0-9_]+ other than "specdec" (always exported)')
        _check(0 <= self.port <= 65535, "server.port", self.port, "in [0, 65535]")
        for key in ("max_stop_strings", "max_stop_string_chars", "max_logit_bias_entries",
                    "max_stop_token_ids", "max_choices_per_request"):
            _check(getattr(self, key) >= 1, f"server.{key}", getattr(self, key), ">= 1")
        _check(self.max_prompt_chars >= 0, "server.max_prompt_chars", self.max_prompt_chars,
               ">= 0 (0: 32 x max_model_len)")
        _check(self.max_queued_requests >= 1, "server.max_queued_requests",
               self.max_queued_requests, ">= 1")
        _check(self.shutdown_timeout >= 0, "server.shutdown_timeout", self.shutdown_timeout,
               ">= 0")


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 0  # 0: torch's default
    cuda_graphs: bool = True
    seed: int = 0
    # CUDA only: "cupy" requires the CuPy kernels (a failure to compile or load them is a
    # start-up error); "torch" runs the pure-torch reference ops, eager, without CUDA graphs.
    kernels: str = "cupy"

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               "device.device", self.device, '"auto", "cpu", "cuda" or "cuda:N"')
        _check(self.kernels in ("cupy", "torch"), "device.kernels", self.kernels,
               '"cupy" or "torch"')
        _check(self.num_threads >= 0, "device.num_threads", self.num_threads, ">= 0")


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    """Adapters served on the target model (vLLM's --enable-lora family).

    `modules`: "NAME=PATH" strings, JSON strings or tables {"name", "path", "base_model_name"},
    normalized to ((name, path), ...). LoRA is on when `enabled` or `modules` is non-empty.
    `max_loras`: adapters resident at once (one step's distinct adapters); `max_cpu_loras`:
    parsed adapters kept on the host (0: max_loras)."""

    enabled: bool = False
    modules: tuple = ()
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int = 0
    allow_runtime_updates: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", parse_lora_modules(self.modules))
        _check(self.max_loras >= 1, "lora.max_loras", self.max_loras, ">= 1")
        _check(self.max_lora_rank >= 1, "lora.max_lora_rank", self.max_lora_rank, ">= 1")
        _check(self.max_cpu_loras >= 0, "lora.max_cpu_loras", self.max_cpu_loras, ">= 0")

    @property
    def active(self) -> bool:
        return self.enabled or bool(self.modules)


def parse_lora_modules(value) -> tuple:
    """"a=/p b=/q", ["a=/p", '{"name": "b", "path": "/q"}', {"name": "c", "path": "/r"}]
    -> (("a", "/p"), ("b", "/q"), ...); ConfigError naming the entry otherwise."""
    import json
    if isinstance(value, str):
        value = [value] if value.lstrip().startswith("{") else value.split()
    out, names = [], set()
    for entry in value or ():
        if isinstance(entry, (tuple, list)) and len(entry) == 2:
            name, path = entry
        else:
            if isinstance(entry, str) and entry.lstrip().startswith("{"):
                try:
                    entry = json.loads(entry)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"lora.modules entry {entry!r} is not valid JSON: {e}") \
                        from None
            if isinstance(entry, dict):
                name, path = entry.get("name"), entry.get("path")
            elif isinstance(entry, str) and "=" in entry:
                name, _, path = entry.partition("=")
            else:
                raise ConfigError(f"lora.modules entry must be NAME=PATH or "
                                  f'{{"name", "path"}}, got {entry!r}')
        _check(isinstance(name, str) and bool(name) and isinstance(path, str) and bool(path),
               "lora.modules entry", entry, "a non-empty name and path")
        _check(name not in names, "lora.modules name", name, "unique")
        names.add(name)
        out.append((name, os.path.expanduser(os.path.expandvars(path))))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """Tensor parallelism of the target model (specdec/model/parallel.py): N ranks, rank 0 the
    serving process and N - 1 worker processes it spawns. `timeout_s` bounds each collective of
    a step (a stuck or dead rank fails the step instead of hanging it)."""

    tensor_parallel_size: int = 1
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _check(1 <= self.tensor_parallel_size <= 64, "parallel.tensor_parallel_size",
               self.tensor_parallel_size, "in [1, 64]")
        _check(self.timeout_s > 0, "parallel.timeout_s", self.timeout_s, "> 0")


@dataclass(frozen=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.parallel.tensor_parallel_size > 1:
            check_parallel(self)
        if self.device.device != "auto":
            check_device(self, self.device.device.partition(":")[0])

    def replace(self, **overrides) -> "Config":
        """Return a copy with dotted overrides applied: replace(**{"model.dtype": "bfloat16"})."""
        return from_dict(to_dict(self), overrides)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                  "spec": SpecConfig, "server": ServerConfig, "device": DeviceConfig,
                  "lora": LoRAConfig, "parallel": ParallelConfig}


def check_device(config: Config, device_type: str) -> None:
    """ConfigError for settings the device cannot run: the weight-only int8/int4 kernels are
    CPU only (called at load for explicit devices, and by the engine once "auto" resolved)."""
    if device_type == "cpu":
        return
    quantized = [("model.quantization", config.model.quantization)]
    if config.spec.method == "draft":
        quantized.append(("spec.draft_quantization", config.spec.draft_quantization))
    for key, value in quantized:
        if value is not None:
            raise ConfigError(f"{key} must be unset on device {device_type!r}, got {value!r}: "
                              f"the {value} kernels run on the CPU only (set "
                              f'device.device = "cpu", or unset {key})')


def check_parallel(config: Config) -> None:
    """ConfigError for what tensor parallelism does not run: a quantized target (the int8/int4
    layers are not split) and LoRA adapters (not split either)."""
    size = config.parallel.tensor_parallel_size
    if config.model.quantization is not None:
        raise ConfigError(f"model.quantization must be unset with parallel.tensor_parallel_size"
                          f"={size}, got {config.model.quantization!r}: quantized weights are "
                          f"not split across ranks (the draft may stay quantized)")
    if config.lora.active:
        raise ConfigError(f"lora must be off with parallel.tensor_parallel_size={size}: "
                          f"adapters are not split across ranks")


def to_dict(config: Config) -> dict[str, dict]:
    return {name: dataclasses.asdict(getattr(config, name)) for name in _SECTION_TYPES}


def _coerce(key: str, tp, value):
    """Check a TOML value, or parse a command-line string, against a field's annotation."""
    hints = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")
                         and type(None) in hints):
        if type(None) in hints:
            return None
        raise ConfigError(f"{key} may not be empty")
    for hint in hints:
        if hint is type(None):
            continue
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
        elif hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
        elif hint is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif hint is str:
            if isinstance(value, str):
                return value
        elif hint is tuple:
            if isinstance(value, (str, list, tuple)):
                return parse_lora_modules(value)
    names = " or ".join(h.__name__ for h in hints if h is not type(None))
    raise ConfigError(f"{key} must be {names}, got {value!r}")


def from_dict(data: dict, overrides: dict[str, object] | None = None) -> Config:
    """Build a Config from nested dicts plus dotted overrides ({"spec.method": "ngram"})."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.replace("-", "_").partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r} must look like section.key")
        data.setdefault(section, {})[key] = value
    sections = {}
    for section, values in data.items():
        cls = _SECTION_TYPES.get(section)
        if cls is None:
            raise ConfigError(f"unknown config section [{section}]; known: {sorted(_SECTION_TYPES)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {section}.{key}; known: {sorted(hints)}")
            kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
        for key in _PATH_KEYS.get(section, ()):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = os.path.expanduser(os.path.expandvars(kwargs[key]))
        sections[section] = cls(**kwargs)
    return Config(**sections)


# Paths may use ~ and $VARS (tests point the tiny-random config at generated models this way).
_PATH_KEYS = {"model": ("path",), "spec": ("draft_model",)}


def load(path: str | os.PathLike, overrides: dict[str, object] | None = None) -> Config:
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    return from_dict(data, overrides)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--model.dtype bfloat16 --spec.method=ngram` -> {"model.dtype": "bfloat16", ...}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} needs a value")
            value = args[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out
