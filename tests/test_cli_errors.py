"""Bad values on the command line: one line naming the value and the fix, exit 2, no work
done and no file written (each in a fresh process, as a user runs it)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_sample_refuses_bad_values_in_one_line(tmp_path):
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("a red circle caf\xe9\n".encode("latin-1"))
    out = tmp_path / "out"
    cases = [
        (["--guidance=nan"], "--guidance=nan is out of range"),
        (["--guidance=inf"], "--guidance=inf is out of range"),
        (["--guidance=3,nan"], "--guidance=nan is out of range"),
        (["--aug_level=5"], "--aug_level=5.0 is out of range"),
        (["--steps=0"], "--steps=0 is out of range"),
        (["--stages=0"], "--stages (0) must be between 1 and 2"),
        (["--num_images=100000"], "100000 images in one batch; at most 1024"),
        ([f"--seed={2 ** 70}"], "--seed=1180591620717411303424 must be in [0, 2**63)"),
        ([f"--prompts_file={latin1}"], "is not UTF-8 text (byte b'\\xe9' at offset 16)"),
    ]
    for extra, expected in cases:
        prompt = [] if any(a.startswith("--prompts_file") for a in extra) else ["--prompt=a red circle"]
        r = _run(["jaxt2i.sample", *prompt, f"--out={out}", *extra], tmp_path)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2, (extra, r.stderr[-2000:])
        assert len(lines) == 1 and expected in lines[0], (extra, r.stderr[-2000:])
        assert not out.exists() or not os.listdir(out), extra  # nothing written


def test_stablehlo_export_refuses_a_nan_guidance(tmp_path):
    r = _run(["jaxt2i.export", "--format=stablehlo", f"--out={tmp_path / 'hlo'}",
              "--guidance=nan"], tmp_path)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "--guidance=nan is out of range" in lines[0]
    assert not (tmp_path / "hlo").exists()
