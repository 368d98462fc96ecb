"""Training unCLIP's decoder (`configs/unclip_decoder.py`): a base U-Net conditioned on the
frozen CLIP's image embedding of its training images, and its export as a `Stage`.

The documented command runs a few steps in a fresh process; its export must say it wants an
image embedding and sample with one. In-process, the train step must feed the U-Net the CLIP
object's own embedding of the batch, drop it and the caption at the configured rates,
independently, and give the image-embedding layers nonzero gradients.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.config import ConfigError, load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ["-m", "jaxt2i.train", "--config=configs/unclip_decoder.py:size=tiny"]
TINY = ["--config.train.num_steps=3", "--config.train.log_every=1", "--config.sample.steps=2",
        "--config.train.sample_prompts=('a', 'b')"]


def _config(**train):
    cfg = load_config_file(os.path.join(ROOT, "configs", "unclip_decoder.py") + ":size=tiny")
    cfg.train.update(train)
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("decoder") / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, *COMMAND, f"--workdir={workdir}", *TINY], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, r.stdout


def test_docs_show_the_command():
    with open(os.path.join(ROOT, "docs", "unclip.md")) as f:
        docs = f.read()
    assert ("python -m jaxt2i.train --config=configs/unclip_decoder.py:size=demo --workdir="
            in docs)


def test_export_records_the_image_embedding_and_samples_with_one(run):
    from jaxt2i.stage import Stage, load_text_encoder

    workdir, out = run
    assert "finished at step 3" in out
    assert os.listdir(workdir / "samples") == ["step_0000003.png"]
    with open(workdir / "export" / "config.json") as f:
        config = json.load(f)["config"]
    assert config["model"]["image_embed_dim"] == 128 and config["clip"] == {"path": "bundled"}
    stage = Stage.load(str(workdir))
    assert stage.image_embed_dim == 128 and stage.config.clip == "bundled"
    stage.encoder = load_text_encoder(stage.config.text)
    ids, mask = stage.encoder.tokenizer(["a red circle", "a red circle"])
    text = stage.encode_text(stage.encoder.params, jnp.asarray(ids), jnp.asarray(mask))
    uncond = stage.encode_text(stage.encoder.params, *map(jnp.asarray,
                                                            stage.encoder.tokenizer([""])))
    settings = stage.config.sample.replace(steps=2, guidance=3.0)
    z = jax.random.normal(jax.random.key(1), (2, 128))
    # Three steps barely move the (zero-initialised) output layer, so the routing of the
    # embedding is checked with every param perturbed.
    leaves, tree = jax.tree_util.tree_flatten(stage.params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [
        p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    fn = jax.jit(lambda z: stage.sample(params, text, uncond, jax.random.key(0),
                                        settings=settings, image_embed=z))
    a, b = np.asarray(fn(z)), np.asarray(fn(z.at[1].multiply(-1.0)))
    size = stage.config.model.image_size
    assert a.shape == (2, size, size, 3) and np.isfinite(a).all()
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # same embedding, same key: same image
    assert np.abs(a[1] - b[1]).max() > 1e-2  # another embedding: another image
    with pytest.raises(ValueError, match="unCLIP decoder: pass image_embed"):
        stage.sample(stage.params, text, uncond, jax.random.key(0), settings=settings)
    # The Imagen cascade (python -m jaxt2i.sample) refuses it in one line.
    from jaxt2i.cascade import load_cascade

    with pytest.raises(ConfigError, match=r"stage 0 .* is an unCLIP decoder"):
        load_cascade(str(workdir))


@pytest.fixture(scope="module")
def trainer():
    from jaxt2i.train.trainer import Trainer

    return Trainer(_config(batch_size=256), devices=jax.devices()[:1])


def _batch(trainer, n):
    from jaxt2i.data.shapes import ShapesSource

    src = ShapesSource(32, n, "train", 0)
    items = [src[i] for i in range(n)]
    ids, mask = trainer.encoder.tokenizer([it["caption"] for it in items])
    images = np.stack([it["image"] for it in items]).astype(np.float32) / 127.5 - 1.0
    return {"image": jnp.asarray(images), "ids": jnp.asarray(ids), "mask": jnp.asarray(mask)}


def test_step_feeds_the_clip_embedding_and_drops_conditions_at_the_paper_rates(
        trainer, monkeypatch):
    from jaxt2i import diffusion

    seen = []

    def spy(denoise, x0, cond, rng, **kw):
        jax.debug.callback(lambda *a: seen.append([np.asarray(x) for x in a]),
                           cond["text_emb"], cond["text_mask"], cond["image_embed"])
        return jnp.zeros(x0.shape[:1])

    monkeypatch.setattr(diffusion, "diffusion_loss", spy)
    batch = _batch(trainer, 256)
    loss = jax.jit(trainer._loss)
    for i in range(2):
        loss(None, batch, trainer.text_params, jax.random.key(i),
             trainer.clip_params)
    jax.effects_barrier()
    want = np.asarray(trainer.clip.encode_image((np.asarray(batch["image"]) + 1) / 2).embeds)
    full = np.asarray(trainer.encode_text(trainer.text_params, batch["ids"],
                                          batch["mask"].astype(bool)))
    null = np.asarray(trainer.encode_text(trainer.text_params, trainer.uncond_ids,
                                          trainer.uncond_mask))[0]
    rates = []
    for emb, mask, z in seen:
        zeroed = np.all(z == 0, axis=1)
        np.testing.assert_allclose(z[~zeroed], want[~zeroed], atol=1e-4)
        dropped = np.all(np.abs(emb - null) < 1e-4, axis=(1, 2))
        kept = np.all(np.abs(emb - full) < 1e-4, axis=(1, 2))
        # each caption is either its own or the empty prompt's
        assert np.all(dropped ^ kept), (dropped.sum(), kept.sum(), np.abs(emb - full).max())
        np.testing.assert_array_equal(mask[dropped], np.broadcast_to(
            np.asarray(trainer.uncond_mask)[0], mask[dropped].shape))
        rates.append((dropped.mean(), zeroed.mean(), (dropped & zeroed).mean()))
    for text, image, both in rates:  # 256 draws (fixed keys): sd 0.031 / 0.019 / 0.014
        assert abs(text - 0.5) < 0.1 and abs(image - 0.1) < 0.06 and both < 0.1, rates
    assert rates[0] != rates[1]


def test_image_embedding_layers_get_gradients(trainer, run):
    """(At initialisation the U-Net's zero output layer gives every other layer zero
    gradients, so the trained run's params are used.)"""
    from jaxt2i.stage import Stage

    params = Stage.load(str(run[0])).params
    batch = jax.tree_util.tree_map(lambda x: x[:4], _batch(trainer, 4))
    grads = jax.jit(jax.grad(trainer._loss))(params, batch, trainer.text_params,
                                            jax.random.key(0), trainer.clip_params)
    for name in ("image_proj", "image_tokens"):
        g = np.asarray(grads[name]["kernel"])
        assert np.abs(g).max() > 0, name


def test_wrong_embedding_width_is_one_line():
    from jaxt2i.train.trainer import Trainer

    cfg = _config()
    cfg.model.image_embed_dim = 64
    with pytest.raises(ConfigError, match=r"image_embed_dim \(64\) differs from the CLIP's"):
        Trainer(cfg, devices=jax.devices()[:1])


def test_init_from_an_imagen_base_starts_as_that_base(tmp_path):
    """`train.init_from` an Imagen base export (the bundled demo's route to its unCLIP
    decoder): the export's params are kept and the image-embedding projections start at zero,
    so the embedding changes nothing yet, and they still get gradients."""
    from unclip_helpers import _random_params

    from jaxt2i.checkpoint import export_params, flatten
    from jaxt2i.models.unet import UNet, example_inputs
    from jaxt2i.stage import Stage, StageConfig
    from jaxt2i.train.trainer import Trainer

    base_cfg = load_config_file(os.path.join(ROOT, "configs", "base.py") + ":size=tiny")
    base = Stage(StageConfig.from_dict(base_cfg.to_dict()))
    src = _random_params(base.init_params, 3)  # every param nonzero, output layers too
    export_params(src, base_cfg.to_dict(), str(tmp_path / "base"), step=5)

    cfg = _config(init_from=str(tmp_path / "base"))
    with pytest.raises(ConfigError, match=r"params missing .*init_from_allow_new=True"):
        Trainer(cfg, devices=jax.devices()[:1]).init_state_from(str(tmp_path / "base"), 0)
    cfg.train.init_from_allow_new = True
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    state = trainer.init_state_from(str(tmp_path / "base"), seed=0)
    want = flatten(src)
    for tree in (state.params, state.ema_params):
        got = flatten(jax.device_get(tree))
        new = sorted(set(got) - set(want))
        assert new == ["image_norm/bias", "image_norm/scale", "image_proj/bias",
                       "image_proj/kernel", "image_tokens/bias", "image_tokens/kernel"], new
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
        for name in new:
            if name.startswith(("image_proj", "image_tokens")):
                assert not np.any(got[name]), name
        np.testing.assert_array_equal(got["image_norm/scale"], 1.0)  # LayerNorm's own init

    # At the start the embedding changes nothing: the same output for two embeddings (a
    # random init of the projections would make them differ), near the base's own (the 4
    # image tokens, zero vectors, still take a share of each cross-attention).
    unet_cfg = trainer.unet_cfg
    rng = np.random.default_rng(0)
    inputs = {k: (jnp.asarray(rng.standard_normal(v.shape), v.dtype) if v.dtype != bool else v)
              for k, v in example_inputs(unet_cfg, batch_size=2, text_len=6).items()}
    inputs["noise_level"] = jnp.asarray([0.3, 0.7])
    params = jax.device_get(state.params)
    apply = jax.jit(lambda p, z: UNet(unet_cfg).apply({"params": p}, **dict(inputs,
                                                                            image_embed=z)))
    out = np.asarray(apply(params, inputs["image_embed"]))
    np.testing.assert_array_equal(out, np.asarray(apply(params, -3.0 * inputs["image_embed"])))
    ref = np.asarray(UNet(base.unet_cfg).apply({"params": src}, **{
        k: v for k, v in inputs.items() if k != "image_embed"}))
    assert np.abs(out - ref).mean() < 0.1 * np.abs(ref).mean(), (
        np.abs(out - ref).mean(), np.abs(ref).mean())
    fresh = jax.device_get(trainer.init_state(seed=0).params)  # random projections
    fresh = {**params, **{k: fresh[k] for k in ("image_proj", "image_tokens")}}
    assert np.abs(np.asarray(apply(fresh, inputs["image_embed"])) - np.asarray(
        apply(fresh, -3.0 * inputs["image_embed"]))).max() > 1e-3
    grads = jax.grad(lambda p: jnp.mean(UNet(unet_cfg).apply({"params": p}, **inputs) ** 2))(
        params)
    for name in ("image_proj", "image_tokens"):
        assert np.abs(np.asarray(grads[name]["kernel"])).max() > 0, name
