"""Editing (#27): negative prompts, image-to-image, inpainting (RePaint), guidance rescale and
interval, the thresholding percentile: the loop against numpy references, the cascade API, and
`python -m jaxt2i.sample` with the editing flags in fresh processes."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxt2i import diffusion
from jaxt2i.cascade import load_cascade
from jaxt2i.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (2, 6)
N = 1000  # discrete linear schedule (diffusers' DDPM defaults)
ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, N, dtype=np.float64))


def _trailing(n):  # diffusers' 'trailing' timesteps
    return np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1


def _recording_model(calls):
    """eps = 0.5 x + cond; records (t, x) of every call (the cond half when guided)."""
    def model(x, t, c):
        jax.debug.callback(lambda t_, x_: calls.append((float(t_[0]), np.asarray(x_))), t, x)
        return 0.5 * x + c["v"]
    return model


def _cond():
    return ({"v": jnp.array([[0.3] * 6, [-0.2] * 6], jnp.float32)},
            {"v": jnp.zeros((1, 6), jnp.float32)})


def test_strength_starts_from_the_noised_init_and_runs_the_last_steps_only():
    calls = []
    cond, _ = _cond()
    init = jnp.asarray(np.linspace(-1, 1, 12).reshape(SHAPE), jnp.float32)
    rng = jax.random.key(3)
    fn = jax.jit(lambda r, s: diffusion.sample(
        _recording_model(calls), SHAPE, r, schedule="discrete_linear", sampler="ddim",
        num_steps=10, cond=cond, init=init, strength=s))
    fn(rng, 0.45)
    jax.effects_barrier()
    # floor(0.45 * 10) = 4 steps run: diffusers' img2img timesteps[t_start:], t_start = 6.
    assert [t for t, _ in calls] == list(_trailing(10)[6:].astype(float))
    noise = np.asarray(jax.random.normal(jax.random.split(rng)[0], SHAPE, jnp.float32))
    a = ABAR[_trailing(10)[6]]
    np.testing.assert_allclose(calls[0][1], np.sqrt(a) * np.asarray(init)
                               + np.sqrt(1 - a) * noise, atol=1e-5)
    calls.clear()
    fn(rng, 0.9)  # a new strength: no new trace, 9 steps
    jax.effects_barrier()
    assert len(calls) == 9 and fn._cache_size() == 1


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m"])
def test_strength_one_is_sampling_from_noise(sampler):
    cond, uncond = _cond()
    kw = dict(schedule="cosine", sampler=sampler, num_steps=6, cond=cond, uncond=uncond,
              guidance_scale=3.0)
    model = lambda x, t, c: 0.5 * x + c["v"] * t[:, None]  # noqa: E731
    plain = jax.jit(lambda: diffusion.sample(model, SHAPE, jax.random.key(1), **kw))()
    edited = jax.jit(lambda s: diffusion.sample(model, SHAPE, jax.random.key(1),
                                                init=jnp.ones(SHAPE), strength=s, **kw))(1.0)
    # The same computation, compiled inside a lax.cond: equal up to XLA's fusion choices.
    np.testing.assert_allclose(edited, plain, rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(plain)).max() > 0.1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("resample", [0, 2])
def test_inpainting_keeps_the_unmasked_region_and_jumps_back(sampler, resample):
    calls = []
    cond, _ = _cond()
    init = jnp.asarray(np.linspace(-1, 1, 12).reshape(SHAPE), jnp.float32)
    mask = jnp.array([[1, 1, 1, 0, 0, 0]] * 2, jnp.float32)  # generate the first 3 columns
    out = diffusion.sample(_recording_model(calls), SHAPE, jax.random.key(0),
                           schedule="discrete_linear", sampler=sampler, num_steps=5, cond=cond,
                           prediction="eps", init=init, mask=mask, resample=resample)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(out)[:, 3:], np.asarray(init)[:, 3:])
    assert np.abs(np.asarray(out)[:, :3] - np.asarray(init)[:, :3]).max() > 1e-2
    assert len(calls) == 5 * (resample + 1)  # every step is redone `resample` times
    # Each call after the first sees the kept region at the level of its own timestep:
    # sqrt(abar) init + sqrt(1 - abar) z has unit-ish spread around sqrt(abar) init.
    ts = sorted({t for t, _ in calls}, reverse=True)
    assert ts == list(_trailing(5).astype(float))


def test_inpainting_needs_init_and_resample_needs_a_mask():
    model = lambda x, t, c: x  # noqa: E731
    with pytest.raises(ValueError, match="need an init image"):
        diffusion.sample(model, SHAPE, jax.random.key(0), schedule="cosine",
                         mask=jnp.ones(SHAPE))
    with pytest.raises(ValueError, match="needs a mask"):
        diffusion.sample(model, SHAPE, jax.random.key(0), schedule="cosine",
                         init=jnp.ones(SHAPE), strength=0.5, resample=2)


def test_guidance_rescale_matches_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    rng = np.random.default_rng(0)
    cond, unc = rng.standard_normal((2, 3, 8, 8, 4)).astype(np.float32)
    cond *= 0.5
    w, phi = 7.5, 0.7

    def fn(x, t, c):  # the batched call returns [cond; uncond]
        return jnp.concatenate([jnp.asarray(cond), jnp.asarray(unc)])
    got = diffusion.guided_denoise(fn, jnp.zeros((3, 8, 8, 4)), jnp.zeros(3), {"a": jnp.zeros(
        (3, 1))}, {"a": jnp.zeros((1, 1))}, w, rescale=phi)
    guided = unc + w * (cond - unc)
    want = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond), phi).numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.35, 0.75), (0.0, 0.05)])
def test_guidance_interval_against_a_numpy_ddim_loop(interval):
    """DDIM with guidance only for t / N in [lo, hi], against DDIM written out in numpy."""
    cond, uncond = _cond()
    w, n = 4.0, 8
    got = diffusion.sample(lambda x, t, c: 0.5 * x + c["v"], SHAPE, jax.random.key(2),
                           schedule="discrete_linear", sampler="ddim", num_steps=n, cond=cond,
                           uncond=uncond, guidance_scale=w, guidance_interval=interval)
    x = np.asarray(jax.random.normal(jax.random.split(jax.random.key(2))[0], SHAPE), np.float64)
    c = np.asarray(cond["v"], np.float64)
    ts = _trailing(n)
    for i, t in enumerate(ts):
        ww = w if interval[0] <= t / N <= interval[1] else 1.0
        eps = (0.5 * x) + ww * c  # uncond + w (cond - uncond), uncond = 0.5 x
        a = ABAR[t]
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        a_next = ABAR[ts[i + 1]] if i + 1 < n else 1.0
        x = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps
    np.testing.assert_allclose(np.asarray(got), x, rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------- the cascade

@pytest.fixture(scope="module")
def cascade(tiny_cascade_dir):
    return load_cascade(str(tiny_cascade_dir))


def test_cascade_negative_prompts_and_edits_without_recompiling(cascade):
    prompts = ["a red circle", "a blue square"]
    settings = cascade.settings([{"steps": 3, "guidance": 20.0}, {"steps": 2}])
    _, plain = cascade.sample(prompts, seed=1, settings=settings, return_all=True)
    _, same = cascade.sample(prompts, seed=1, settings=settings, negative_prompts="",
                             return_all=True)
    np.testing.assert_array_equal(same[0], plain[0])  # the empty negative prompt: the default
    # The negative prompts' embeddings are what every stage's guidance gets as uncond (the
    # tiny U-Nets, trained 2 steps, do not yet react to text, so look at the inputs).
    seen, real = [], list(cascade._samplers)
    cascade._samplers = [lambda *a, f=f, **kw: seen.append(a[3:5]) or f(*a, **kw) for f in real]
    try:
        cascade.sample(prompts, seed=1, settings=settings,
                       negative_prompts=["a blue square", "a red circle"])
    finally:
        cascade._samplers = real
    want = cascade.encode_ids(*cascade.encoder.tokenizer(["a blue square", "a red circle"]))
    assert len(seen) == 2
    for u_emb, u_mask in seen:
        np.testing.assert_array_equal(u_emb, want[0])
        np.testing.assert_array_equal(u_mask, want[1])

    traces = list(cascade.traces)
    rng = np.random.default_rng(0)
    for strength in (0.5, 0.8):  # new images, masks and strengths: no new compilation
        init = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
        mask = np.zeros((2, 40, 40), bool)
        mask[:, :20] = True
        out = cascade.sample(prompts, seed=1, settings=settings, init_images=init, masks=mask,
                             strength=strength)
        assert out.shape == (2, 32, 32, 3)
    assert cascade.traces[0] == traces[0] + 1 and cascade.traces[1] == traces[1] + 1
    # Where the mask, resized to 32 px, is 0, the output is the init image resized to 32 px.
    want = np.asarray(jax.image.resize(jnp.asarray(init, jnp.float32) / 127.5 - 1,
                                       (2, 32, 32, 3), "linear", antialias=True))
    kept = np.asarray(jax.image.resize(jnp.asarray(mask[..., None], jnp.float32), (2, 32, 32, 1),
                                       "linear", antialias=True))[..., 0] == 0
    assert kept[:, 20:].all()
    np.testing.assert_allclose(out[kept].astype(float),
                               np.clip((want[kept] + 1) * 127.5 + 0.5, 0, 255).astype(int),
                               atol=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"negative_prompts": ["a", "b", "c"]}, "3 negative prompts for 2 prompts"),
    ({"masks": np.ones((2, 8, 8))}, "needs an init image"),
    ({"strength": 0.5}, "needs an init image"),
    ({"init_images": np.zeros((2, 8, 8, 3), np.uint8), "strength": 0.0}, r"strength 0.0 must"),
    ({"init_images": np.zeros((2, 8, 8, 3), np.uint8), "strength": [0.5]}, "1 strengths for 2"),
    ({"init_images": np.zeros((1, 8, 8, 3), np.uint8), "strength": 0.5}, "expected \\[2, H"),
    ({"init_images": np.zeros((2, 8, 8, 3), np.uint8), "masks": np.ones((2, 4, 4))},
     "masks have shape"),
])
def test_cascade_edit_errors(cascade, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cascade.sample(["a red circle", "a blue square"], **kwargs)


def test_settings_of_older_configs_get_the_new_defaults(cascade):
    from jaxt2i.stage import StageSettings

    old = {"sampler": "ddim", "steps": 4, "guidance": 2.0, "thresholding": "dynamic",
           "aug_level": 0.1}
    s = StageSettings.from_config(old)
    assert (s.guidance_rescale, s.guidance_t_min, s.guidance_t_max, s.threshold_percentile,
            s.inpaint_resample) == (0.0, 0.0, 1.0, 99.5, 0)
    with pytest.raises(ConfigError, match="guidance interval"):
        s.replace(guidance_t_min=0.8, guidance_t_max=0.2)
    with pytest.raises(ConfigError, match="guidance_rescale=1.5 is out of range"):
        s.replace(guidance_rescale=1.5)


# ----------------------------------------------------------------- the command, fresh process

def _cli(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "jaxt2i.sample", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_negative_prompt_img2img_and_inpainting(tiny_cascade_dir, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    m = np.zeros((48, 48), np.uint8)
    m[:, :24] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "out"
    r = _cli(f"--checkpoint={tiny_cascade_dir}", "--prompt=a red circle", "--num_images=2",
             "--negative_prompt=a blue square", f"--init_image={init}", f"--mask={mask}",
             "--strength=0.6,1", "--inpaint_resample=1", "--guidance_rescale=0.5",
             "--guidance_t_max=0.9", "--threshold_percentile=98", "--steps=3,2", f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((out / "sample.json").read_text())
    assert rec["negative_prompts"] == ["a blue square"] and rec["strength"] == [0.6, 1.0]
    assert rec["init_images"] == [str(init)] and rec["masks"] == [str(mask)]
    assert [s["inpaint_resample"] for s in rec["settings"]] == [1, 1]
    assert rec["settings"][0]["threshold_percentile"] == 98.0
    with Image.open(out / "000.png") as im:
        got = np.asarray(im).astype(int)
    with Image.open(init) as im:
        want = np.asarray(im.resize((32, 32), Image.LANCZOS)).astype(int)
    # The kept half (away from the mask's edge) is the init image at 32 px, give or take the
    # difference between PIL's and JAX's resize of the already resized image (none: same size).
    assert np.abs(got[:, 20:] - want[:, 20:]).max() <= 1


def test_cli_super_resolves_given_lowres_images(tiny_cascade_dir, tmp_path):
    """--start_stage=1 --lowres: only the SR stage runs, on the given 16 px image; the same
    images as the Python API's `start_stage=1, lowres=` (the tiny SR stage, trained 2 steps,
    barely reads its low-res input, so equality with the API is the check that matters)."""
    from jaxt2i.images import read_images

    low = tmp_path / "low.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 24, 3), np.uint8)).save(low)
    out = tmp_path / "out"
    r = _cli(f"--checkpoint={tiny_cascade_dir}", "--prompt=a red circle", "--steps=2",
             "--start_stage=1", f"--lowres={low}", "--seed=3", f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((out / "sample.json").read_text())
    assert rec["start_stage"] == 1 and rec["lowres"] == [str(low)]
    with Image.open(out / "000.png") as im:
        got = np.asarray(im)
    cascade = load_cascade(str(tiny_cascade_dir))
    want = cascade.sample(["a red circle"], 3, settings=cascade.settings([{"steps": 2}] * 2),
                          start_stage=1, lowres=read_images([str(low)], 1, 16, what="x"))[0]
    assert got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("args, message", [
    (["--init_image={tmp}/nope.png", "--strength=0.5"], "--init_image '.*nope.png' does not exist"),
    (["--mask={tmp}/m.png"], "--mask and --strength need --init_image"),
    (["--init_image={tmp}/m.png"], "--init_image needs --strength"),
    (["--init_image={tmp}/m.png", "--strength=0"], "strength 0.0 must be in"),
    (["--init_image={tmp}/m.png", "--strength=0.5,0.5,0.5"], "--strength=0.5,0.5,0.5 has 3"),
    (["--negative_prompt=a", "--negative_prompt=b"], "2 --negative_prompt values for 1"),
    (["--guidance_rescale=2"], "guidance_rescale=2.0 is out of range"),
    (["--start_stage=1"], "--start_stage=1 needs --lowres PATH"),
    (["--start_stage=2", "--lowres={tmp}/m.png"], "--start_stage=2 must be between 1 and 1"),
    (["--lowres={tmp}/m.png"], "--start_stage=0 must be between 1 and 1"),
    (["--start_stage=1", "--lowres={tmp}/none.png"], "--lowres '.*none.png' does not exist"),
])
def test_cli_edit_errors(args, message, tiny_cascade_dir, tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "m.png")
    r = _cli(f"--checkpoint={tiny_cascade_dir}", "--prompt=a red circle", "--steps=2",
             *[a.format(tmp=tmp_path) for a in args], f"--out={tmp_path / 'out'}")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_inpainting_replaces_an_object_on_the_demo_cascade():
    """Remove one object of a rendered shapes scene and ask for another in its place: the
    shapes evaluator reads the new prompt in the output, and pixels away from the mask are the
    render's."""
    import copy

    from jaxt2i.assets import demo_cascade_dir
    from jaxt2i.data import shapes
    from jaxt2i.eval import detector

    cascade = load_cascade(demo_cascade_dir())
    rng = np.random.default_rng(7)
    inits, masks, prompts = [], [], []
    while len(prompts) < 8:
        scene = shapes.sample_scene(rng, "test", kinds={"relation": 1.0})
        a = scene["relation"]["subject"]
        other = scene["objects"][1 - a]
        new = copy.deepcopy(scene)
        old = new["objects"][a]
        old["colour"] = rng.choice([c for c in shapes.COLOURS if c not in (
            old["colour"], other["colour"]) and tuple(shapes.COLOURS[c]) != tuple(
                shapes.BACKGROUNDS[scene["background"]])])
        old["shape"] = rng.choice([s for s in shapes.SHAPES if s not in (
            scene["objects"][a]["shape"], other["shape"])])
        x0, y0, x1, y1 = (128 * v for v in shapes._box(scene["objects"][a]))
        m = np.zeros((128, 128), np.float32)
        m[max(0, int(y0) - 6):int(y1) + 7, max(0, int(x0) - 6):int(x1) + 7] = 1
        if m.mean() > 0.5:
            continue
        inits.append(shapes.render(scene, 128))
        masks.append(m)
        prompts.append(shapes.caption(new, rng))
    images = cascade.sample(prompts, seed=0, init_images=np.stack(inits), masks=np.stack(masks))
    scores = [detector.score(img, p) for img, p in zip(images, prompts)]
    whole = np.mean([s["whole"] for s in scores])
    assert whole >= 0.5, (whole, prompts, [s["found"] for s in scores])
    for img, init, m in zip(images, inits, masks):  # the last stage's last step keeps them
        assert np.abs(img[m == 0].astype(int) - init[m == 0].astype(int)).max() <= 1
