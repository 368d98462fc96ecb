"""`python -m jaxt2i.eval` on an unCLIP cascade (prior -> decoder -> SR), built here from tiny
random models, in a fresh process: its scores must be those of the pipeline's own images
(`UnCLIP.generate` with the evaluator's seeds) read by the detector, `--diversity` must count
the distinct layouts of each prompt's samples and measure how far apart they are, and what an
unCLIP cascade does not take is one line. `--model` (the bundled demo to run) is checked against `--checkpoint` here too."""

import json
import os
import subprocess
import sys

import numpy as np
from unclip_helpers import pipe, unclip_dir  # noqa: F401 (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_eval_command_scores_the_pipelines_own_images(unclip_dir, pipe, tmp_path):
    from jaxt2i.eval import detector
    from jaxt2i.eval.evaluate import eval_prompts

    out = tmp_path / "eval"
    r = _run("jaxt2i.eval", f"--checkpoint={unclip_dir}", "--num_prompts=3",
             "--splits=held_out,test", "--diversity=2", f"--out={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prior ddim 4 steps guidance 1 candidates 2" in r.stdout
    record = json.loads((out / "eval.json").read_text())
    assert record["kind"] == "unclip" and record["diversity"] == 2
    assert record["prior"]["checkpoint"] == str(unclip_dir / "prior")
    assert record["checkpoints"] == [str(unclip_dir / "decoder"), str(unclip_dir / "sr")]
    for s_idx, split in enumerate(("held_out", "test")):
        prompts = [c for _, c in eval_prompts(split, 3, 0)]
        # batch 0 of split s samples with seed 1000 * s; the extra samples 100000 later
        images = pipe.generate(prompts, seed=1000 * s_idx)
        extra = pipe.generate(prompts, seed=1000 * s_idx + 100_000)
        lines = [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]
        want = [dict(detector.score(im, p), prompt=p) for im, p in zip(images, prompts)]
        assert json.loads(json.dumps(want)) == lines
        row = record["results"][split]
        assert row["n"] == 3 and row["n_layouts"] == 2
        layouts = [len({detector.layout(a), detector.layout(b)}) for a, b in zip(images, extra)]
        assert row["layouts"] == np.mean(layouts)
        assert f"{row['layouts']:.2f} of 2" in r.stdout
        # how far apart the two samples are: mean |a - b| over pixels, on a 0-1 scale
        dist = np.mean([np.abs(a / 255.0 - b / 255.0).mean() for a, b in zip(images, extra)])
        assert abs(row["pixel_distance"] - dist) < 1e-6
        assert f"{row['pixel_distance']:.3f}" in r.stdout


def test_what_an_unclip_cascade_does_not_take_is_one_line(unclip_dir, tmp_path):
    for args, want in (
            (["--steps=3"], "drop --steps"),
            (["--true_lowres"], "drop --true_lowres"),
            (["--stages=1"], "drop --stages"),
            (["--language=zh"], "trained on English captions only"),
            (["--diversity=1"], "--diversity=1: pass the images per prompt to compare, at "
                                "least 2"),
            (["--model=unclip"], "--model=unclip picks a bundled demo; with --checkpoint")):
        r = _run("jaxt2i.eval", f"--checkpoint={unclip_dir}", "--num_prompts=2",
                 "--splits=held_out", *args)
        assert r.returncode != 0 and want in r.stderr, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr
    r = _run("jaxt2i.sample", f"--checkpoint={unclip_dir}", "--model=imagen", "--prompt=x",
             f"--out={tmp_path / 'o'}")
    assert r.returncode != 0 and "--model=imagen picks a bundled demo" in r.stderr
    assert not (tmp_path / "o").exists()


def test_the_pipeline_refuses_prompts_its_clip_never_learned(pipe):
    import pytest

    from jaxt2i.config import ConfigError

    assert pipe.prior.clip_path == "bundled"
    with pytest.raises(ConfigError, match=r"'一个红色的圆形'.*English captions only.*"
                                          r"--model=imagen"):
        pipe.generate(["一个红色的圆形"])
    with pytest.raises(ConfigError, match="no prompts given"):
        pipe.generate([])


def test_pixel_distance_averages_every_pair_of_a_prompts_samples():
    """K = 3: black, white and mid-grey images are 1, 0.5 and 0.5 apart (mean 2/3); a prompt
    whose samples are identical is 0; the result is the mean over prompts."""
    from jaxt2i.eval.evaluate import pixel_distance

    black, white = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    grey = np.full((4, 4, 3), 255, np.uint8)
    grey[:2] = 0  # half the pixels black: 0.5 from either
    assert abs(pixel_distance([(black, white, grey)]) - 2 / 3) < 1e-6
    assert pixel_distance([(grey, grey)]) == 0.0
    assert abs(pixel_distance([(black, white, grey), (grey, grey, grey)]) - 1 / 3) < 1e-6
