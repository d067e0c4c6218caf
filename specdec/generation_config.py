"""The model's own generation defaults: its EOS set and sampling defaults (generation_config.json).

vLLM's `--generation-config auto` applies a model's published sampling defaults whenever a
request omits a field; `model.generation_config = "auto"` does the same here. The GGUF
conversion in `specdec fetch` loses the published file (it writes `eos_token_id` = the
tokenizer's EOS only), so fetch writes the published values from PUBLISHED back
(`write_generation_config`).

EOS set (decision, documented in docs/INTERFACES.md): the tokenizer's EOS, every
`eos_token_id` in generation_config.json, and `<|endoftext|>` whenever the tokenizer has it as
a special token next to fill-in-the-middle tokens (a code model: it ends a middle there; in a
chat tokenizer it is often just the padding token, which the tiny test models sample). The last rule makes caches fetched before this change stop at the end of a
fill-in-the-middle answer too (Qwen2.5-Coder ends a middle with `<|endoftext|>`, id 151643):
`<|endoftext|>` ends a document in every tokenizer that has one, so no useful text follows it.
"""

from __future__ import annotations

import json
import os

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
ENDOFTEXT = "<|endoftext|>"
# The "middle" marker of each FIM style (Qwen/StarCoder, StarCoder 1, DeepSeek, CodeLlama).
FIM_MIDDLE_TOKENS = ("<|fim_middle|>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>")

# Published generation_config.json values for the models `specdec fetch` knows (the upstream
# Hugging Face repositories' files; the keys the GGUF conversion drops).
PUBLISHED: dict[str, dict] = {
    "qwen2.5-coder-0.5b-instruct": {
        "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
        "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7,
        "top_p": 0.8, "top_k": 20},
    "qwen2.5-coder-1.5b-instruct": {
        "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
        "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7,
        "top_p": 0.8, "top_k": 20},
    "smollm2-135m-instruct": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
}


def load_generation_config(model_dir: str) -> dict:
    """generation_config.json of a model directory as a dict ({} when absent or unreadable)."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_generation_config(model_dir: str, name: str) -> bool:
    """Merge the published values for `name` into model_dir/generation_config.json.

    Returns True when the file changed. Unknown names leave the file alone."""
    published = PUBLISHED.get(name)
    if published is None:
        return False
    current = load_generation_config(model_dir)
    merged = {**current, **published}
    if merged == current:
        return False
    path = os.path.join(model_dir, "generation_config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return True


def eos_token_ids(tokenizer, generation_config: dict) -> list[int]:
    """Every token id that ends generation (see the module docstring for the rule)."""
    ids: list[int] = []

    def add(token_id) -> None:
        if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id not in ids:
            ids.append(token_id)

    add(getattr(tokenizer, "eos_token_id", None))
    eos = generation_config.get("eos_token_id")
    for token_id in (eos if isinstance(eos, list) else [eos]):
        add(token_id)
    if any(special_token_id(tokenizer, t) is not None for t in FIM_MIDDLE_TOKENS):
        add(special_token_id(tokenizer, ENDOFTEXT))
    return ids


def special_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` when it is exactly one special (added) token of the tokenizer."""
    specials = special_tokens(tokenizer)
    return specials.get(text)


def special_tokens(tokenizer) -> dict[str, int]:
    """{text: id} of the tokenizer's special added tokens."""
    cached = getattr(tokenizer, "_specdec_special_tokens", None)
    if cached is not None:
        return cached
    out: dict[str, int] = {}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token_id, added in decoder.items():
        if getattr(added, "special", False):
            out[str(added.content)] = int(token_id)
    for text in getattr(tokenizer, "all_special_tokens", ()) or ():
        if text not in out:
            token_id = tokenizer.convert_tokens_to_ids(text)
            if isinstance(token_id, int) and token_id >= 0:
                out[text] = token_id
    try:
        tokenizer._specdec_special_tokens = out
    except AttributeError:
        pass
    return out


def sampling_defaults(generation_config: dict) -> dict:
    """The sampling defaults a request inherits when it omits them (validated, typed)."""
    out: dict = {}
    for key in SAMPLING_KEYS:
        value = generation_config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = int(value) if key == "top_k" else float(value)
    return out


def split_special_stops(stop: list[str], tokenizer) -> tuple[list[str], list[int]]:
    """Stop strings that are exactly one special token's text become stop token ids.

    NOTE: special tokens are skipped from the text (skip_special_tokens), so such a stop
    string could never match the text; Continue sends nine of them (`<|endoftext|>`, ...)."""
    specials = special_tokens(tokenizer)
    strings, ids = [], []
    for s in stop:
        token_id = specials.get(s)
        if token_id is None:
            strings.append(s)
        elif token_id not in ids:
            ids.append(token_id)
    return strings, ids
