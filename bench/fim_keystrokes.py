"""`bench/serve.py --dataset fim-keystrokes`: an editor typing into a ~2k-token file.

One streamed fill-in-the-middle request (`/v1/completions` with `suffix`) per typed character;
each new keystroke cancels the previous request by closing its connection, as Continue and
llama.vscode do. The server must free the cancelled request's slot at once, and the prefix
cache must turn each keystroke's prompt (the previous one plus a character) into a hit.

The file is this repository's own source (specdec/core/scheduler.py, cut to --file-tokens
tokens when a tokenizer is given, else ~4 characters per token); the cursor sits at the start of
a line at --cursor-frac of the file, and the typed text is that line (the suffix is what
follows it). Reported per run (one --label, e.g. spec or no-spec with
`--extra-body '{"num_speculative_tokens": 0}'`):

- TTFT per keystroke: request sent -> first frame with text (keystrokes cancelled before their
  first token are counted apart);
- time to the full middle: for the last keystroke, which is not cancelled, request sent ->
  end of the stream, and its finish reason;
- prefix cache hit rate and acceptance length from the /metrics deltas over the run.

--num-warmups N sends the file once (max_tokens 1) before measuring, so every run starts with
the text before the cursor line in the prefix cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp

from serve_stats import _stats, spec_metrics

SOURCE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "specdec", "core", "scheduler.py")


def build_file(tokenizer, file_tokens: int, cursor_frac: float, max_typed: int
               ) -> tuple[str, str, str]:
    """(text before the cursor line, the typed line, the text after it)."""
    with open(SOURCE_FILE) as f:
        text = f.read()
    while len(text) < 8 * file_tokens:
        text += "\n\n" + text
    if tokenizer is not None:
        ids = tokenizer.encode(text, add_special_tokens=False)[:file_tokens]
        text = tokenizer.decode(ids)
    else:
        text = text[:4 * file_tokens]
    lines = text.splitlines(keepends=True)
    cursor = int(len(lines) * cursor_frac)
    while cursor < len(lines) - 1 and len(lines[cursor].strip()) < 12:
        cursor += 1  # a line worth typing
    typed = lines[cursor].rstrip("\n")[:max_typed]
    rest = lines[cursor][len(typed):]
    return "".join(lines[:cursor]), typed, rest + "".join(lines[cursor + 1:])


async def _keystroke(session, url: str, headers: dict, body: dict, record: dict) -> None:
    start = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                record["error"] = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for raw in resp.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    record["error"] = json.dumps(chunk["error"])[:200]
                    return
                for choice in chunk.get("choices") or []:
                    if choice.get("text") and "ttft" not in record:
                        record["ttft"] = time.perf_counter() - start
                    record["text"] = record.get("text", "") + (choice.get("text") or "")
                    if choice.get("finish_reason"):
                        record["finish_reason"] = choice["finish_reason"]
                if chunk.get("usage"):
                    record["usage"] = chunk["usage"]
        record["e2e"] = time.perf_counter() - start
    except asyncio.CancelledError:
        record["cancelled"] = True
        raise


async def _counters(session, url: str) -> dict | None:
    from serve_stats import parse_counters
    try:
        async with session.get(url) as resp:
            return parse_counters(await resp.text()) if resp.status == 200 else None
    except aiohttp.ClientError:
        return None


async def run_keystrokes(args, tokenizer) -> dict:
    base = args.base_url.rstrip("/")
    url = base + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    before_cursor, typed, suffix = build_file(tokenizer, args.file_tokens, args.cursor_frac,
                                              args.num_prompts)
    records: list[dict] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout)) as s:
        if args.model is None:
            async with s.get(base + "/v1/models", headers=headers) as resp:
                args.model = (await resp.json())["data"][0]["id"]
        for _ in range(getattr(args, "num_warmups", 0)):
            # NOTE: warm the prefix cache with the file before the cursor line, so that runs
            # compare keystrokes, not who came first to a cold cache.
            warm = {"model": args.model, "prompt": before_cursor, "suffix": suffix,
                    "max_tokens": 1, "temperature": args.temperature, **args.extra_body}
            async with s.post(url, json=warm, headers=headers) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"warm-up: HTTP {resp.status}: {await resp.text()}")
        before = await _counters(s, base + "/metrics")
        t_zero = time.perf_counter()
        task = None
        for i in range(1, len(typed) + 1):
            if task is not None and not task.done():
                task.cancel()  # the editor's newer keystroke supersedes it
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            body = {"model": args.model, "prompt": before_cursor + typed[:i],
                    "suffix": suffix, "max_tokens": args.max_tokens,
                    "temperature": args.temperature, "stream": True,
                    "stream_options": {"include_usage": True}, **args.extra_body}
            record = {"keystroke": i, "sent_s": time.perf_counter() - t_zero}
            records.append(record)
            task = asyncio.create_task(_keystroke(s, url, headers, body, record))
            if i < len(typed):
                await asyncio.sleep(args.keystroke_interval_ms / 1000.0)
        await task
        duration = time.perf_counter() - t_zero
        after = await _counters(s, base + "/metrics")
    last = records[-1]
    ttfts = [r["ttft"] for r in records if "ttft" in r]
    summary = {
        "keystrokes": len(records), "typed": typed, "duration_s": duration,
        "keystroke_interval_ms": args.keystroke_interval_ms,
        "prompt_tokens_last": (last.get("usage") or {}).get("prompt_tokens"),
        "cached_tokens_last": ((last.get("usage") or {}).get("prompt_tokens_details")
                               or {}).get("cached_tokens", 0),
        "ttft_ms": _stats(ttfts, args.percentiles) if ttfts else None,
        "cancelled_before_first_token": sum(1 for r in records if "ttft" not in r
                                            and r.get("cancelled")),
        "errors": [r["error"] for r in records if "error" in r],
        "last_ttft_ms": 1e3 * last["ttft"] if "ttft" in last else None,
        "last_full_middle_ms": 1e3 * last["e2e"] if "e2e" in last else None,
        "last_finish_reason": last.get("finish_reason"),
        "last_completion_tokens": (last.get("usage") or {}).get("completion_tokens"),
        "last_middle": last.get("text", ""),
        "spec_decode": spec_metrics(before, after),
    }
    return {"summary": summary, "records": records}


def print_keystrokes(s: dict, label: str) -> None:
    print(f"{'=' * 20} fim-keystrokes ({label}) {'=' * 20}")
    print(f"{'keystrokes (one request each):':<44}{s['keystrokes']}")
    print(f"{'prompt tokens / cached (last keystroke):':<44}"
          f"{s['prompt_tokens_last']} / {s['cached_tokens_last']}")
    if s["ttft_ms"]:
        t = s["ttft_ms"]
        print(f"{'TTFT mean / median / p90 (ms):':<44}"
              f"{t['mean']:.1f} / {t['median']:.1f} / {t.get('p90', float('nan')):.1f}")
    print(f"{'cancelled before their first token:':<44}{s['cancelled_before_first_token']}")
    print(f"{'last keystroke TTFT (ms):':<44}{s['last_ttft_ms']}")
    print(f"{'last keystroke full middle (ms):':<44}{s['last_full_middle_ms']}")
    print(f"{'last finish reason / tokens:':<44}{s['last_finish_reason']} / "
          f"{s['last_completion_tokens']}")
    spec = s.get("spec_decode") or {}
    for key in ("acceptance_length", "prefix_cache_hit_rate"):
        if key in spec:
            print(f"{key + ':':<44}{spec[key]}")
    if s["errors"]:
        print(f"errors: {s['errors'][:3]}")
