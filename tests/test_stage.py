"""The one `Stage`: its versioned config, the upgrade of older exports, and that no other
module applies a U-Net or the text encoder on its own."""

import ast
import json
import os

import pytest

from jaxt2i.config import ConfigError
from jaxt2i.stage import FORMAT_VERSION, Stage, StageConfig, StageSettings, upgrade

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "jaxt2i", "assets", "demo_cascade")


def _demo_config(name):
    with open(os.path.join(DEMO, name, "config.json")) as f:
        return json.load(f)["config"]


def _round10_base_config():
    """Round 10's demo base stage, bundled until round 11 replaced it: a version-1 export."""
    with open(os.path.join(ROOT, "tests", "data", "round10_base_config.json")) as f:
        return json.load(f)["config"]


def test_version_1_exports_are_read_through_upgrade():
    """The demo's SR stage and round 10's base were exported before versioning (a `stage` field
    that repeats model.lowres_size): they parse into the current format, and upgrading is
    idempotent."""
    for name, sr in (("base", False), ("sr", True)):
        raw = _round10_base_config() if name == "base" else _demo_config(name)
        assert "format_version" not in raw and raw["stage"] == name  # really version 1
        cfg = StageConfig.from_dict(raw)
        assert cfg.is_sr is sr and cfg.model.image_size == raw["model"]["image_size"]
        assert cfg.sample == StageSettings(**raw["sample"])
        assert cfg.diffusion.schedule == raw["diffusion"]["schedule"]
        out = cfg.to_dict()
        assert out["format_version"] == FORMAT_VERSION and "stage" not in out
        assert upgrade(out) == out
        assert StageConfig.from_dict(out) == cfg
        assert cfg.raw == raw  # what was read, for the exports' config hashes


def test_version_1_defaults_and_refusals():
    raw = _demo_config("sr")
    old = json.loads(json.dumps(raw))
    del old["diffusion"]["aug_schedule"], old["text"]["dtype"]
    cfg = StageConfig.from_dict(old)  # fields later versions always write
    assert cfg.diffusion.aug_schedule == "cosine" and cfg.text.dtype == "float32"
    bad = dict(raw, stage="base")  # says base, but has a low-res input
    with pytest.raises(ConfigError, match="stage 'base' contradicts model.lowres_size"):
        StageConfig.from_dict(bad, where="stage 'x'")
    with pytest.raises(ConfigError, match=f"format_version {FORMAT_VERSION + 1}, newer"):
        StageConfig.from_dict(dict(raw, format_version=FORMAT_VERSION + 1))
    no_sample = {k: v for k, v in raw.items() if k != "sample"}
    with pytest.raises(ConfigError, match="lacks its 'sample' section"):
        StageConfig.from_dict(no_sample)
    with pytest.raises(ConfigError, match="sample.steps"):
        StageConfig.from_dict(dict(raw, sample=dict(raw["sample"], steps="many")))


def _tiny_sr_config(**diffusion) -> dict:
    from jaxt2i.config import load_config_file

    cfg = load_config_file(os.path.join(ROOT, "configs", "sr.py:tiny_sr")).to_dict()
    cfg["diffusion"].update(diffusion)
    return cfg


def test_aug_order_of_new_configs_old_exports_and_bad_values():
    """New configs resize first; every stage written before the field (the shipped demo's SR
    stage, a format-2 export) keeps augmenting first; a bad value is one line."""
    assert StageConfig.from_dict(_tiny_sr_config()).diffusion.aug_order == "resize_first"
    demo = StageConfig.from_dict(_demo_config("sr"))
    assert demo.diffusion.aug_order == "augment_first"
    assert demo.to_dict()["diffusion"]["aug_order"] == "augment_first"  # exported explicitly
    v2 = _tiny_sr_config()
    del v2["diffusion"]["aug_order"]
    v2["format_version"] = 2
    assert StageConfig.from_dict(v2).diffusion.aug_order == "augment_first"
    bad = dict(_tiny_sr_config(aug_order="resize_last"), format_version=FORMAT_VERSION)
    with pytest.raises(ConfigError, match=r"^stage 'x': diffusion.aug_order='resize_last' is "
                       "not allowed; allowed values: resize_first, augment_first$"):
        StageConfig.from_dict(bad, where="stage 'x'")


def test_resize_first_upsamples_with_the_unets_resize_then_augments():
    """x = alpha(level) up + sigma(level) noise, up = jax.image.resize of the low-res image by
    the U-Net's method, checked in numpy (the cosine aug schedule: alpha = cos(a t + b)); the
    result has the stage's size, so the U-Net's own resize leaves it as it is."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxt2i.diffusion import noise_augment

    stage = Stage(StageConfig.from_dict(_tiny_sr_config(aug_order="resize_first")))
    c = stage.config.model
    assert stage.config.diffusion.aug_schedule == "cosine"
    low = np.random.default_rng(0).uniform(-1, 1, (3, c.lowres_size, c.lowres_size, 3))
    low = low.astype(np.float32)
    rng, level = jax.random.key(5), np.array([0.0, 0.3, 0.9], np.float32)
    got, got_level = stage.augment(rng, jnp.asarray(low), level=jnp.asarray(level))
    assert got.shape == (3, c.image_size, c.image_size, 3)
    np.testing.assert_array_equal(got_level, level)
    up = np.asarray(jax.image.resize(low, got.shape, c.lowres_resize))
    noise = np.asarray(jax.random.normal(jax.random.split(rng)[1], got.shape, jnp.float32))
    b = np.arctan(np.exp(-10.0))  # logsnr(t) = -2 log tan(a t + b), from +20 to -20
    theta = ((np.arctan(np.exp(10.0)) - b) * level.astype(np.float64) + b)[:, None, None, None]
    np.testing.assert_allclose(got, np.cos(theta) * up + np.sin(theta) * noise, atol=2e-5)
    np.testing.assert_allclose(stage.upsample(low), up, atol=2e-6)
    # training: a level per example from [0, max_level), the same path
    train_low, train_level = stage.augment(rng, jnp.asarray(low), max_level=0.5)
    assert train_low.shape == got.shape and bool(jnp.all(train_level < 0.5))
    # a crop-trained stage's crops arrive upsampled already: kept, then augmented
    crop = jnp.asarray(up[:, :8, :8])
    np.testing.assert_array_equal(stage.augment(rng, crop, level=0.2, size=8)[0],
                                  noise_augment(rng, crop, level=0.2, schedule="cosine")[0])


def test_augment_first_is_unchanged():
    """Augment-first stages (every old export) augment the low-res image itself, exactly as
    `noise_augment` does, and the U-Net resizes it."""
    import jax
    import numpy as np

    from jaxt2i.diffusion import noise_augment

    stage = Stage(StageConfig.from_dict(_demo_config("sr")))
    low = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    got, level = stage.augment(jax.random.key(2), low, level=0.1)
    want, want_level = noise_augment(jax.random.key(2), low, level=0.1, schedule="cosine")
    assert got.shape == low.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(level, want_level)


def test_stage_read_names_the_export(tmp_path):
    stage = Stage.read(os.path.join(DEMO, "base"))
    assert not stage.is_sr and stage.step is not None and stage.params is None
    d = tmp_path / "future"
    d.mkdir()
    (d / "params.safetensors").write_bytes(b"")
    (d / "config.json").write_text(json.dumps({"config": dict(
        _demo_config("base"), format_version=FORMAT_VERSION + 1), "step": 3}))
    with pytest.raises(ConfigError, match=f"stage '{d}' has format_version"):
        Stage.read(str(d))


def _calls(tree, attr):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == attr]


def test_only_stage_and_the_encoder_apply_the_networks():
    """Issue #24: the U-Net was wrapped as a denoiser in train, cascade and the ONNX export,
    and T5 applied in three places. Now `Stage.denoise` / `Stage.encode_text` (and the text
    encoder's own `apply`) are the only `.apply(` calls on a network in the package; the `CLIP`
    object (text/clip_convert.py) is to CLIP what `TextEncoder` is to T5."""
    allowed = {os.path.join("jaxt2i", "stage.py"), os.path.join("jaxt2i", "text", "encoder.py"),
               os.path.join("jaxt2i", "text", "clip_convert.py")}
    offenders = []
    for dirpath, _, names in os.walk(os.path.join(ROOT, "jaxt2i")):
        for n in names:
            if not n.endswith(".py"):
                continue
            path = os.path.join(dirpath, n)
            rel = os.path.relpath(path, ROOT)
            with open(path) as f:
                tree = ast.parse(f.read())
            for call in _calls(tree, "apply"):
                # `module.apply({"params": ...}, ...)`: a Flax network applied
                first = call.args[0] if call.args else None
                if isinstance(first, ast.Dict) and rel not in allowed:
                    offenders.append(f"{rel}:{call.lineno}")
    assert not offenders, f"networks applied outside Stage / TextEncoder: {offenders}"


def test_inference_never_imports_training(tmp_path):
    """Inference borrowed from training (monitor.to_uint8, data.pipeline.to_float, the
    trainer's helpers): loading a cascade and importing every exporter and the evaluator must
    pull in neither the trainer nor the input pipeline (in a fresh process)."""
    import subprocess
    import sys

    code = (
        "import sys, jaxt2i.cascade, jaxt2i.sampling, jaxt2i.export.onnx_export, "
        "jaxt2i.export.stablehlo, jaxt2i.export.torch_export, jaxt2i.eval.evaluate\n"
        f"c = jaxt2i.cascade.load_cascade({DEMO!r})\n"
        "jaxt2i.cascade._as_model_images(__import__('numpy').zeros((1, 4, 4, 3), 'uint8'))\n"
        "bad = [m for m in ('jaxt2i.train', 'jaxt2i.train_state', 'jaxt2i.monitor', "
        "'jaxt2i.data.pipeline', 'grain') if m in sys.modules]\n"
        "print('IMPORTED', bad)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IMPORTED []" in r.stdout, r.stdout


def test_stage_load_checks_params_against_its_config(tmp_path):
    """Stage.load reads an export's params onto the device; a params file of another model is
    refused naming the param (here: the SR stage's params under the base stage's config)."""
    import shutil

    stage = Stage.load(os.path.join(DEMO, "base"))
    assert stage.params is not None and stage.step is not None
    mixed = tmp_path / "mixed"
    shutil.copytree(os.path.join(DEMO, "base"), mixed)
    shutil.copy(os.path.join(DEMO, "sr", "params.safetensors"), mixed / "params.safetensors")
    with pytest.raises(ConfigError, match="params.safetensors are from different models"):
        Stage.load(str(mixed))
