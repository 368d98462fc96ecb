"""diffusers ``UNet2DConditionModel`` folders <-> Flax ``IFUNet`` params, without torch.

A diffusers ``unet/`` folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``
(or a sharded ``.index.json``). ``load_if_unet`` parses the config (refusing, in one line, any
value the Flax family does not implement) and maps every tensor by name; ``save_if_unet``
writes a folder that ``UNet2DConditionModel.from_pretrained`` loads.

Names map mechanically: the Flax path ``up_blocks_0/attentions_1/to_out_0/kernel`` is
``up_blocks.0.attentions.1.to_out.0.weight``. Layouts: conv kernels HWIO <-> OIHW, dense
kernels [in, out] <-> [out, in], attention projections split per head ([C, heads, hd] <->
[heads * hd, C]; output [heads, hd, C] <-> [C, heads * hd]). The table is built from the
model's own abstract params (``jax.eval_shape``), so loading and saving cannot drift apart.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from jaxt2i.models.if_unet import ACTIVATIONS, IFUNetConfig, param_shapes
from jaxt2i.text.convert import Entry, read_hf_tensors, write_safetensors

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
CLASS_NAME = "UNet2DConditionModel"

# UNet2DConditionModel.__init__ defaults for the fields IFUNetConfig implements: a key missing
# from a config.json means diffusers' default, not ours.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True,
    "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "mid_block_scale_factor": 1.0, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1280, "encoder_hid_dim": None, "attention_head_dim": 8,
    "class_embed_type": None, "addition_embed_type": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_dim": None, "time_embedding_act_fn": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}
# Fields the Flax family implements only at one value (diffusers' default, or IF's).
_FIXED: dict[str, tuple] = {
    "center_input_sample": (False,), "time_embedding_type": ("positional",),
    "dual_cross_attention": (False,), "num_attention_heads": (None,),
    "attention_type": ("default",), "class_embeddings_concat": (False,),
    "num_class_embeds": (None,), "time_cond_proj_dim": (None,), "timestep_post_act": (None,),
    "dropout": (0, 0.0), "encoder_hid_dim_type": (None, "text_proj"),
}
# Fields that change nothing in IF's block types (they configure other blocks).
_NO_EFFECT = frozenset({
    "downsample_padding", "use_linear_projection", "transformer_layers_per_block",
    "reverse_transformer_layers_per_block", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim"})


def _refuse(name: str, value: Any, supported: Any) -> None:
    raise ValueError(f"diffusers U-Net config: {name}={value!r} is not implemented by "
                     f"jaxt2i's IF U-Net (supported: {supported})")


def _uniform(name: str, value: Any) -> Any:
    """A per-block list diffusers allows but IF never varies -> its one value."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            _refuse(name, value, "one value for every block")
        return value[0]
    return value


def config_from_diffusers(d: Mapping[str, Any], **overrides: Any) -> IFUNetConfig:
    """Parses a diffusers ``unet/config.json`` dict into an ``IFUNetConfig``.

    Args:
      d: the JSON dict (keys starting with '_' are metadata and skipped).
      **overrides: non-diffusers fields, e.g. ``dtype='bfloat16', remat=True``.

    Raises:
      ValueError: one line naming the first field whose value is not implemented.
    """
    if d.get("_class_name", CLASS_NAME) != CLASS_NAME:
        _refuse("_class_name", d["_class_name"], CLASS_NAME)
    known = set(_DIFFUSERS_DEFAULTS) | set(_FIXED) | _NO_EFFECT
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
        _refuse(unknown[0], d[unknown[0]], "no such UNet2DConditionModel field is known here")
    for name, allowed in _FIXED.items():
        if d.get(name, allowed[0]) not in allowed:
            _refuse(name, d[name], " or ".join(repr(a) for a in allowed))
    if d.get("encoder_hid_dim_type") and d.get("encoder_hid_dim") is None:
        _refuse("encoder_hid_dim", None, "a width when encoder_hid_dim_type is set")
    kw = {k: d.get(k, default) for k, default in _DIFFUSERS_DEFAULTS.items()}
    for name in ("attention_head_dim", "cross_attention_dim"):
        kw[name] = _uniform(name, kw[name])
    if isinstance(kw["sample_size"], (list, tuple)):
        kw["sample_size"] = _uniform("sample_size", kw["sample_size"])
    if kw["mid_block_only_cross_attention"] is None:  # diffusers: inherit a bool, not a list
        only = kw["only_cross_attention"]
        kw["mid_block_only_cross_attention"] = only if isinstance(only, bool) else False
    for name in ("act_fn", "time_embedding_act_fn"):
        if kw[name] is not None and kw[name] not in ACTIVATIONS:
            _refuse(name, kw[name], ", ".join(ACTIVATIONS))
    try:
        return IFUNetConfig(**kw, **overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"diffusers U-Net config not implemented by jaxt2i's IF U-Net: {e}"
                         ) from None


def config_to_diffusers(config: IFUNetConfig) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config.json (every implemented field written out)."""
    out: dict[str, Any] = {"_class_name": CLASS_NAME}
    for name in sorted(_DIFFUSERS_DEFAULTS):
        value = getattr(config, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    out["encoder_hid_dim_type"] = "text_proj" if config.encoder_hid_dim else None
    return out


# Flax names 'resnets_2' for what torch holds in ModuleLists as 'resnets.2'.
_LIST = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)$")


def diffusers_name(path: tuple[str, ...]) -> str:
    """Flax param path -> diffusers state-dict name."""
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return ".".join([_LIST.sub(r"\1.\2", p) for p in path[:-1]] + [leaf])


def _entry(path: tuple[str, ...], shape: tuple[int, ...]) -> Entry:
    name, ident = diffusers_name(path), (lambda a: a)
    if path[-1] == "kernel" and len(shape) == 4:  # conv: HWIO <-> OIHW
        return Entry(name, path, (shape[3], shape[2], shape[0], shape[1]),
                     lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
    if path[-1] == "kernel" and len(shape) == 3 and path[-2] == "to_out_0":  # [H, D, C]
        h, k, c = shape
        return Entry(name, path, (c, h * k), lambda a: a.T.reshape(h, k, c),
                     lambda a: a.reshape(h * k, c).T)
    if path[-1] == "kernel" and len(shape) == 3:  # per-head projection [C, H, D]
        c, h, k = shape
        return Entry(name, path, (h * k, c), lambda a: a.T.reshape(c, h, k),
                     lambda a: a.reshape(c, h * k).T)
    if path[-1] == "kernel":  # dense [in, out]
        return Entry(name, path, shape[::-1], np.transpose, np.transpose)
    if path[-1] == "bias" and len(shape) == 2:  # per-head bias [H, D]
        return Entry(name, path, (shape[0] * shape[1],), lambda a: a.reshape(shape),
                     lambda a: a.reshape(-1))
    return Entry(name, path, shape, ident, ident)


@functools.lru_cache(maxsize=16)
def param_map(config: IFUNetConfig) -> tuple[Entry, ...]:
    """Every parameter of ``IFUNet(config)`` with its diffusers name and layout."""
    shapes = traverse_util.flatten_dict(nn.unbox(param_shapes(config))["params"])
    return tuple(_entry(path, tuple(leaf.shape)) for path, leaf in sorted(shapes.items()))


def params_from_diffusers(tensors: Mapping[str, np.ndarray], config: IFUNetConfig,
                          param_dtype: Any = np.float32) -> dict:
    """diffusers state dict (numpy) -> nested Flax params, refusing any name or shape mismatch.

    Raises:
      ValueError: one line listing missing, unexpected or mis-shaped tensors.
    """
    entries = param_map(config)
    expected = {e.hf_name for e in entries}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        parts = ([f"missing tensors {_short(missing)}"] if missing else []) + (
            [f"unexpected tensors {_short(unexpected)}"] if unexpected else [])
        raise ValueError("IF U-Net checkpoint does not match its config.json: " + "; ".join(parts)
                         + "; check that config.json belongs to these weights")
    bad = [f"{e.hf_name}: got {list(tensors[e.hf_name].shape)}, expected {list(e.hf_shape)}"
           for e in entries if tuple(tensors[e.hf_name].shape) != e.hf_shape]
    if bad:
        raise ValueError("IF U-Net checkpoint tensors have the wrong shape for its config.json: "
                         + "; ".join(_short(bad)))
    flat = {e.path: np.ascontiguousarray(e.to_flax(np.asarray(tensors[e.hf_name])))
            .astype(param_dtype) for e in entries}
    return traverse_util.unflatten_dict(flat)


def params_to_diffusers(params: Mapping[str, Any], config: IFUNetConfig,
                        param_dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The inverse of ``params_from_diffusers``: Flax params -> diffusers names and layouts."""
    flat = traverse_util.flatten_dict(nn.unbox(dict(params)))
    return {e.hf_name: np.ascontiguousarray(e.to_hf(np.asarray(flat[e.path], param_dtype)))
            for e in param_map(config)}


def _short(names: list[str], limit: int = 8) -> list[str]:
    """At most ``limit`` names (and how many more), so the error stays one readable line."""
    return names if len(names) <= limit else names[:limit] + [f"... {len(names) - limit} more"]


def load_if_unet(model_dir: str, param_dtype: Any = np.float32, variant: str | None = None,
                 **overrides: Any) -> tuple[IFUNetConfig, dict]:
    """Reads a diffusers IF ``unet/`` folder.

    Args:
      model_dir: folder with config.json and diffusion_pytorch_model[.variant].safetensors
        (or its sharded .index.json), e.g. a local copy of DeepFloyd/IF-I-XL-v1.0's unet/.
      param_dtype: numpy dtype of the returned params (float32 upcasts fp16 checkpoints).
      variant: diffusers weight variant such as 'fp16' (reads diffusion_pytorch_model.fp16.*).
      **overrides: non-diffusers IFUNetConfig fields, e.g. ``dtype='bfloat16'`` (the compute
        dtype) or ``remat=True``.

    Returns:
      (config, params) for ``IFUNet(config).apply({'params': params}, ...)``.

    Raises:
      FileNotFoundError / ValueError: one line naming the missing file, the unsupported config
        value, or the missing / unexpected / mis-shaped tensors.
    """
    path = os.path.join(model_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {model_dir}: pass a diffusers unet/ folder")
    with open(path) as f:
        config = config_from_diffusers(json.load(f), **overrides)
    weights = WEIGHTS_NAME if variant is None else WEIGHTS_NAME.replace(
        ".safetensors", f".{variant}.safetensors")
    try:
        tensors, _ = read_hf_tensors(model_dir, weights_name=weights)
    except FileNotFoundError as e:
        found = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
        hint = (f"; found {found}: pass variant= to read one of them"
                if found and not variant else "")
        raise FileNotFoundError(f"{e}{hint}") from None
    return config, params_from_diffusers(tensors, config, param_dtype)


def save_if_unet(config: IFUNetConfig, params: Mapping[str, Any], out_dir: str,
                 param_dtype: Any = np.float32) -> None:
    """Writes a diffusers-loadable folder: config.json + diffusion_pytorch_model.safetensors.

    Args:
      config: the network's config.
      params: its Flax params (the inner 'params' tree; boxed or not).
      out_dir: created if needed.
      param_dtype: numpy dtype of the written tensors (np.float16 halves the size).
    """
    os.makedirs(out_dir, exist_ok=True)
    tensors = params_to_diffusers(params, config, param_dtype)
    write_safetensors(tensors, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    tmp = os.path.join(out_dir, CONFIG_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config_to_diffusers(config), f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, CONFIG_NAME))
