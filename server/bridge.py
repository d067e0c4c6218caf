"""AsyncEngine: the engine steps in its own thread; asyncio handlers talk to it via collectors.

The engine is not thread-safe, so only the engine thread calls it. Handlers enqueue commands
(add, abort, stats) and wake the thread; the thread runs them between steps and sleeps on a
condition when it has nothing to do.

Each HTTP request owns one OutputCollector with one slot per choice. The engine thread merges
every step's delta into the slot (text appended, token ids extended) and wakes the handler with
`loop.call_soon_threadsafe(event.set)` at most once per take. A slow client therefore never
blocks the engine, and what waits for it is bounded by the tokens it asked for.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
import traceback
from dataclasses import dataclass, field

from specdec.core.request import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an exception; requests fail with 500."""


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice produced since the last take (merged over engine steps)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    finished: bool = False
    num_prompt_tokens: int | None = None
    metrics: object | None = None
    prompt_logprobs: list | None = None  # the first delta of a choice, when asked for
    prompt_token_ids: list[int] | None = None  # the first delta of a choice
    # Per-token inter-token latencies (seconds) measured in the engine thread.
    itl: list[float] = field(default_factory=list)


class _Slot:
    __slots__ = ("pending", "num_prompt_tokens", "last_time", "finished", "num_tokens")

    def __init__(self):
        self.pending: ChoiceDelta | None = None
        self.num_prompt_tokens: int | None = None
        self.last_time: float | None = None
        self.finished = False
        self.num_tokens = 0


class OutputCollector:
    """Per-HTTP-request merge point between the engine thread and one asyncio handler."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request_ids: list[str]):
        self.loop = loop
        self.request_ids = request_ids
        self.index = {rid: i for i, rid in enumerate(request_ids)}
        self._slots = [_Slot() for _ in request_ids]
        self._lock = threading.Lock()
        self._event = asyncio.Event()
        self._signalled = False
        self.error: BaseException | None = None

    # ---- engine thread side
    def put(self, output) -> None:
        now = time.monotonic()
        i = self.index[output.request_id]
        completion = output.outputs[0]
        with self._lock:
            slot = self._slots[i]
            if slot.finished:
                return
            delta = slot.pending
            if delta is None:
                delta = slot.pending = ChoiceDelta()
            new_ids = list(completion.token_ids_delta or ())
            delta.text += completion.text_delta or ""
            delta.token_ids.extend(new_ids)
            if completion.logprobs_delta is not None:
                if delta.logprobs is None:
                    delta.logprobs = []
                delta.logprobs.extend(completion.logprobs_delta)
            if new_ids:
                if slot.last_time is not None:
                    delta.itl.extend([(now - slot.last_time) / len(new_ids)] * len(new_ids))
                slot.last_time = now
                slot.num_tokens += len(new_ids)
            if slot.num_prompt_tokens is None:
                slot.num_prompt_tokens = len(output.prompt_token_ids or ())
                delta.num_prompt_tokens = slot.num_prompt_tokens
                delta.prompt_token_ids = output.prompt_token_ids
                prompt_logprobs = getattr(output, "prompt_logprobs", None)
                if prompt_logprobs is not None:
                    delta.prompt_logprobs = list(prompt_logprobs)
            if output.finished:
                slot.finished = True
                delta.finished = True
                delta.finish_reason = completion.finish_reason or "stop"
                delta.stop_reason = completion.stop_reason
                delta.metrics = output.metrics
            self._signal_locked()

    def abort(self, request_id: str) -> None:
        """Finish one choice with finish_reason "abort" (the engine dropped it)."""
        with self._lock:
            slot = self._slots[self.index[request_id]]
            if slot.finished:
                return
            if slot.pending is None:
                slot.pending = ChoiceDelta()
            slot.finished = slot.pending.finished = True
            slot.pending.finish_reason = "abort"
            self._signal_locked()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self.error = exc
            self._signal_locked()

    def _signal_locked(self) -> None:
        if not self._signalled:
            self._signalled = True
            try:
                self.loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # loop closed during shutdown
                pass

    # ---- asyncio side
    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until something is pending; False on timeout."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def take(self) -> list[ChoiceDelta | None]:
        """Everything merged since the last take, per choice (None where nothing is new).

        Raises the engine's failure instead, if there is one. The check is under the lock:
        a fail() between a separate check and this take would find the collector already
        signalled, this take would clear that signal, and the waiter would sleep forever.
        """
        with self._lock:
            if self.error is not None:
                raise self.error
            self._event.clear()
            self._signalled = False
            out = [slot.pending for slot in self._slots]
            for slot in self._slots:
                slot.pending = None
            return out

    @property
    def finished(self) -> bool:
        with self._lock:
            return all(slot.finished for slot in self._slots)

    def unfinished_ids(self) -> list[str]:
        with self._lock:
            return [rid for rid, s in zip(self.request_ids, self._slots) if not s.finished]


class EngineThread:
    """One daemon thread for all of the engine's torch work: the load first, then
    AsyncEngine's step loop (`AsyncEngine.start(thread)`).

    NOTE: one thread, so one OpenMP thread team. libgomp keeps a team per thread that ever ran
    a parallel region, and once the process has more of its threads than CPUs its idle workers
    spin only ~100 iterations instead of ~300 000 before sleeping: loading on an executor
    thread and stepping on another made each of the step's many small ops wait for a worker
    to wake (a 1.5B int4 decode ~20 % slower served than offline on the 2-core dev VM).
    Daemon, as the engine thread always was: a stuck step never blocks the exit."""

    def __init__(self, name: str = "specdec-engine"):
        self._calls: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the thread after what was submitted before; its Future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._calls.append((fn, args, future))
            self._cond.notify()
        return future

    def finish(self) -> None:
        """The thread ends once what was submitted so far has run."""
        with self._cond:
            self._calls.append(None)
            self._cond.notify()

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._calls:
                    self._cond.wait()
                call = self._calls.popleft()
            if call is None:
                return
            fn, args, future = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)


class AsyncEngine:
    """Owns the engine thread. All methods are called from the asyncio loop thread."""

    def __init__(self, engine, max_in_flight: int, on_death=None, on_idle_work_done=None):
        self.engine = engine
        self.max_in_flight = max_in_flight
        # on_idle_work_done(): called once, from the engine thread, when the engine's deferred
        # start-up work (a background calibration) is finished; the server logs it.
        self.on_idle_work_done = on_idle_work_done
        # on_death(exc, request_ids, traceback_text): called once, from the engine thread,
        # just before every waiter is failed; the server logs it and exits non-zero.
        self.on_death = on_death
        self._cond = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._collectors: dict[str, OutputCollector] = {}  # engine request id -> collector
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.stats_snapshot = engine.stats()
        self.num_in_flight = 0  # engine requests admitted and not finished (loop thread view)

    # ------------------------------------------------------------------ lifecycle
    def start(self, thread: EngineThread | None = None) -> None:
        """Run the step loop on `thread` (the one that loaded the engine), or a new one."""
        if thread is None:
            self._thread = threading.Thread(target=self._run, name="specdec-engine",
                                            daemon=True)
            self._thread.start()
            return
        self._thread = thread.thread
        thread.submit(self._run)
        thread.finish()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # ------------------------------------------------------------------ handler API
    async def add(self, request_ids: list[str], prompts: list, params: list[SamplingParams],
                  priority: int = 0, lora_name: str | None = None) -> OutputCollector:
        """Admit all choices of one HTTP request; raises ValueError (bad input) atomically.
        `lora_name`: the LoRA adapter every choice runs on (None: the base model)."""
        if not self.alive:
            raise EngineDeadError(f"engine is not running: {self.error!r}")
        loop = asyncio.get_running_loop()
        collector = OutputCollector(loop, request_ids)
        future = loop.create_future()
        self.num_in_flight += len(request_ids)
        self._submit(("add", collector, ([(rid, prompt, sp, lora_name) for rid, prompt, sp
                                          in zip(request_ids, prompts, params)], priority),
                      future))
        try:
            await future
        except BaseException:
            self.num_in_flight -= len(request_ids)
            # NOTE: if the handler was cancelled, the add may still run; commands run in
            # order, so this abort follows it (ids the engine never admitted are skipped).
            self._submit(("abort", request_ids, None, None))
            raise
        return collector

    def release(self, collector: OutputCollector) -> None:
        """The handler is done with a collector: abort whatever is unfinished."""
        self.num_in_flight -= len(collector.request_ids)
        unfinished = collector.unfinished_ids()
        if unfinished:
            self._submit(("abort", unfinished, None, None))

    async def stats(self):
        """A fresh EngineStats from the engine thread (or the last snapshot if it is dead)."""
        if not self.alive:
            return self.stats_snapshot
        future = asyncio.get_running_loop().create_future()
        self._submit(("stats", None, None, future))
        try:
            return await asyncio.wait_for(future, 30.0)
        except (asyncio.TimeoutError, EngineDeadError):
            return self.stats_snapshot

    async def call(self, fn):
        """Run `fn(engine)` on the engine thread between steps; returns or raises its result."""
        future = asyncio.get_running_loop().create_future()
        self._submit(("call", fn, None, future))
        return await future

    def abort_all(self) -> None:
        self._submit(("abort_all", None, None, None))

    def _submit(self, command) -> None:
        with self._cond:
            if self.error is None:
                self._commands.append(command)
                self._cond.notify()
                return
        future = command[3]
        if future is not None:  # the engine thread is gone: answer now instead of never
            _resolve(future, error=EngineDeadError(f"engine is not running: {self.error!r}"))

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self.engine
        # Deferred start-up work (a first start's calibration) runs a piece at a time, only
        # when there is nothing else to do: a request waits for one piece at most.
        idle_work = bool(getattr(engine, "has_idle_work", False))
        try:
            while True:
                with self._cond:
                    while (not self._commands and not self._stopping and not idle_work
                           and not engine.has_unfinished_requests()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    self._execute(command)
                if idle_work and not commands and not engine.has_unfinished_requests():
                    idle_work = engine.run_idle_work()
                    if not idle_work and self.on_idle_work_done is not None:
                        self.on_idle_work_done()
                elif engine.has_unfinished_requests():
                    for output in engine.step():
                        collector = self._collectors.get(output.request_id)
                        if collector is None:
                            continue
                        collector.put(output)
                        if output.finished:
                            del self._collectors[output.request_id]
        except BaseException as exc:  # an engine fault: report it, then fail every waiter
            try:
                self.stats_snapshot = engine.stats()
            except Exception:
                pass
            request_ids = sorted(self._collectors)
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            # Report first, so the server knows it must exit before any handler can finish.
            if self.on_death is not None:
                self.on_death(exc, request_ids, text)
            else:
                import logging
                logging.getLogger("specdec.server").error(
                    "engine thread died; request ids %s\n%s", request_ids, text)
            dead = EngineDeadError(f"engine failed: {type(exc).__name__}: {exc}")
            for collector in set(self._collectors.values()):
                collector.fail(dead)
            self._collectors.clear()
            with self._cond:
                self.error = exc  # under the lock: _submit answers from now on
                pending = list(self._commands)
                self._commands.clear()
            for _, _, _, future in pending:
                if future is not None:
                    _resolve(future, error=dead)

    def _execute(self, command) -> None:
        op, target, payload, future = command
        engine = self.engine
        if op == "add":
            added = []
            choices, priority = payload
            try:
                for request_id, prompt, params, lora_name in choices:
                    extra = {}  # NOTE: only what is set (test engines take the plain call)
                    if priority:
                        extra["priority"] = priority
                    if lora_name is not None:
                        extra["lora_request"] = lora_name
                    engine.add_request(request_id, prompt, params, **extra)
                    added.append(request_id)
                    self._collectors[request_id] = target
            except Exception as exc:  # ValueError: bad input (400); others: 500
                for request_id in added:  # all-or-nothing: a bad prompt admits no choice
                    engine.abort_request(request_id)
                    self._collectors.pop(request_id, None)
                _resolve(future, error=exc)
                return
            _resolve(future, result=None)
        elif op == "abort":
            for request_id in target:
                if self._collectors.pop(request_id, None) is not None:
                    engine.abort_request(request_id)
        elif op == "abort_all":
            for request_id, collector in list(self._collectors.items()):
                engine.abort_request(request_id)
                collector.abort(request_id)
            self._collectors.clear()
        elif op == "call":
            try:
                result = target(engine)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                _resolve(future, error=exc)
                return
            _resolve(future, result=result)
        elif op == "stats":
            self.stats_snapshot = engine.stats()
            _resolve(future, result=self.stats_snapshot)


def _resolve(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    def settle():
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    try:
        future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:
        pass
