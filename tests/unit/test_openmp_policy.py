"""The entry points set OMP_WAIT_POLICY=passive before torch loads (specdec/cli.py), unless the
user set it. Each case runs in a fresh interpreter: libgomp reads the variable once, when torch
loads it, and this test process has torch loaded already."""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(code: str, **env_overrides) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_overrides)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


SHOW = ("import os, sys; from specdec.cli import default_openmp_wait_policy as f; "
        "print(f(), os.environ.get('OMP_WAIT_POLICY'))")


def test_sets_passive_when_unset():
    assert run_python(SHOW) == "True passive"


@pytest.mark.parametrize("value", ["active", "PASSIVE", ""])
def test_keeps_the_users_value(value):
    assert run_python(SHOW, OMP_WAIT_POLICY=value) == f"False {value}".strip()


def test_does_nothing_once_torch_is_loaded():
    # too late to matter: setting it would only mislead child processes and the reader
    assert run_python("import torch; " + SHOW) == "False None"


@pytest.mark.parametrize("module", ["specdec.cli", "server.__main__"])
def test_entry_points_import_no_torch_before_main(module):
    """main() sets the policy first, which counts only if importing the entry point has not
    loaded torch (and with it libgomp) already."""
    assert run_python(f"import sys, {module}; print('torch' in sys.modules)") == "False"


def test_server_main_sets_it_before_torch_loads():
    # `python -m server` with a bad flag: main() returns 2 after setting the policy, having
    # never imported torch; the policy is what the process would load torch with.
    code = ("import os, sys; import server.__main__ as m; "
            "rc = m.main(['--config', '/nonexistent.toml']); "
            "print(rc, os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    assert run_python(code) == "2 passive False"
