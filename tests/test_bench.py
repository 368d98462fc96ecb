"""python -m jaxt2i.bench: the FLOP counter against closed-form counts and XLA, the phase
reports' ratio arithmetic, the child-process plumbing (with a stand-in imagen-pytorch anchor)
and one-line errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxt2i.bench import jobs
from jaxt2i.bench.runner import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv(x, w, padding="SAME"):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_flop_count_matches_closed_form_and_xla():
    b, h, cin, cout, k, dense_out, steps = 2, 8, 3, 5, 3, 7, 4
    x = jnp.ones((b, h, h, cin))
    w = jnp.ones((k, k, cin, cout))
    d = jnp.ones((cout, dense_out))

    def fwd(w, d, x):
        y = _conv(x, w)  # [b, h, h, cout]
        z = y.reshape(-1, cout) @ d  # [b*h*h, dense_out]

        def body(c, _):
            return c @ jnp.eye(dense_out), None
        z, _ = jax.lax.scan(body, z, None, length=steps)
        return jnp.sum(z)

    conv = 2 * b * h * h * cout * cin * k * k
    mat = 2 * b * h * h * cout * dense_out + steps * 2 * b * h * h * dense_out * dense_out
    got = jobs.jaxpr_flops(jax.make_jaxpr(fwd)(w, d, x))
    assert got["conv"] == conv and got["matmul"] == mat and got["total"] == conv + mat
    # Backward: input- and weight-gradient convolutions cost one forward each.
    grad = jobs.jaxpr_flops(jax.make_jaxpr(jax.grad(fwd, argnums=(0, 1, 2)))(w, d, x))
    assert grad["conv"] == 3 * conv
    # XLA's own count of a compiled forward agrees (without a loop, whose body XLA counts
    # once, and with VALID padding: XLA skips the taps that fall on SAME padding).
    plain = lambda w, d, x: _conv(x, w, "VALID").reshape(-1, cout) @ d
    hw = jobs.xla_flops(jax.jit(plain).lower(w, d, x).compile())
    o = h - k + 1
    want = 2 * b * o * o * cout * (cin * k * k + dense_out)
    assert jobs.jaxpr_flops(jax.make_jaxpr(plain)(w, d, x))["total"] == want
    assert hw is not None and 0.95 < hw / want < 1.3


def test_report_pairs_ratios_with_the_anchor():
    ours = {"train_base": {"params": 23e6, "batch": 8, "median_s": 0.5, "images_per_s": 16.0,
                           "peak_rss_mb": 900.0},
            "train_sr": {"error": "exit 1: boom"},
            "sample_base": {"s_per_step": 0.1, "s_per_step_no_guidance": 0.06, "batch": 4},
            "cascade": {"total_s": 2.0, "steps_per_stage": 4, "output_shape": [4, 256, 256, 3]}}
    theirs = {"train_base": {"images_per_s": 6.4, "peak_rss_mb": 2700.0},
              "sample_base": {"cfg5_standard": {"median_s": 0.54}, "no_cfg": {"median_s": 0.27}},
              "cascade": {"total_s": 11.0}}
    text, rec = report("train", ours, theirs)
    assert rec["train_base"]["speedup"] == pytest.approx(16.0 / 6.4)
    assert rec["errors"] == {"train_sr": "exit 1: boom"} and "2.5" in text
    ours["train_base"].update(flops_analytic=4e9, median_s=0.5, peak_flops_per_s=1e10, mfu=0.8)
    text, rec = report("mfu", ours, theirs)
    assert rec["train_base"]["mfu"] == 0.8 and "80.0%" in text and "train_sr" in rec["errors"]
    _, rec = report("sample", ours, theirs)
    assert rec["sample_base (guidance 5)"]["speedup"] == pytest.approx(5.4)
    assert rec["sample_base (no guidance)"]["speedup"] == pytest.approx(4.5)
    assert rec["sample_sr (guidance 5)"]["speedup"] is None  # no data: no ratio
    assert rec["cascade"]["speedup"] == pytest.approx(5.5)


def _bench(*args, timeout=900):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxt2i.bench", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


def test_cli_mistakes_are_one_line(tmp_path):
    p = _bench("--phases=train,bogus")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert "bogus" in p.stderr and "quality" in p.stderr
    p = _bench("--vs-imagen-pytorch", f"--imagen_pytorch_script={tmp_path}/missing.py")
    assert p.returncode == 2 and "missing.py" in p.stderr and p.stderr.strip().count("\n") == 0
    p = _bench("--vs-imagen-pytorch", f"--anchor_python={tmp_path}/no/python")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert "is not an executable Python" in p.stderr
    # The test environment has no imagen-pytorch (it lives in a venv of its own).
    p = _bench("--vs-imagen-pytorch", f"--anchor_python={sys.executable}")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "imagen_pytorch" in p.stderr and "--anchor_python=.venv-anchor/bin/python" in p.stderr


FAKE_ANCHOR = """
import json, sys
phase = sys.argv[sys.argv.index('--phase') + 1]
out = {'train_base': {'images_per_s': 2.0, 'median_s': 4.0, 'peak_rss_mb': 10.0},
       'train_sr': {'images_per_s': 1.0, 'median_s': 4.0, 'peak_rss_mb': 20.0}}[phase]
print('CHILD_JSON ' + json.dumps({phase: out, '_meta': {'torch': 'fake'}}))
"""


@pytest.mark.slow
def test_train_and_mfu_end_to_end_with_a_stand_in_anchor(tmp_path):
    """Tiny models through the real child processes; the 'imagen-pytorch' side is a stand-in
    script, so the pairing and ratios are checked without torch."""
    fake = tmp_path / "fake_anchor.py"
    fake.write_text(FAKE_ANCHOR)
    out = tmp_path / "bench.json"
    p = _bench("--tiny", "--quick", "--phases=train", "--vs-imagen-pytorch",
               f"--imagen_pytorch_script={fake}", f"--anchor_python={sys.executable}",
               f"--json={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith('{"bench"')]
    assert [r["phase"] for r in lines] == ["train"]
    data = json.loads(out.read_text())
    train = data["phases"][0]
    for job, theirs_ips in (("train_base", 2.0), ("train_sr", 1.0)):
        mine = data["jobs"][job]
        assert mine["median_s"] > 0 and mine["images_per_s"] == pytest.approx(
            mine["batch"] / mine["median_s"])
        assert train[job]["speedup"] == pytest.approx(mine["images_per_s"] / theirs_ips)
        # MFU is analytic FLOPs / time / peak, and XLA's count agrees with the analytic one.
        assert mine["mfu"] == pytest.approx(
            mine["flops_analytic"] / mine["median_s"] / mine["peak_flops_per_s"])
        assert 0 < mine["mfu"] < 1.5
        assert 0.8 < mine["xla_over_analytic"] < 1.5
        assert mine["compile_s"] > 0 and mine["peak_rss_mb"] > 100
    assert data["meta"]["imagen_pytorch"] == {"torch": "fake"}


def test_a_timed_out_job_keeps_what_it_reported():
    """A job stopped by --timeout used to lose everything it had measured (a 30 min quality
    run came back empty); the runner now keeps its last tagged partial result."""
    import sys

    from jaxt2i.bench.runner import CHILD_TAG, _run

    code = (f"import json, time; print({CHILD_TAG!r} + json.dumps({{'rows': [1, 2]}}), "
            "flush=True); time.sleep(60)")
    out = _run([sys.executable, "-c", code], None, 5, CHILD_TAG, lambda d: d)
    assert out["rows"] == [1, 2] and out["error"].startswith("timed out after 5 s")
    out = _run([sys.executable, "-c", "import time; time.sleep(60)"], None, 2, CHILD_TAG,
               lambda d: d)
    assert set(out) == {"error"}
    crash = code.replace("time.sleep(60)", "raise SystemExit(3)")
    out = _run([sys.executable, "-c", crash], None, 30, CHILD_TAG, lambda d: d)
    assert out["rows"] == [1, 2] and out["error"].startswith("exit 3")



def test_quality_job_runs_the_chosen_samplers(monkeypatch):
    """`--quality_samplers/--quality_steps` pick the rows (the 25-step reference always runs);
    Heun's evaluations are counted from its grid: 3 steps on the demo's cosine schedule are
    Euler from sigma_e 22026, Heun, then the last (Euler) step: 4 calls, not 2n - 1 = 5."""
    from jaxt2i.eval import evaluate

    seen = []

    def fake(cascade, *, splits, num_prompts, settings, num_stages, progress):
        seen.append((settings[0].sampler, settings[0].steps, num_prompts, num_stages))
        return {"results": {s: {"whole": 0.5} for s in splits}, "seconds": 1.0,
                "image_size": 32}

    monkeypatch.setattr(evaluate, "evaluate_cascade", fake)
    reports = []
    out = jobs.job_quality(False, num_prompts=3, stages=1, report=reports.append,
                           samplers=("heun", "ddim"), steps_list=(3, 5))
    assert seen == [("dpmpp_2m", 25, 3, 1), ("heun", 3, 3, 1), ("ddim", 3, 3, 1),
                    ("heun", 5, 3, 1), ("ddim", 5, 3, 1)]
    assert [(r["name"], r["nfe"]) for r in out["rows"]] == [
        ("dpmpp_2m_25", 25), ("heun_3", 4), ("ddim_3", 3), ("heun_5", 8), ("ddim_5", 5)]
    assert reports[0]["partial"] == "1 of 5 runs" and len(reports) == 5


def test_quality_flags_reach_the_child_process(monkeypatch):
    from jaxt2i.bench import runner

    cmds = []
    monkeypatch.setattr(runner, "_run", lambda cmd, *a: cmds.append(cmd) or {})
    runner.run_child("quality", {"cascade_steps": 4, "memory_batch": None, "quality_prompts": 2,
                                 "quick": False, "quality_samplers": ("heun", "euler"),
                                 "quality_steps": (10, 15)}, 60)
    assert "--quality_samplers=heun,euler" in cmds[0] and "--quality_steps=10,15" in cmds[0]
