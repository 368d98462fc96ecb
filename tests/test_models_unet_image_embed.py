"""The U-Net's CLIP-image-embedding conditioning (unCLIP's decoder) and its CFG dropout."""

import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.models.unet import (SIZES, UNet, UNetConfig, drop_decoder_conditions,
                                get_unet_config, param_shapes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every named size's param tree (path, shape, logical names, dtype) and to_dict() JSON as
# jaxt2i wrote them before image conditioning existed: sha256 prefixes, number of leaves.
BEFORE = {
    "tiny": ("27b0e8c4db94e813", 84, "3da37ff665d8476f"),
    "tiny_sr": ("58c01708731634b1", 82, "a985b751cc141021"),
    "demo": ("d2d6f612d7f7df26", 170, "9e04756285db5641"),
    "demo_sr": ("5bb7cc0155c8949e", 184, "b8e40fc50e324117"),
    "paper_base64": ("f94d42ca7545732e", 456, "a10a3227a0f6b6b4"),
    "paper_sr256": ("6adf8c2e61c3b76e", 628, "87770a6d7612a2aa"),
    "paper_sr1024": ("3f270ffbf64945ff", 564, "5eaaf866821fa8c4"),
    "bench_23m": ("f2e1bf4229eb9afe", 376, "2b45ce12e070a995"),
    "bench_sr22m": ("892f7231ac893c7d", 324, "2c3fe86150e0330d"),
}
IMAGE_PARAMS = {"image_norm", "image_proj", "image_tokens"}
CLIP_DIM = 16


def _rows(config):
    shapes = param_shapes(config)["params"]
    return [f"{jax.tree_util.keystr(p)} {tuple(x.value.shape)} {x.names} {x.value.dtype}"
            for p, x in jax.tree_util.tree_leaves_with_path(
                shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))]


def _sha(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", list(SIZES))
def test_off_by_default_param_tree_and_config_unchanged(name):
    rows = _rows(SIZES[name])
    tree, leaves, config = BEFORE[name]
    assert (_sha("\n".join(rows)), len(rows)) == (tree, leaves)
    assert _sha(json.dumps(SIZES[name].to_dict(), sort_keys=True)) == config
    assert "image_embed_dim" not in SIZES[name].to_dict()


def test_bundled_exports_model_config_is_written_back_unchanged():
    """(The bundled SR export predates `text_conv`, which to_dict adds as 0; the bundled base
    was exported from a run's config, which names `remat_policy` at its default, "full",
    where to_dict leaves it out. Round 10's base, bundled until round 11, predates both.)"""
    paths = [os.path.join(ROOT, "jaxt2i", "assets", "demo_cascade", stage, "config.json")
             for stage in ("base", "sr")]
    for path in [*paths, os.path.join(ROOT, "tests", "data", "round10_base_config.json")]:
        with open(path) as f:
            model = json.load(f)["config"]["model"]
        out = UNetConfig.from_dict(model).to_dict()
        kept = {k: v for k, v in model.items() if (k, v) != ("remat_policy", "full")}
        assert {k: out[k] for k in kept} == kept and not set(out) - set(kept) - {
            "text_conv"}, path
        assert UNetConfig.from_dict(out) == UNetConfig.from_dict(model), path


def test_config_fields_round_trip_and_are_checked():
    config = get_unet_config("tiny", image_embed_dim=768, image_embed_tokens=4)
    d = config.to_dict()
    assert d["image_embed_dim"] == 768 and "image_embed_tokens" not in d  # the default
    assert UNetConfig.from_dict(json.loads(json.dumps(d))) == config
    assert get_unet_config("tiny", image_embed_dim=8, image_embed_tokens=2).to_dict()[
        "image_embed_tokens"] == 2
    with pytest.raises(ValueError, match="image_embed_dim"):
        get_unet_config("tiny", image_embed_dim=-1)


@pytest.fixture(scope="module")
def decoder():
    """The tiny U-Net with image conditioning, random params (no zero-initialised output
    hides anything) and inputs."""
    config = get_unet_config("tiny", image_embed_dim=CLIP_DIM, image_embed_tokens=4)
    rng = np.random.default_rng(0)
    shapes = nn.unbox(param_shapes(config))["params"]

    def fill(path, leaf):
        if len(leaf.shape) == 1:
            base = 1.0 if path[-1].key == "scale" else 0.0
            return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        fan_in = leaf.shape[1] if path[-1].key.endswith("kv") else np.prod(leaf.shape[:-1])
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)
    params = {"params": jax.tree_util.tree_map_with_path(fill, shapes)}
    b, length = 2, 6
    inputs = {
        "x_t": jnp.asarray(rng.standard_normal((b, 16, 16, 3)), jnp.float32),
        "noise_level": jnp.asarray(rng.uniform(size=(b,)), jnp.float32),
        "text_emb": jnp.asarray(rng.standard_normal((b, length, 32)), jnp.float32),
        "text_mask": jnp.arange(length)[None].repeat(b, 0) < 3,
        "image_embed": jnp.asarray(rng.standard_normal((b, CLIP_DIM)), jnp.float32),
    }
    forward = jax.jit(lambda p, i: UNet(config).apply(p, **i))
    return config, params, inputs, forward


def test_on_adds_exactly_the_image_parameters(decoder):
    config, params, _, _ = decoder
    old = set(nn.unbox(param_shapes(SIZES["tiny"]))["params"])
    assert set(params["params"]) - old == IMAGE_PARAMS and old <= set(params["params"])
    p = params["params"]
    assert p["image_proj"]["kernel"].shape == (CLIP_DIM, config.emb_dim)
    assert p["image_tokens"]["kernel"].shape == (CLIP_DIM, 4 * config.emb_dim)
    names = param_shapes(config)["params"]["image_tokens"]["kernel"].names
    assert names == ("text_embed", "embed")


def test_image_embedding_conditions_the_output_through_both_paths(decoder):
    config, params, inputs, forward = decoder
    base = forward(params, inputs)
    other = dict(inputs, image_embed=inputs["image_embed"][::-1])
    assert np.abs(forward(params, other) - base).max() > 1e-3
    # Only the scale matters not (LayerNorm): a longer embedding is the same condition.
    np.testing.assert_allclose(forward(params, dict(inputs, image_embed=inputs[
        "image_embed"] * 7.0)), base, atol=1e-4)

    def without(*names):
        p = dict(params["params"])
        for n in names:
            p[n] = jax.tree.map(jnp.zeros_like, p[n])
        return {"params": p}
    # With the embedding path silenced, the image still matters: the extra tokens are attended.
    no_emb = without("image_proj")
    assert np.abs(forward(no_emb, other) - forward(no_emb, inputs)).max() > 1e-3
    # With the tokens silenced too, nothing of the image is left.
    neither = without("image_proj", "image_tokens")
    np.testing.assert_allclose(forward(neither, other), forward(neither, inputs), atol=1e-6)
    # Tokens-only models (no extra tokens) still take the embedding path.
    no_tokens = get_unet_config("tiny", image_embed_dim=CLIP_DIM, image_embed_tokens=0)
    p = {"params": {k: v for k, v in params["params"].items() if k != "image_tokens"}}
    run = jax.jit(lambda p, i: UNet(no_tokens).apply(p, **i))
    assert np.abs(run(p, other) - run(p, inputs)).max() > 1e-3


def test_zero_embedding_and_padding_and_errors(decoder):
    config, params, inputs, forward = decoder
    null = dict(inputs, image_embed=jnp.zeros_like(inputs["image_embed"]))
    assert np.all(np.isfinite(forward(params, null)))
    pad = ~inputs["text_mask"][..., None]  # padded text still changes nothing
    padded = dict(inputs, text_emb=jnp.where(pad, jnp.inf, inputs["text_emb"]))
    np.testing.assert_allclose(forward(params, padded), forward(params, inputs), atol=1e-6)
    def trace(config, **changes):  # shapes only: the checks raise while tracing
        return jax.eval_shape(lambda: UNet(config).apply(params, **dict(inputs, **changes)))
    with pytest.raises(ValueError, match="pass image_embed"):
        trace(config, image_embed=None)
    with pytest.raises(ValueError, match=r"image_embed has shape \(2, 8\)"):
        trace(config, image_embed=jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="without image conditioning"):
        trace(get_unet_config("tiny"))


def test_drop_decoder_conditions_rates_and_values():
    b, length, d = 4000, 5, 3
    rng = np.random.default_rng(1)
    text = jnp.asarray(rng.standard_normal((b, length, d)) + 5.0, jnp.float32)
    mask = jnp.ones((b, length), bool)
    image = jnp.asarray(rng.standard_normal((b, CLIP_DIM)) + 5.0, jnp.float32)
    t, m, i = jax.jit(drop_decoder_conditions)(jax.random.key(0), text, mask, image)
    text_dropped = ~np.asarray(m).any(axis=1)
    image_dropped = ~np.asarray(i).any(axis=1)
    assert abs(text_dropped.mean() - 0.5) < 0.03 and abs(image_dropped.mean() - 0.1) < 0.02
    assert abs((text_dropped & image_dropped).mean() - 0.05) < 0.015  # independent draws
    np.testing.assert_array_equal(np.asarray(t)[text_dropped], 0.0)
    np.testing.assert_array_equal(np.asarray(t)[~text_dropped], np.asarray(text)[~text_dropped])
    np.testing.assert_array_equal(np.asarray(i)[~image_dropped],
                                  np.asarray(image)[~image_dropped])
    # A given null caption (e.g. the encoded empty prompt) replaces dropped ones.
    null = (jnp.full((1, length, d), 2.0), jnp.arange(length)[None] < 2)
    t, m, _ = drop_decoder_conditions(jax.random.key(0), text, mask, image, null_text=null)
    np.testing.assert_array_equal(np.asarray(t)[text_dropped], 2.0)
    np.testing.assert_array_equal(np.asarray(m)[text_dropped],
                                  np.broadcast_to(np.arange(length) < 2, (text_dropped.sum(),
                                                                          length)))
