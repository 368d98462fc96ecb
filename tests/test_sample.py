"""Cascade sampler and `python -m jaxt2i.sample`: a tiny two-stage cascade end to end."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jaxt2i.cascade import Cascade, check_compatible, load_cascade, resolve_stage_dirs
from jaxt2i.config import ConfigError
from jaxt2i.cli import per_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cascade_dir(tiny_cascade_dir):
    return tiny_cascade_dir


@pytest.fixture(scope="module")
def cascade(cascade_dir) -> Cascade:
    return load_cascade(str(cascade_dir))


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jaxt2i.sample", *map(str, args)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def test_cli_end_to_end(cascade_dir, tmp_path):
    out = tmp_path / "out"
    r = _cli("--prompt=a red circle", "--prompt=a blue square", "--num_images=2", "--seed=3",
             f"--checkpoint={cascade_dir}", "--steps=2,2", "--guidance=3", f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((out / "sample.json").read_text())
    assert record["prompts"] == ["a red circle", "a blue square"]
    assert record["seed"] == 3 and record["stages"] == 2
    assert [s["steps"] for s in record["settings"]] == [2, 2]
    assert [s["guidance"] for s in record["settings"]] == [3.0, 3.0]
    assert record["settings"][1]["sampler"] == "ddim"  # tiny_sr's saved default
    assert len(record["images"]) == 4
    for item in record["images"]:
        with Image.open(out / item["file"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    with Image.open(out / "grid.png") as im:
        im.verify()


def test_determinism_and_no_recompilation(cascade):
    prompts = ["a red circle", "two green stars"]
    settings = cascade.settings([{"steps": 2}, {"steps": 2}])
    a, outs = cascade.sample(prompts, seed=0, settings=settings, return_all=True)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert [o.shape for o in outs] == [(2, 16, 16, 3), (2, 32, 32, 3)]
    # jit's own cache size (a private jax API, read here only) counts compiled programs
    traces, sizes = list(cascade.traces), [cascade.stage_fn(k)._cache_size() for k in range(2)]
    b = cascade.sample(prompts, seed=0, settings=settings)
    np.testing.assert_array_equal(a, b)
    assert cascade.traces == traces  # same shapes and settings: no new trace
    assert [cascade.stage_fn(k)._cache_size() for k in range(2)] == sizes
    c = cascade.sample(prompts, seed=1, settings=settings)
    assert not np.array_equal(a, c)
    assert cascade.traces == traces  # a new seed is data, not a new program
    base_only = cascade.sample(prompts, seed=0, settings=settings[:1], num_stages=1)
    assert base_only.shape == (2, 16, 16, 3)


def test_start_stage_continues_from_given_lowres_images(cascade):
    """Stage 1 fed stage 0's own output reproduces the full cascade exactly (same seed), and a
    different low-res input gives different images; bad low-res input is one clear error."""
    prompts = ["a red circle", "two green stars"]
    settings = cascade.settings([{"steps": 2}, {"steps": 2}])
    full, outs = cascade.sample(prompts, seed=5, settings=settings, return_all=True)
    sr, sr_outs = cascade.sample(prompts, seed=5, settings=settings, start_stage=1,
                                 lowres=outs[0], return_all=True)
    np.testing.assert_array_equal(sr, full)
    assert len(sr_outs) == 1 and sr_outs[0].shape == (2, 32, 32, 3)
    white = np.full((2, 16, 16, 3), 255, np.uint8)  # uint8 input: 255 -> +1
    np.testing.assert_array_equal(
        cascade.sample(prompts, seed=5, settings=settings, start_stage=1, lowres=white),
        cascade.sample(prompts, seed=5, settings=settings, start_stage=1,
                       lowres=np.ones((2, 16, 16, 3), np.float32)))
    assert not np.array_equal(
        cascade.sample(prompts, seed=5, settings=settings, start_stage=1, lowres=white), full)
    with pytest.raises(ConfigError, match=r"start_stage 1 needs lowres images of shape \(2, 16, 16, 3\)"):
        cascade.sample(prompts, settings=settings, start_stage=1)
    with pytest.raises(ConfigError, match=r"shape \(2, 8, 8, 3\) but stage 1 takes stage 0's output"):
        cascade.sample(prompts, settings=settings, start_stage=1, lowres=white[:, :8, :8])
    with pytest.raises(ConfigError, match="dtype int64; pass uint8 in"):  # not clipped silently
        cascade.sample(prompts, settings=settings, start_stage=1, lowres=white.astype(np.int64))
    with pytest.raises(ConfigError, match="only used with start_stage > 0"):
        cascade.sample(prompts, settings=settings, lowres=white)
    with pytest.raises(ConfigError, match=r"start_stage \(2\) must be between 0 and 1"):
        cascade.sample(prompts, settings=settings, start_stage=2, lowres=white)


def test_compatibility_checks(cascade_dir, cascade):
    base = str(cascade_dir / "base")
    with pytest.raises(ConfigError, match="stage 1 .* is a base stage"):
        load_cascade([base, base])
    with pytest.raises(ConfigError, match="stage 0 .* super-resolution"):
        check_compatible(cascade.stages[1:])
    with pytest.raises(ConfigError, match="text_dim 128 but the text encoder's width is 7"):
        check_compatible(cascade.stages, text_width=7)
    assert len(resolve_stage_dirs([str(cascade_dir)])) == 2
    with pytest.raises(ConfigError, match="has 40 tokens but the text encoder's max_length is 32"):
        cascade.check_prompts(["red " * 39])


class _StubSR:
    """Stands in for an SR stage's U-Net (`Stage.model`): a fixed, bounded x0 prediction."""

    def __init__(self, image_size=16, lowres_size=8):
        from types import SimpleNamespace

        self.config = SimpleNamespace(is_sr=True, image_size=image_size, channels=3,
                                      lowres_size=lowres_size, objective="x0")

    def apply(self, variables, x_t, model_t, text_emb, text_mask, lowres=None, aug_level=None):
        import jax

        up = jax.image.resize(lowres, x_t.shape, "nearest")
        return 0.5 * up + 0.3 * jax.numpy.tanh(x_t) + 0.1 * text_emb.mean((1, 2))[:, None, None, None]


def _run_stub_stage(sampler, seed=0):
    """(output, augmentation noise, [step noises]) of a stub SR stage's reverse process."""
    import jax
    import jax.numpy as jnp

    from jaxt2i.diffusion import noising, samplers
    from jaxt2i.models.unet import get_unet_config
    from jaxt2i.stage import Stage, StageConfig, StageSettings

    aug, steps = [], []
    real_q_sample, real_ddpm = noising.q_sample, samplers.DDPM.update

    def q_sample(x0, t, noise, schedule):
        aug.append(np.asarray(noise))
        return real_q_sample(x0, t, noise, schedule)

    def update(self, state, denoised, s, t, noise):
        steps.append(np.asarray(noise))
        return real_ddpm(self, state, denoised, s, t, noise)

    rng = np.random.default_rng(1)
    emb = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    mask = jnp.ones((2, 4), bool)
    lowres = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    settings = StageSettings(sampler=sampler, steps=4, guidance=1.0, thresholding="none",
                             aug_level=0.3)
    unet = get_unet_config("tiny_sr", image_size=16, lowres_size=8, text_dim=8,
                           objective="x0").to_dict()
    stage = Stage(StageConfig.from_dict({
        "model": unet, "text": {"encoder": "bundled", "max_length": 4},
        "diffusion": {"schedule": "cosine", "aug_schedule": "cosine"},
        "sample": settings.to_dict()}))
    stage.model = _StubSR()
    with pytest.MonkeyPatch.context() as mp, jax.disable_jit():  # eager: noises are concrete
        mp.setattr(noising, "q_sample", q_sample)
        mp.setattr(samplers.DDPM, "update", update)
        x = stage.sample({}, (emb, mask), (emb[:1], mask[:1]), jax.random.key(seed), lowres,
                         settings=settings)
    return np.asarray(x), aug, steps


def test_sr_augmentation_and_sampler_noise_are_independent():
    """Issue #23: an SR stage drew its augmentation noise from fold_in(rng, 1), which (with
    jax_threefry_partitionable) is the key of diffusion.sample's step noise, so step 1's noise
    repeated the augmentation noise (correlation 1)."""
    _, aug, steps = _run_stub_stage("ddpm")
    assert len(aug) == 1 and len(steps) == 4
    a = aug[0].ravel()  # 384 values: |corr| of independent draws is < 0.2 all but ~1e-4 of the time
    for i, noise in enumerate(steps):
        n = noise.ravel()
        assert n.size > a.size
        for part in (n[:a.size], n[-a.size:]):
            corr = np.corrcoef(a, part)[0, 1]
            assert abs(corr) < 0.2, f"step {i}: correlation {corr:.3f} with the augmentation noise"
        assert not np.isin(a, n).any(), f"step {i} reuses augmentation noise values"


def test_sr_deterministic_sampler_output_is_unchanged_by_the_key_fix():
    """The fix only moves the step noise: a deterministic sampler's SR output is what
    diffusion.sample(rng) gives with the augmentation noise of fold_in(rng, 1) (so the bundled
    demo's images for a seed stay the same)."""
    import jax
    import jax.numpy as jnp

    from jaxt2i import diffusion

    got, aug, _ = _run_stub_stage("ddim", seed=4)
    key = jax.random.key(4)
    rng = np.random.default_rng(1)
    emb = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    mask = jnp.ones((2, 4), bool)
    lowres = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    low, level = diffusion.noise_augment(jax.random.fold_in(key, 1), lowres, level=0.3)
    np.testing.assert_array_equal(low, diffusion.q_sample(lowres, level, aug[0], "cosine"))
    stub = _StubSR()
    want = diffusion.sample(
        lambda x, t, c: stub.apply({}, x, t, emb, mask, lowres=low), (2, 16, 16, 3), key,
        schedule="cosine", sampler="ddim", num_steps=4, prediction="x0")
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_per_stage_values():
    assert per_stage("steps", "25,10", 2) == [25, 10]
    assert per_stage("guidance", "4", 3) == [4.0, 4.0, 4.0]
    assert per_stage("sampler", None, 2) == [None, None]
    with pytest.raises(ConfigError, match="one per stage"):
        per_stage("steps", "1,2,3", 2)


@pytest.mark.parametrize("case", ["missing", "base+base", "long prompt", "no prompts",
                                  "bad steps"])
def test_cli_errors(case, cascade_dir, tmp_path):
    base = f"--checkpoint={cascade_dir / 'base'}"
    args, expected = {
        "missing": ([f"--checkpoint={tmp_path / 'nope'}", "--prompt=a"], "does not exist"),
        "base+base": ([base, base, "--prompt=a"], "stage 1 .* is a base stage"),
        "long prompt": ([f"--checkpoint={cascade_dir}", "--prompt=" + "red " * 39],
                        "has 40 tokens but the text encoder's max_length is 32"),
        "no prompts": ([f"--checkpoint={cascade_dir}"], "no prompts given"),
        "bad steps": ([f"--checkpoint={cascade_dir}", "--prompt=a", "--steps=1,2,3"],
                      "--steps=1,2,3 has 3 values"),
    }[case]
    r = _cli(*args, f"--out={tmp_path / 'out'}")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_default_is_the_bundled_demo_cascade(tmp_path):
    out = tmp_path / "out"
    r = _cli("--prompt=a red circle above a blue square", "--stages=1", "--steps=2", f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((out / "sample.json").read_text())
    demo = os.path.join(ROOT, "jaxt2i", "assets", "demo_cascade")
    assert record["checkpoints"][0].startswith(demo)
    cascade = json.loads(open(os.path.join(demo, "cascade.json")).read())
    assert len(cascade["stages"]) == 2 and record["steps_trained"][0] > 0
    with Image.open(out / "000.png") as im:
        assert im.size == (32, 32)


def test_demo_refuses_a_prompt_it_cannot_read(tmp_path):
    """Issue #23: with the bundled demo, a Chinese prompt became one <unk> (the same images as
    any other unknown text) without a word; now it is one line naming the prompt and characters.
    Issue #28: the demo reads the shapes world in Chinese; a Chinese prompt outside it is one
    line with Chinese examples it can draw, naming the multilingual encoders a real model needs."""
    out = tmp_path / "out"
    r = _cli("--prompt=一只可爱的猫", "--num_images=2", f"--out={out}")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith("error: prompt '一只可爱的猫' has text the tokenizer does not "
                               "know: '只', '可', '爱', '猫'; ")  # 一 and 的 are shapes words
    assert ("the bundled demo encoder knows only the shapes world's words: the demo draws "
            "coloured shapes on plain backgrounds, from Chinese prompts such as "
            "'一个红色的圆形在一个蓝色的正方形上面'") in lines[0]
    assert lines[0].endswith("sample a real model (--checkpoint=DIR) with a multilingual text "
                             "encoder: mT5, umT5 or ByT5 (see docs/text-encoder.md)")
    assert not list(tmp_path.rglob("*.png")) and not (out / "sample.json").exists()
    # An English prompt outside the world: its letters are tokens, the word is not.
    r = _cli("--prompt=a cat", f"--out={out}")
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("error: prompt 'a cat' has words the tokenizer does not know: "
                               "'cat'; the bundled demo encoder knows only")
    assert "e.g. 'a red circle above a blue square' or 'two green triangles'" in lines[0]
    assert not list(tmp_path.rglob("*.png"))


def test_eval_cli(cascade_dir, tmp_path):
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "jaxt2i.eval", f"--checkpoint={cascade_dir}",
                        "--num_prompts=3", "--batch_size=2", "--steps=2", "--reference",
                        "--true_lowres", f"--out={out}"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads((out / "eval.json").read_text()) == record
    assert record["image_size"] == 32 and [s["steps"] for s in record["settings"]] == [2, 2]
    rows = record["results"]
    assert set(rows) == {"held_out", "test", "held_out (true renders)", "test (true renders)",
                         "held_out (SR of true 16 px)", "test (SR of true 16 px)",
                         "held_out (true 16 px, bilinear)", "test (true 16 px, bilinear)"}
    assert rows["test (SR of true 16 px)"]["n"] == 3
    assert rows["held_out"]["n"] == 3
    assert rows["held_out (true renders)"]["whole"] == 1.0  # the detector reads 32 px renders
    for split in ("held_out", "test"):
        assert len((out / f"{split}.jsonl").read_text().splitlines()) == 3
        assert len((out / f"{split}_sr_true.jsonl").read_text().splitlines()) == 3
        assert re.search(rf"^{re.escape(split)}\s+\d", r.stdout, re.M)
    bad = subprocess.run([sys.executable, "-m", "jaxt2i.eval", f"--checkpoint={cascade_dir}",
                          "--splits=held_out,nope"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "'nope' is not one of" in bad.stderr.strip()
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    bad = subprocess.run([sys.executable, "-m", "jaxt2i.eval", f"--checkpoint={cascade_dir}",
                          "--stages=1", "--true_lowres"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--true_lowres needs a super-resolution stage" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def _eval(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jaxt2i.eval", *map(str, args)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def test_eval_cli_languages(cascade_dir, tmp_path):
    """Issue #28: `--language=both` on a cascade whose encoder reads no Chinese (the bundled
    encoder as it was before it had Chinese words, which older exports carry) is one line before
    any sampling; `--renders_only` scores the same scenes' true renders against English and
    Chinese prompts side by side."""
    from bilingual_helpers import english_only_encoder

    english_only_encoder(tmp_path / "english_only")
    r = _eval(f"--checkpoint={cascade_dir}", "--language=both", "--num_prompts=2",
              f"--text_encoder={tmp_path / 'english_only'}", f"--out={tmp_path / 'refused'}")
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith("error: --language=both: prompt '"), lines[0]
    assert "cannot read Chinese yet" in lines[0] and "'一个红色的圆形在一个蓝色的正方形上面'" in lines[0]
    assert lines[0].endswith("evaluate English prompts with --language=en, or score the true "
                             "renders alone with --renders_only"), lines[0]
    assert not list(tmp_path.rglob("*.png"))

    out = tmp_path / "renders"
    r = _eval(f"--checkpoint={cascade_dir}", "--language=both", "--renders_only",
              "--num_prompts=4", f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(r.stdout.strip().splitlines()[-1])
    assert record["language"] == "both" and record["renders_only"] and record["image_size"] == 32
    rows = record["results"]
    assert list(rows) == ["held_out (true renders)", "held_out (zh, true renders)",
                          "test (true renders)", "test (zh, true renders)"]
    assert all(row["n"] == 4 and row["whole"] == 1.0 for row in rows.values()), rows
    assert "4 prompts per split (English and Chinese), 32 px, true renders only" in r.stdout
    assert re.search(r"^held_out \(zh, true renders\)\s+100\.0%", r.stdout, re.M), r.stdout
    zh = [json.loads(x)["prompt"] for x in (out / "held_out_zh.jsonl").read_text().splitlines()]
    en = [json.loads(x)["prompt"] for x in (out / "held_out.jsonl").read_text().splitlines()]
    from jaxt2i.data import shapes

    assert [shapes.parse_caption(p) for p in zh] == [shapes.parse_caption(p) for p in en]
    assert all(re.search("[\u4e00-\u9fff]", p) for p in zh)

    bad = _eval(f"--checkpoint={cascade_dir}", "--language=fr")
    lines = [line for line in bad.stderr.strip().splitlines() if line.strip()]
    assert bad.returncode != 0 and len(lines) == 1 and "--language" in lines[0], bad.stderr


@pytest.mark.slow  # two evaluations of the demo (~2 min on 2 cores)
def test_eval_language_commands_of_the_docs():
    """docs/sampling.md: `python -m jaxt2i.eval --language=both --renders_only` (the detector
    on the bundled demo's scenes in both languages) and `python -m jaxt2i.eval --language=both
    --num_prompts=4` (the demo sampled from the same scenes in English and in Chinese)."""
    r = _eval("--language=both", "--renders_only")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])["results"]
    assert set(rows) == {"held_out (true renders)", "held_out (zh, true renders)",
                         "test (true renders)", "test (zh, true renders)"}
    assert all(row["n"] == 100 and row["whole"] == 1.0 for row in rows.values()), rows
    r = _eval("--language=both", "--num_prompts=4", timeout=850)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])["results"]
    assert list(rows) == ["held_out", "held_out (zh)", "test", "test (zh)"], list(rows)
    assert all(row["n"] == 4 and 0 <= row["whole"] <= 1 for row in rows.values()), rows
    # The demo draws from Chinese prompts: most colours right (chance is 1 in 6).
    assert rows["test (zh)"]["colour"] >= 0.5, rows


def test_eval_aug_level_sweep_cli(cascade_dir, tmp_path):
    """docs/evaluation: `python -m jaxt2i.eval --aug_levels=...` prints one row per split and
    level and writes them into its JSON record; a bad level is one line."""
    out = tmp_path / "sweep"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "jaxt2i.eval", f"--checkpoint={cascade_dir}",
                        "--num_prompts=2", "--batch_size=2", "--steps=2", "--splits=held_out",
                        "--aug_levels=0,0.4", f"--out={out}"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert time.perf_counter() - t0 < 120
    record = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads((out / "eval.json").read_text()) == record
    assert record["aug_levels"] == [0.0, 0.4] and record["aug_stage"] == 1
    assert set(record["results"]) == {"held_out (aug 0)", "held_out (aug 0.4)"}
    assert all(row["n"] == 2 for row in record["results"].values())
    for row in ("held_out (aug 0)", "held_out (aug 0.4)"):
        assert re.search(rf"^{re.escape(row)}\s+\d", r.stdout, re.M), r.stdout
    assert len((out / "held_out_aug0.4.jsonl").read_text().splitlines()) == 2
    bad = subprocess.run([sys.executable, "-m", "jaxt2i.eval", f"--checkpoint={cascade_dir}",
                          "--aug_levels=0,2"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "--aug_levels: 2.0 is not an augmentation level in [0, 1]" in bad.stderr


def test_fewer_prompts_than_a_batch_sample_no_padding(cascade, monkeypatch):
    """--num_prompts=3 with the default --batch_size=32 samples batches of 3, not 32 padded
    images; more prompts than a batch still pad the last batch to the same shape."""
    from jaxt2i.eval.evaluate import evaluate_cascade

    sizes, real = [], cascade.sample
    monkeypatch.setattr(cascade, "sample",
                        lambda prompts, *a, **k: sizes.append(len(prompts)) or real(prompts, *a, **k))
    plain = [s.replace(steps=2) for s in cascade.settings()]
    kw = dict(splits=["test"], settings=plain, progress=False)
    few = evaluate_cascade(cascade, num_prompts=3, **kw)  # batch_size: the default 32
    assert sizes == [3] and few["results"]["test"]["n"] == 3
    sizes.clear()
    more = evaluate_cascade(cascade, num_prompts=5, batch_size=2, **kw)
    assert sizes == [2, 2, 2] and more["results"]["test"]["n"] == 5
    assert len(more["per_image"]["test"]) == 5


def test_aug_level_sweep_rows_equal_plain_runs_at_each_level(cascade):
    """The sweep samples the base once and the SR stage per level: each level's images are
    the ones a plain evaluation at that level gives."""
    from jaxt2i.eval.evaluate import evaluate_cascade

    plain = [s.replace(steps=2) for s in cascade.settings()]
    kw = dict(splits=["test"], num_prompts=3, batch_size=2, progress=False)
    swept = evaluate_cascade(cascade, settings=plain, aug_levels=[0.0, 0.5], **kw)
    for level in (0.0, 0.5):
        at = [plain[0], plain[1].replace(aug_level=level)]
        want = evaluate_cascade(cascade, settings=at, **kw)
        assert swept["per_image"][f"test_aug{level:g}"] == want["per_image"]["test"]
        assert swept["results"][f"test (aug {level:g})"] == want["results"]["test"]
    with pytest.raises(ConfigError, match=r"--aug_stage \(0\) must name a super-resolution"):
        evaluate_cascade(cascade, aug_levels=[0.1], aug_stage=0, **kw)


def test_hyphenated_flag_spellings(cascade_dir, tmp_path):
    out = tmp_path / "out"
    r = _cli("--prompt=a red circle", "--num-images=2", f"--checkpoint={cascade_dir}",
             "--steps=1", "--stages=1", "--no-progress", f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "sample.json").read_text())["num_images"] == 2
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n\na green star\n")
    r = _cli(f"--prompts-file={prompts}", f"--checkpoint={cascade_dir}", "--steps=1",
             "--stages=1", f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "sample.json").read_text())["prompts"] == ["a blue square",
                                                                        "a green star"]
