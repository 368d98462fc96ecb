"""PyTorch port of the U-Net: weight conversion, TorchUNet vs the JAX UNet, save/load."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is a test extra: pip install -e '.[test]'")

from jaxt2i.export.torch_convert import (  # noqa: E402
    save_pretrained, state_dict_shapes, unet_params_from_state_dict, unet_state_dict)
from jaxt2i.export.torch_unet import TorchUNet  # noqa: E402
from jaxt2i.models import SIZES, UNet, example_inputs, get_unet_config, param_shapes  # noqa: E402

torch.set_num_threads(1)

# Tiny configs covering every option of the JAX model: all attention kinds and their
# combinations, skip modes, stem downsampling, per-level block counts, 2 and 3 levels, fixed
# head counts, a custom embedding width, noise scales, low-res resize methods and text_conv.
CASES = {
    "tiny": ("tiny", {}),
    "tiny_sr": ("tiny_sr", {}),
    "tiny_sr_32px": ("tiny_sr", {}),  # an SR stage run at twice its training size
    "add_stem_down": ("tiny", dict(attention=("self", "concat+cross"), skip_mode="add",
                                   stem_downsample=True, num_res_blocks=(2, 1), num_heads=2,
                                   scale_skip=False, noise_scale=1.0, objective="v")),
    "sr_3_levels_nearest": ("tiny_sr", dict(channel_mults=(1, 2, 3), num_res_blocks=(1, 2, 1),
                                            attention=("self+cross", "none", "concat"),
                                            stem_downsample=False, lowres_resize="nearest",
                                            emb_channels=24, objective="x0")),
    "sr_bicubic_6px": ("tiny_sr", dict(lowres_size=6, lowres_resize="bicubic")),
    "text_conv": ("tiny", dict(text_conv=3)),
}
SIZE = {"tiny_sr_32px": 32}
TOL = 1e-4  # float32 max abs error, outputs are O(1)


def random_params(config, seed=0):
    """Random float32 params of the right shapes (no init compile).

    Every parameter is random (the model zero-initialises its output layers, which would
    make outputs trivially equal): norm scales 1 + 0.1 N, biases 0.1 N, weights N / sqrt(fan_in).
    """
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(param_shapes(config))["params"]

    def fill(path, leaf):
        name = path[-1].key
        if len(leaf.shape) == 1:
            base = 1.0 if name == "scale" else 0.0
            return (base + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        fan_in = leaf.shape[1] if name.endswith("kv") else np.prod(leaf.shape[:-1])
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def random_inputs(config, size=None, batch=3, text_len=6, seed=1):
    """NHWC numpy inputs; text mask rows: half padded, all real, all padded (NaN padding)."""
    rng = np.random.default_rng(seed)
    shapes = example_inputs(config, batch, text_len, image_size=size)
    out = {k: rng.standard_normal(v.shape).astype(np.float32)
           for k, v in shapes.items() if k != "text_mask"}
    out["noise_level"] = rng.uniform(size=(batch,)).astype(np.float32)
    mask = np.zeros((batch, text_len), bool)
    mask[0, : text_len // 2] = True
    mask[1] = True
    out["text_mask"] = mask
    out["text_emb"][~mask] = np.nan  # padding must not leak, even when non-finite
    if config.is_sr:
        out["lowres"] = np.clip(out["lowres"], -1, 1)
        out["aug_level"] = rng.uniform(size=(batch,)).astype(np.float32)
    return out


def to_torch(inputs):
    """NHWC numpy -> NCHW torch tensors (others unchanged in layout)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2) if v.ndim == 4
                                                     else v)) for k, v in inputs.items()}


def run_torch(net, inputs):
    with torch.no_grad():
        return net(**to_torch(inputs)).float().numpy().transpose(0, 2, 3, 1)  # [B, H, W, C]


def load(config, state):
    net = TorchUNet(config)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def case():
    """case(name) -> (config, params, inputs, JAX output), computed once per case."""
    cache = {}

    def get(name):
        if name not in cache:
            size, overrides = CASES[name]
            config = get_unet_config(size, **overrides)
            params = random_params(config)
            inputs = random_inputs(config, SIZE.get(name))
            want = jax.jit(UNet(config).apply)({"params": params}, **inputs)
            cache[name] = config, params, inputs, np.asarray(want)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_torch_unet_matches_jax(case, name):
    config, params, inputs, want = case(name)
    assert np.isfinite(want).all() and np.abs(want).max() > 0.1  # not trivially zero
    state = unet_state_dict(params, config)
    net = TorchUNet(config)
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert {k: v.shape for k, v in state.items()} == own == state_dict_shapes(config)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state.values())
    got = run_torch(load(config, state), inputs)
    assert got.shape == want.shape and got.dtype == np.float32
    err = np.abs(got - want).max()
    assert err < TOL, f"{name}: max abs error {err:.3g} (output scale {np.abs(want).max():.3g})"


def test_text_mask_and_conditioning_reach_the_output(case):
    """The comparison is meaningful: text, noise level and low-res each change the output."""
    config, params, inputs, base = case("tiny_sr")
    net = load(config, unet_state_dict(params, config))
    rng = np.random.default_rng(2)
    for key in ("text_emb", "noise_level", "lowres", "aug_level"):
        x = inputs[key]
        changed = dict(inputs, **{key: (np.nan_to_num(x) + 0.5 * rng.standard_normal(x.shape))
                                  .astype(np.float32)})
        assert np.abs(run_torch(net, changed) - base).max() > 1e-3, key
    # An all-padded row equals the same row with different (masked) text.
    other = dict(inputs, text_emb=np.where(inputs["text_mask"][..., None], inputs["text_emb"],
                                           123.0).astype(np.float32))
    np.testing.assert_allclose(run_torch(net, other), run_torch(net, inputs), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "add_stem_down", "sr_3_levels_nearest"])
def test_params_round_trip_exactly(case, name):
    config, params, _, _ = case(name)
    state = unet_state_dict({"params": params}, config)  # the variables wrapper is accepted
    back = unet_params_from_state_dict(state, config)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a.dtype == np.float32 and np.array_equal(a, np.asarray(b))
    # From the torch module's own state dict too.
    again = unet_params_from_state_dict(load(config, state).state_dict(), config)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        assert np.array_equal(a, np.asarray(b))


@pytest.mark.parametrize("name", list(SIZES))
def test_every_named_size_has_the_same_names_and_shapes(name):
    config = SIZES[name]
    with torch.device("meta"):  # no memory for the paper sizes
        net = TorchUNet(config)
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert own == state_dict_shapes(config)


def test_unmapped_or_misshaped_names_are_listed(case):
    config, params, _, _ = case("tiny")
    broken = jax.tree.map(lambda x: x, params)
    del broken["down0_res0"]["film"]
    broken["extra_layer"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match=r"down0_res0/film/kernel.*extra_layer/kernel"):
        unet_state_dict(broken, config)
    bad = jax.tree.map(lambda x: x, params)
    bad["stem"]["kernel"] = np.zeros((1, 1, 3, 16), np.float32)
    with pytest.raises(ValueError, match="stem/kernel has shape"):
        unet_state_dict(bad, config)
    state = unet_state_dict(params, config)
    state.pop("head.weight")
    state["head.extra"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"head\.weight.*head\.extra"):
        unet_params_from_state_dict(state, config)
    with pytest.raises(ValueError, match="dtype must be one of"):
        unet_state_dict(params, config, dtype="int8")


def test_save_pretrained_and_from_pretrained(case, tmp_path):
    config, params, inputs, want = case("tiny_sr")
    out = tmp_path / "stage1"
    record = save_pretrained(str(out), params, config.to_dict(), extra={"step": 7})
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no temp files
    saved = json.loads((out / "config.json").read_text())
    assert saved == record and saved["step"] == 7 and saved["unet"] == config.to_dict()
    net = TorchUNet.from_pretrained(str(out)).eval()
    assert net.config == config and next(net.parameters()).dtype == torch.float32
    direct = run_torch(load(config, unet_state_dict(params, config)), inputs)
    got = run_torch(net, inputs)
    np.testing.assert_array_equal(got, direct)
    assert np.abs(got - want).max() < TOL

    with pytest.raises(ValueError, match="must not contain 'unet'"):
        save_pretrained(str(out), params, config, extra={"unet": {}})
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(out / "model.safetensors"))
    tensors.pop("up1_attn0_0.text_kv.weight")
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors \['up1_attn0_0\.text_kv\.weight'\]"):
        TorchUNet.from_pretrained(str(out))
    os.remove(out / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TorchUNet.from_pretrained(str(out))


def test_bfloat16_export_and_module(case, tmp_path):
    config, params, inputs, want = case("tiny")
    save_pretrained(str(tmp_path / "bf16"), params, config, dtype="bfloat16")
    net = TorchUNet.from_pretrained(str(tmp_path / "bf16")).eval()
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    got = run_torch(net, inputs)  # float32 inputs, float32 output
    assert got.dtype == np.float32
    scale = np.abs(want).max()
    # bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2%) in every weight and
    # activation: a few percent of the output scale after ~20 layers.
    assert np.abs(got - want).max() < 5e-2 * scale
    # .to(torch.bfloat16) of a float32 module behaves the same as the bfloat16 export.
    cast = load(config, unet_state_dict(params, config)).to(torch.bfloat16)
    np.testing.assert_array_equal(run_torch(cast, inputs), got)
    half = unet_state_dict(params, config, dtype="float16")
    assert {v.dtype for v in half.values()} == {np.dtype(np.float16)}


def test_forward_checks_inputs(case):
    config, params, inputs, want = case("tiny")
    net = load(config, unet_state_dict(params, config))
    t = to_torch(inputs)
    with torch.no_grad():
        with pytest.raises(ValueError, match="divisible by"):
            net(**dict(t, x_t=t["x_t"][..., :7, :7]))
        with pytest.raises(ValueError, match="given to a base U-Net"):
            net(**t, lowres=t["x_t"])
        # A scalar noise level broadcasts over the batch, as in JAX.
        level = float(inputs["noise_level"][0])
        one = net(**dict(t, noise_level=level))[:1]
        np.testing.assert_allclose(one.numpy().transpose(0, 2, 3, 1), want[:1], atol=TOL, rtol=0)
    sr_config, sr_params, sr_inputs, _ = case("tiny_sr")
    sr = load(sr_config, unet_state_dict(sr_params, sr_config))
    with torch.no_grad(), pytest.raises(ValueError, match="pass lowres"):
        sr(**{k: v for k, v in to_torch(sr_inputs).items() if k != "lowres"})
