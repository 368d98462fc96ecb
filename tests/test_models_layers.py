"""Tests of the U-Net layers against reference formulations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.models import get_unet_config, layers


@pytest.fixture(scope="module")
def cfg():
    return get_unet_config("tiny", norm_groups=4)


def _init_apply(module, *args):
    variables = module.init(jax.random.PRNGKey(0), *args)
    return nn.unbox(variables), module.apply(variables, *args)


def test_group_norm_matches_flax_and_folds_scale_shift(cfg):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 6, 8)) * 3 + 1
    p = {"scale": jnp.linspace(0.5, 1.5, 8), "bias": jnp.linspace(-1, 1, 8)}
    ours = layers.GroupNorm(cfg).apply({"params": p}, x)
    ref = nn.GroupNorm(num_groups=4, epsilon=1e-5).apply({"params": p}, x)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    s, t = jnp.full((2, 8), 0.5), jnp.full((2, 8), -0.25)
    film = layers.GroupNorm(cfg).apply({"params": p}, x, (s, t))
    np.testing.assert_allclose(film, ref * 1.5 - 0.25, atol=1e-5)


def test_down_and_upsample_are_stride_2_convolutions(cfg):
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 6, 5))
    v, down = _init_apply(layers.Downsample(cfg, 7), x)
    k = v["params"]["kernel"]
    ref = jax.lax.conv_general_dilated(x, k, (2, 2), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(down, ref, atol=1e-5)
    v, up = _init_apply(layers.Upsample(cfg, 3), x)
    assert up.shape == (2, 16, 12, 3)
    k = v["params"]["kernel"]  # output pixel (2h+i, 2w+j) reads input (h, w) through k[i, j]
    np.testing.assert_allclose(up[:, 1::2, 0::2], jnp.einsum("bhwc,co->bhwo", x, k[1, 0]),
                               atol=1e-5)


@pytest.mark.parametrize("kind", ["cross", "concat"])
def test_attention_ignores_masked_tokens(cfg, kind):
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 16))
    text = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 32))
    mask = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
    block = layers.AttentionBlock(cfg, kind)
    variables = block.init(jax.random.PRNGKey(5), x, text, mask)
    # The output projection starts at zero; give it values so attention shows.
    variables = jax.tree.map(lambda p: p + 0.1, nn.unbox(variables))
    out = block.apply(variables, x, text, mask)
    other = text.at[:, 2:].set(jnp.where(mask[:, 2:, None], text[:, 2:], 7.0))
    np.testing.assert_allclose(block.apply(variables, x, other, mask), out, atol=1e-6)
    assert np.abs(block.apply(variables, x, text * 2, mask) - out).max() > 1e-3


def test_sinusoidal_embedding_separates_nearby_levels():
    t = jnp.array([0.0, 0.001, 0.5, 1.0])
    e = layers.sinusoidal_embedding(t, 32, 1000.0)
    assert e.shape == (4, 32) and e.dtype == jnp.float32
    assert np.linalg.norm(e[0] - e[1]) > 0.1  # one timestep apart at scale 1000
