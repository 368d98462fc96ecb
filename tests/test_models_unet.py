"""Tests of the U-Net family: named sizes by eval_shape, config handling, tiny models."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.models import SIZES, UNet, UNetConfig, count_params, example_inputs
from jaxt2i.models import get_unet_config, param_shapes

# Paper numbers (Imagen, arXiv 2205.11487) and the imagen-pytorch benchmark anchor.
EXPECTED_PARAMS = {
    "paper_base64": (2.0e9, 0.15),
    "paper_sr256": (600e6, 0.15),
    "paper_sr1024": (400e6, 0.15),
    "bench_23m": (22_952_764, 0.05),
    "bench_sr22m": (21_838_134, 0.05),
}
PARAM_AXES = {None, "embed", "mlp", "heads", "kv", "conv_in", "conv_out", "norm", "text_embed"}


def random_params(config, seed=0):
    """Float32 params of the right shapes with random values (no init compile).

    Random rather than initial values so that zero-initialised output layers do not hide
    the effect of text, masks or remat.
    """
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(param_shapes(config))["params"]

    def fill(path, leaf):
        name = path[-1].key
        if len(leaf.shape) == 1:  # norm scales / biases
            base = 1.0 if name == "scale" else 0.0
            return jnp.asarray(base + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        fan_in = leaf.shape[1] if name.endswith("kv") else np.prod(leaf.shape[:-1])
        std = 1.0 / np.sqrt(fan_in)
        return jnp.asarray(std * rng.standard_normal(leaf.shape), jnp.float32)

    return {"params": jax.tree_util.tree_map_with_path(fill, shapes)}


def make_inputs(config, batch=2, text_len=6, size=None, seed=1):
    """Random inputs; the second half of each text is padding (mask 0)."""
    rng = np.random.default_rng(seed)
    inputs = example_inputs(config, batch, text_len, image_size=size)
    out = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32)
           for k, v in inputs.items() if k != "text_mask"}
    out["noise_level"] = jnp.asarray(rng.uniform(size=(batch,)), jnp.float32)
    out["text_mask"] = jnp.arange(text_len)[None, :].repeat(batch, 0) < text_len // 2
    if config.is_sr:
        out["lowres"] = jnp.clip(out["lowres"], -1, 1)
        out["aug_level"] = jnp.asarray(rng.uniform(size=(batch,)), jnp.float32)
    return out


@pytest.fixture(scope="module")
def tiny():
    config = get_unet_config("tiny")
    return config, random_params(config), make_inputs(config)


@pytest.fixture(scope="module")
def tiny_sr():
    config = get_unet_config("tiny_sr")
    return config, random_params(config), make_inputs(config)


@pytest.fixture(scope="module")
def forward():
    """A jitted apply per config (cached so each config compiles once)."""
    cache = {}

    def run(config, params, inputs):
        if config not in cache:
            cache[config] = jax.jit(lambda p, i: UNet(config).apply(p, **i))
        return cache[config](params, inputs)

    return run


def loss_and_grad(config, params, inputs):
    def loss(p):
        return jnp.mean(UNet(config).apply(p, **inputs) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)


# ---------------------------------------------------------------- named sizes (no memory)


@pytest.mark.parametrize("name", list(SIZES))
def test_every_size_by_eval_shape(name):
    config = SIZES[name]
    variables = param_shapes(config)
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for leaf in leaves:  # every parameter is float32 and carries one logical name per axis
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= PARAM_AXES
        assert leaf.value.dtype == jnp.float32
    inputs = example_inputs(config, batch_size=2, text_len=7)
    out = jax.eval_shape(lambda v, i: UNet(config).apply(v, **i), nn.unbox(variables), inputs)
    assert out.shape == inputs["x_t"].shape and out.dtype == jnp.float32


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_parameter_counts_match_references(name):
    target, tol = EXPECTED_PARAMS[name]
    n = count_params(SIZES[name])
    assert abs(n - target) <= tol * target, f"{name}: {n:,} params vs {target:,.0f} ± {tol:.0%}"


def test_demo_sizes_are_small_and_paper_sizes_use_t5_xxl():
    for name in ("demo", "demo_sr"):
        assert 1e6 <= count_params(SIZES[name]) <= 4e6, name
    assert SIZES["demo"].image_size == 32
    assert (SIZES["demo_sr"].lowres_size, SIZES["demo_sr"].image_size) == (32, 128)
    for name in ("paper_base64", "paper_sr256", "paper_sr1024"):
        assert SIZES[name].text_dim == 4096
    assert not SIZES["paper_sr1024"].has_self_attention and SIZES["paper_sr1024"].crop_size


# ---------------------------------------------------------------- config handling


def test_config_round_trips_through_json():
    config = get_unet_config("paper_sr256", dtype="bfloat16", remat=True)
    again = UNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and isinstance(again.channel_mults, tuple)


def test_config_broadcasts_per_level_fields():
    config = UNetConfig(channel_mults=[1, 2], num_res_blocks=3, attention="cross")
    assert config.num_res_blocks == (3, 3) and config.attention == ("cross", "cross")


@pytest.mark.parametrize("kwargs, words", [
    (dict(objective="score"), ["objective", "eps", "x0"]),
    (dict(dtype="float16"), ["dtype", "bfloat16"]),
    (dict(attention=("none", "self", "bogus", "cross")), ["attention", "concat"]),
    (dict(num_res_blocks=(1, 2)), ["num_res_blocks", "4 levels"]),
    (dict(image_size=60), ["image_size", "divisible by 8"]),
    (dict(lowres_size=64), ["lowres_size"]),
])
def test_config_rejects_bad_values_naming_the_field(kwargs, words):
    with pytest.raises(ValueError) as err:
        get_unet_config("bench_23m", **kwargs)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_unknown_size_or_field_lists_allowed_ones():
    with pytest.raises(ValueError, match="unknown U-Net size 'huge'.*paper_base64"):
        get_unet_config("huge")
    with pytest.raises(ValueError, match=r"unknown UNetConfig field.*'widht'.*base_channels"):
        get_unet_config("tiny", widht=3)
    with pytest.raises(ValueError, match="unknown UNetConfig field"):
        UNetConfig.from_dict({"base_channels": 8, "colour": 1})


# ---------------------------------------------------------------- tiny models


def test_real_init_matches_eval_shape_and_starts_from_zero_output():
    config = get_unet_config("tiny")
    inputs = make_inputs(config)
    # An 'rbg' key: XLA:CPU compiles it ~3x faster than threefry; init is key-agnostic.
    key = jax.random.key(0, impl="rbg")
    variables = jax.jit(UNet(config).init)(key, **inputs)
    shapes = jax.tree.map(lambda x: x.shape, nn.unbox(variables))
    expected = jax.tree.map(lambda x: x.shape, nn.unbox(param_shapes(config)))
    assert shapes == expected
    out = UNet(config).apply(nn.unbox(variables), **inputs)
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised head


@pytest.mark.parametrize("name, overrides", [
    ("tiny", {}),
    ("tiny_sr", {}),  # level 0 downsampled too, stem-to-head skip
    ("tiny", dict(skip_mode="add", stem_downsample=True, attention=("self+cross", "none"))),
])
def test_forward_and_gradient(name, overrides):
    config = get_unet_config(name, **overrides)
    params, inputs = random_params(config), make_inputs(config)
    loss, grads = loss_and_grad(config, params, inputs)
    assert np.isfinite(loss) and loss > 0
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert all(np.all(np.isfinite(g)) for _, g in flat)
    zero = [jax.tree_util.keystr(p) for p, g in flat if not np.any(g)]
    assert not zero, f"parameters without gradient: {zero}"


def test_text_changes_output_but_padding_does_not(tiny, forward):
    config, params, inputs = tiny
    base = forward(config, params, inputs)
    bump = jax.random.normal(jax.random.PRNGKey(3), inputs["text_emb"].shape[-1:])
    other_text = dict(inputs, text_emb=inputs["text_emb"].at[:, 0].add(bump))
    assert np.abs(forward(config, params, other_text) - base).max() > 1e-3
    pad = ~inputs["text_mask"][..., None]  # change only masked positions, even to inf
    padded = dict(inputs, text_emb=jnp.where(pad, 1e4, inputs["text_emb"]))
    np.testing.assert_allclose(forward(config, params, padded), base, atol=1e-6)
    padded = dict(inputs, text_emb=jnp.where(pad, jnp.inf, inputs["text_emb"]))
    np.testing.assert_allclose(forward(config, params, padded), base, atol=1e-6)


def test_extra_padding_tokens_change_nothing(tiny, forward):
    config, params, inputs = tiny
    text = jnp.pad(inputs["text_emb"], ((0, 0), (0, 4), (0, 0)), constant_values=1.0)
    longer = dict(inputs, text_emb=text, text_mask=jnp.pad(inputs["text_mask"], ((0, 0), (0, 4))))
    out = forward(config, params, longer)  # retraced for the longer text
    np.testing.assert_allclose(out, forward(config, params, inputs), atol=1e-5)


def test_all_masked_text_is_finite_and_ignores_tokens(tiny, forward):
    config, params, inputs = tiny
    empty = dict(inputs, text_mask=jnp.zeros_like(inputs["text_mask"]))
    out = forward(config, params, empty)
    assert np.all(np.isfinite(out))
    other = dict(empty, text_emb=inputs["text_emb"] * 3.0)
    np.testing.assert_allclose(forward(config, params, other), out, atol=1e-6)


def test_text_conv_starts_as_identity_and_makes_word_order_visible(tiny, forward):
    """Attention over text tokens has no positions: without text_conv, permuting the real
    tokens changes nothing, so which colour goes with which noun can only come from the
    encoder. text_conv starts as an identity (fine-tuning from an export without it) and,
    once trained (random here), sees the order, while padding still changes nothing."""
    config, params, inputs = tiny
    conv_config = get_unet_config("tiny", text_conv=3)
    init = UNet(conv_config).init(jax.random.PRNGKey(0), **inputs)["params"]
    conv = jax.tree_util.tree_map(np.asarray, nn.unbox(init["text_conv"]))
    assert conv["kernel"].shape == (3, config.emb_dim, config.emb_dim) and not np.any(
        conv["kernel"]) and not np.any(conv["bias"])
    with_conv = {"params": dict(params["params"], text_conv=conv)}
    base = forward(config, params, inputs)
    np.testing.assert_allclose(forward(conv_config, with_conv, inputs), base, atol=1e-6)

    n = int(inputs["text_mask"][0].sum())  # real tokens come first in every row
    order = np.r_[np.arange(n)[::-1], np.arange(n, inputs["text_mask"].shape[1])]
    permuted = dict(inputs, text_emb=inputs["text_emb"][:, order])
    np.testing.assert_allclose(forward(config, params, permuted), base, atol=1e-5)

    rng = np.random.default_rng(5)
    trained = {"params": dict(params["params"], text_conv={
        "kernel": jnp.asarray(rng.standard_normal(conv["kernel"].shape) / np.sqrt(
            3 * config.emb_dim), jnp.float32),
        "bias": jnp.asarray(0.1 * rng.standard_normal(conv["bias"].shape), jnp.float32)})}
    out = forward(conv_config, trained, inputs)
    assert np.abs(forward(conv_config, trained, permuted) - out).max() > 1e-3
    pad = ~inputs["text_mask"][..., None]
    padded = dict(inputs, text_emb=jnp.where(pad, jnp.inf, inputs["text_emb"]))
    np.testing.assert_allclose(forward(conv_config, trained, padded), out, atol=1e-6)
    with pytest.raises(ValueError, match="text_conv"):
        get_unet_config("tiny", text_conv=2)


def test_noise_level_and_aug_level_condition_the_output(tiny_sr, forward):
    config, params, inputs = tiny_sr
    base = forward(config, params, inputs)
    for key in ("noise_level", "aug_level", "lowres"):
        changed = dict(inputs, **{key: inputs[key] * 0.5 + 0.1})
        assert np.abs(forward(config, params, changed) - base).max() > 1e-4, key


def test_remat_gives_same_outputs_and_gradients(tiny):
    config, params, inputs = tiny
    loss, grads = loss_and_grad(config, params, inputs)
    loss_r, grads_r = loss_and_grad(get_unet_config("tiny", remat=True), params, inputs)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32(tiny, forward):
    config, params, inputs = tiny
    out32 = forward(config, params, inputs)
    out16 = forward(get_unet_config("tiny", dtype="bfloat16"), params, inputs)
    assert out16.dtype == jnp.float32
    err = np.abs(np.asarray(out16) - np.asarray(out32)).max() / np.abs(out32).max()
    assert err < 0.05, err


def test_sr_without_self_attention_runs_at_other_crop_sizes(tiny_sr, forward):
    config, params, _ = tiny_sr
    assert not config.has_self_attention
    for size in (8, 32):  # trained at 16
        inputs = make_inputs(config, batch=1, size=size)
        assert inputs["lowres"].shape[1] == size // 2
        out = forward(config, params, inputs)
        assert out.shape == (1, size, size, 3) and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="divisible by 4"):
        forward(config, params, make_inputs(config, batch=1, size=10))


def test_stage_inputs_are_checked(tiny, tiny_sr):
    config, params, inputs = tiny
    with pytest.raises(ValueError, match="base U-Net"):
        UNet(config).apply(params, **inputs, lowres=inputs["x_t"])
    config, params, inputs = tiny_sr
    with pytest.raises(ValueError, match="pass lowres"):
        UNet(config).apply(params, **dict(inputs, lowres=None))


def test_sharded_by_logical_rules_matches_unsharded(tiny, forward):
    config, params, inputs = tiny
    n = 2 if jax.device_count() >= 4 else 1  # conftest simulates 4 CPU devices
    devices = np.array(jax.devices()[: n * n]).reshape(n, 1, n)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    rules = (("batch", "data"), ("heads", "tensor"), ("mlp", "tensor"), ("embed", "fsdp"),
             ("conv_out", "tensor"))
    with mesh, nn.logical_axis_rules(rules):
        out = jax.jit(lambda p, i: UNet(config).apply(p, **i))(params, inputs)
    np.testing.assert_allclose(out, forward(config, params, inputs), atol=1e-5)


@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic", "lanczos3"])
def test_lowres_resize_matrices_equal_jax_image_resize(method):
    """The SR stage resizes with one interpolation matrix per axis (so the batch may stay
    symbolic for export); the result must be jax.image.resize's."""
    from jaxt2i.models.unet import resize_matrix

    x = np.random.default_rng(0).standard_normal((2, 8, 6, 3)).astype(np.float32)
    for size in [(32, 24), (16, 12)]:
        want = jax.image.resize(x, (2, *size, 3), method)
        got = jnp.einsum("Hh,bhwc,Ww->bHWc", resize_matrix(8, size[0], method), x,
                         resize_matrix(6, size[1], method), precision="highest")
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("method", ["nearest", "bilinear", "bicubic", "lanczos3"])
def test_resize_matrix_is_jax_image_resize_of_the_identity(method):
    """The numpy-built matrix equals jax.image.resize of an identity (the reference) for up-
    and downsampling, integer and odd ratios; exactly for power-of-two upsampling (the demo's
    32 -> 128), else within float32 rounding (XLA fuses the weight arithmetic differently)."""
    from jaxt2i.models.unet import resize_matrix

    for n, size in [(32, 128), (16, 32), (8, 32), (32, 16), (64, 32), (7, 5), (5, 7), (3, 17),
                    (13, 100), (17, 3), (4, 1), (1, 4), (10, 10)]:
        want = np.asarray(jax.image.resize(jnp.eye(n, dtype=jnp.float32), (size, n), method))
        got = resize_matrix(n, size, method)
        assert got.shape == (size, n) and got.dtype == np.float32
        if method in ("nearest", "bilinear") and size in (2 * n, 4 * n):
            np.testing.assert_array_equal(got, want, err_msg=f"{n} -> {size}")
        else:
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=f"{n} -> {size}")


def test_resize_matrix_does_not_call_jax_image(monkeypatch):
    """jax2onnx patches jax.image.resize while it traces and refuses to run it (a fresh
    `python -m jaxt2i.export --format=onnx` crashed); the matrix must be a numpy constant."""
    from jaxt2i.models import unet

    def refuse(*args, **kwargs):
        raise RuntimeError("jax.image.resize called")

    monkeypatch.setattr(jax.image, "resize", refuse)
    monkeypatch.setattr(jax.image, "scale_and_translate", refuse)
    unet.resize_matrix.cache_clear()
    try:
        m = unet.resize_matrix(4, 8, "bilinear")
    finally:
        unet.resize_matrix.cache_clear()  # nothing made under the patch outlives the test
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)  # rows interpolate: weights sum to 1
    np.testing.assert_array_equal(m[:2], [[1, 0, 0, 0], [0.75, 0.25, 0, 0]])


def test_aug_level_embedding_keeps_its_scale_when_noise_scale_follows_a_discrete_schedule():
    """model.noise_scale=1 (integer timesteps of a discrete schedule) must not shrink the
    embedding of the augmentation level, which stays continuous in [0, 1]: its sinusoids are
    those of scale 1000, so neighbouring levels stay apart (cos-sim 0.16-like, not ~1)."""
    from jaxt2i.models.layers import sinusoidal_embedding

    cont = get_unet_config("tiny_sr")
    disc = get_unet_config("tiny_sr", noise_scale=1.0)
    inputs = example_inputs(cont, batch_size=2, text_len=4)
    inputs["aug_level"] = jnp.array([0.3, 0.7])
    params = UNet(cont).init(jax.random.key(0), **inputs)["params"]

    def aug_out(config):
        _, state = UNet(config).apply(
            {"params": params}, **inputs, capture_intermediates=lambda m, _: m.name == "aug_embed")
        return np.asarray(state["intermediates"]["aug_embed"]["__call__"][0])

    np.testing.assert_array_equal(aug_out(disc), aug_out(cont))
    # Independent check of what scale 1000 means: features of t=0.3 and t=0.301 differ clearly.
    f = np.asarray(sinusoidal_embedding(jnp.array([0.3, 0.301]), 64, 1000.0))
    cos = float(f[0] @ f[1] / np.linalg.norm(f[0]) / np.linalg.norm(f[1]))
    assert cos < 0.99
