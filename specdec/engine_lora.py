"""The engine's LoRA glue: building the manager from [lora], resolving a request's adapter,
runtime load/unload, and the `lora_requests_info` view.

Request adapters apply to the target only. The draft model (or n-gram drafter) proposes from
its base weights, or with `spec.draft_lora` (one draft-side adapter, on every draft forward);
verification runs target + the request's adapter, so the output is exactly the adapter's either
way. Acceptance may be lower, and the adaptive controller turns k down per request by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from specdec.model.lora import LoRAError, LoRAManager, LoRARequest

__all__ = ["LoRAError", "LoRARequest", "LoRAInfo", "make_lora_manager", "make_draft_lora",
           "resolve_lora", "add_lora", "remove_lora", "lora_info"]


@dataclass(frozen=True, slots=True)
class LoRAInfo:
    """vLLM's `lora_requests_info` labels: adapter names with running / waiting requests."""

    running_lora_adapters: tuple[str, ...]
    waiting_lora_adapters: tuple[str, ...]
    max_lora: int


def make_lora_manager(lora_config, target, target_runner, scheduler) -> LoRAManager:
    """The manager on the target's device, wired into its runner and the scheduler's admission
    (at most max_loras distinct adapters running); registers `lora.modules`."""
    manager = LoRAManager(target.arch, lora_config.max_loras, lora_config.max_lora_rank,
                          lora_config.max_cpu_loras, target.dtype, target.device)
    target_runner.lora = manager
    scheduler.max_loras = lora_config.max_loras
    scheduler.lora_ready = manager.ready  # an evicted adapter is re-read off the engine thread
    for name, path in lora_config.modules:
        manager.add(name, path)
    return manager


def make_draft_lora(path: str, draft, draft_runner) -> LoRAManager:
    """`spec.draft_lora`: the adapter at `path` in the draft runner's one slot, applied to every
    token the draft runs (its runner's default slot). Its own rank sizes the slot (the
    [lora] limits are for request adapters). LoRAError naming spec.draft_lora if bad."""
    from specdec.model.lora import load_adapter
    try:
        adapter = load_adapter("spec.draft_lora", path, 1 << 30, draft.arch)
    except LoRAError as e:
        raise LoRAError(f"spec.draft_lora = {path!r}: {e}") from None
    manager = LoRAManager(draft.arch, 1, adapter.rank, 1, draft.dtype, draft.device)
    request = manager.add("spec.draft_lora", path, adapter)
    manager.activate({request.lora_int_id})
    draft_runner.lora = manager
    draft_runner.lora_default_slot = 0
    return manager


def resolve_lora(manager: LoRAManager | None, lora_request) -> LoRARequest:
    """A request's adapter: a registered name, or a LoRARequest (registered on first use, as
    vLLM's offline API does). ValueError naming `lora_request` otherwise."""
    if manager is None:
        raise ValueError("lora_request needs LoRA enabled ([lora] enabled = true or modules)")
    if isinstance(lora_request, str):
        found = manager.registry.get(lora_request)
        if found is None:
            raise ValueError(f"lora_request: unknown adapter {lora_request!r}; loaded: "
                             f"{sorted(manager.registry)}")
        return found
    if not isinstance(lora_request, LoRARequest):
        raise ValueError(f"lora_request must be an adapter name or a LoRARequest, got "
                         f"{type(lora_request).__name__}")
    found = manager.registry.get(lora_request.lora_name)
    if found is not None and found.lora_path == lora_request.lora_path:
        return found
    return manager.add(lora_request.lora_name, lora_request.lora_path)


def add_lora(engine, name: str, path: str) -> LoRARequest:
    """Load (or replace) an adapter at run time; LoRAError naming the file and key if bad."""
    if engine.lora is None:
        raise ValueError("LoRA is not enabled ([lora] enabled = true)")
    return engine.lora.add(name, path)


def remove_lora(engine, name: str) -> LoRARequest:
    """Unload an adapter by name (KeyError if unknown); running requests finish on it."""
    if engine.lora is None:
        raise KeyError(name)
    return engine.lora.remove(name)


def lora_info(engine) -> LoRAInfo | None:
    if engine.lora is None:
        return None
    scheduler = engine.scheduler
    running = {r.lora_name for r in scheduler.running if r.lora_name}
    waiting = {r.lora_name for r in scheduler.waiting if r.lora_name}
    return LoRAInfo(tuple(sorted(running)), tuple(sorted(waiting)), engine.lora.max_loras)
