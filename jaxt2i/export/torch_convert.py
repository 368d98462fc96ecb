"""Flax U-Net parameters <-> PyTorch state dicts of `jaxt2i.export.torch_unet.TorchUNet`.

This module needs no PyTorch: it works on numpy arrays (and writes safetensors with
``safetensors.numpy``), so exports run where only JAX is installed.

Mapping convention. A Flax path ``a/b/leaf`` becomes the PyTorch name ``a.b.<leaf>``: the
torch module keeps the Flax module names (``down1_res0``, ``up0_attn1_0``, ``text_pool``...)
and only the leaf names and layouts change:

  Flax leaf (shape)                          PyTorch name (shape)
  dense ``kernel`` [in, out]                 ``weight`` [out, in]          (nn.Linear)
  conv ``kernel`` [kh, kw, in, out] (HWIO)   ``weight`` [out, in, kh, kw]  (nn.Conv2d, OIHW)
  ``text_conv/kernel`` [k, in, out]          ``weight`` [out, in, k]       (nn.Conv1d)
  ``*_upsample/kernel`` [2, 2, in, out]      ``weight`` [in, out, 2, 2]    (nn.ConvTranspose2d)
  norm ``scale`` / ``bias`` [C]              ``weight`` / ``bias`` [C]
  attention ``q`` [C, heads, hd]             ``q.weight`` [heads*hd, C]    (bias-free Linear)
  ``qkv`` / ``kv`` / ``text_kv`` [T, C, heads, hd]
                                             ``<name>.weight`` [T*heads*hd, C], rows ordered
                                             (T, heads, hd)
  attention ``out`` [heads, hd, C]           ``out.weight`` [C, heads*hd]
  ``text_pool/query`` [heads, hd], ``text_null`` [E]   unchanged

For example ``noise_embed/fc1/kernel`` -> ``noise_embed.fc1.weight``,
``down0_res0/conv1/kernel`` -> ``down0_res0.conv1.weight``, ``head_norm/scale`` ->
``head_norm.weight``, ``down1_attn0_0/qkv`` -> ``down1_attn0_0.qkv.weight``.

The set of expected parameters comes from the Flax model itself
(``jaxt2i.models.unet.param_shapes``, shape-only tracing), so any parameter that is missing,
unexpected or of the wrong shape is reported by name.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import numpy as np

from jaxt2i.models import prior as prior_lib
from jaxt2i.models.unet import UNetConfig, param_shapes

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")

_HEADS_IN = ("qkv", "kv", "text_kv")  # fused [T, C, heads, hd] projections


def _as_config(config: UNetConfig | Mapping[str, Any]) -> UNetConfig:
    """A UNetConfig from itself or its ``to_dict()``."""
    return config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)


def _numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of an export dtype name (bfloat16 from ml_dtypes, a JAX dependency)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    if dtype == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested mappings -> {path tuple: leaf}; boxed leaves (nn.Partitioned) are unboxed."""
    out = {}
    for k, v in tree.items():
        path = (*prefix, str(k))
        if isinstance(v, Mapping):
            out.update(_flatten(v, path))
        else:
            out[path] = v.unbox() if hasattr(v, "unbox") else v
    return out


def _kind(path: tuple[str, ...], ndim: int) -> str:
    """How the Flax leaf at ``path`` (with ``ndim`` axes) maps to PyTorch."""
    leaf, parent = path[-1], (path[-2] if len(path) > 1 else "")
    if leaf == "kernel" and ndim == 2:
        return "dense"
    if leaf == "kernel" and ndim == 4:
        return "conv_transpose" if parent.endswith("_upsample") else "conv"
    if leaf == "kernel" and ndim == 3:
        return "conv1d"
    if leaf in ("scale", "bias", "query", "text_null", "null_text_embed", "pos_embed"):
        return "copy"
    if leaf == "q" and ndim == 3:
        return "heads_in1"
    if leaf in _HEADS_IN and ndim == 4:
        return "heads_in"
    if leaf == "out" and ndim == 3:
        return "heads_out"
    raise ValueError(f"no PyTorch mapping for the Flax parameter {'/'.join(path)} "
                     f"({ndim} axes)")


def torch_name(path: tuple[str, ...] | str) -> str:
    """The PyTorch state-dict name of a Flax parameter path (tuple or 'a/b/c').

    Args:
      path: the Flax path, e.g. ``('down0_res0', 'conv1', 'kernel')``.

    Returns:
      The PyTorch name, e.g. ``'down0_res0.conv1.weight'``.
    """
    path = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
    leaf = path[-1]
    if leaf in ("kernel", "scale"):
        leaf = "weight"
    elif leaf in ("q", "out") or leaf in _HEADS_IN:
        return ".".join((*path, "weight"))
    return ".".join((*path[:-1], leaf))


def _to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    """Flax layout -> PyTorch layout."""
    if kind == "dense":  # [in, out] -> [out, in]
        return x.T
    if kind == "conv":  # HWIO -> OIHW
        return x.transpose(3, 2, 0, 1)
    if kind == "conv_transpose":  # HWIO -> IOHW (ConvTranspose2d's [in, out, kh, kw])
        return x.transpose(2, 3, 0, 1)
    if kind == "conv1d":  # [k, in, out] -> [out, in, k]
        return x.transpose(2, 1, 0)
    if kind == "heads_in1":  # [C, heads, hd] -> [heads*hd, C]
        return x.reshape(x.shape[0], -1).T
    if kind == "heads_in":  # [T, C, heads, hd] -> [T*heads*hd, C]
        return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    if kind == "heads_out":  # [heads, hd, C] -> [C, heads*hd]
        return x.reshape(-1, x.shape[-1]).T
    return x


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax parameter of ``shape`` (as ``_to_torch`` lays it out)."""
    if kind == "dense":
        return shape[::-1]
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "conv_transpose":
        return (shape[2], shape[3], shape[0], shape[1])
    if kind == "conv1d":
        return shape[::-1]
    if kind == "heads_in1":
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_in":
        return (shape[0] * shape[2] * shape[3], shape[1])
    if kind == "heads_out":
        return (shape[2], shape[0] * shape[1])
    return shape


def _from_torch(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """PyTorch layout -> the Flax layout of ``shape`` (the inverse of ``_to_torch``)."""
    if kind == "dense":
        return x.T
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    if kind == "conv_transpose":
        return x.transpose(2, 3, 0, 1)
    if kind == "conv1d":
        return x.transpose(2, 1, 0)
    if kind == "heads_in1":
        return x.T.reshape(shape)
    if kind == "heads_in":
        t, c, heads, hd = shape
        return x.reshape(t, heads, hd, c).transpose(0, 3, 1, 2)
    if kind == "heads_out":
        return x.T.reshape(shape)
    return x


@functools.lru_cache(maxsize=32)
def _spec(config: UNetConfig | prior_lib.PriorConfig) -> dict[
        tuple[str, ...], tuple[str, str, tuple[int, ...], tuple[int, ...]]]:
    """{Flax path: (torch name, kind, Flax shape, torch shape)} for every parameter of the
    U-Net or (a PriorConfig) the diffusion prior."""
    shapes_of = prior_lib.param_shapes if isinstance(config, prior_lib.PriorConfig) else \
        param_shapes
    shapes = _flatten(shapes_of(config)["params"])
    spec = {}
    for path, leaf in shapes.items():
        shape = tuple(leaf.shape)
        kind = _kind(path, len(shape))
        spec[path] = (torch_name(path), kind, shape,
                      _torch_shape(kind, shape))
    names = [s[0] for s in spec.values()]
    if len(set(names)) != len(names):  # cannot happen with the naming above; guard anyway
        raise ValueError(f"PyTorch names collide: {sorted(n for n in names if names.count(n) > 1)}")
    return spec


def state_dict_shapes(config: UNetConfig | Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{PyTorch name: shape} that ``TorchUNet(config).state_dict()`` has (no arrays made).

    Args:
      config: a UNetConfig or its ``to_dict()``.

    Returns:
      The expected state-dict names and shapes.
    """
    return {name: tshape for name, _, _, tshape in _spec(_as_config(config)).values()}


def _unwrap(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accepts ``{'params': tree}`` (a variables dict) as well as the tree itself."""
    if set(params) == {"params"} and isinstance(params["params"], Mapping):
        return params["params"]
    return params


def _mismatch(what: str, missing: list[str], unexpected: list[str], model: str = "U-Net") -> None:
    if missing or unexpected:
        raise ValueError(f"{what} do not match the {model} config: missing {sorted(missing)}; "
                         f"unexpected (no counterpart) {sorted(unexpected)}")


def unet_state_dict(params: Mapping[str, Any], config: UNetConfig | Mapping[str, Any],
                    dtype: str = "float32") -> dict[str, np.ndarray]:
    """Flax U-Net parameters -> a PyTorch state dict for ``TorchUNet(config)``.

    Args:
      params: the nested Flax parameter dict (numpy or JAX arrays, boxed or not), optionally
        wrapped as ``{'params': ...}``; e.g. from ``jaxt2i.checkpoint.load_exported``.
      config: the U-Net's UNetConfig or its ``to_dict()``.
      dtype: 'float32' (default), 'bfloat16' (numpy arrays of ``ml_dtypes.bfloat16``, which
        ``safetensors.numpy.save_file`` writes as BF16) or 'float16'.

    Returns:
      {PyTorch name: C-contiguous numpy array in PyTorch layout}.

    Raises:
      ValueError: for missing, unexpected or mis-shaped parameters (listed by name), an
        unknown dtype, or values that overflow float16.
    """
    return _state_dict(params, _as_config(config), dtype, "U-Net")


def prior_state_dict(params: Mapping[str, Any], config: prior_lib.PriorConfig,
                     dtype: str = "float32") -> dict[str, np.ndarray]:
    """Flax diffusion-prior parameters -> a state dict of ``torch_prior.TorchPrior(config)``
    (the same naming and layouts as ``unet_state_dict``; raises as it does)."""
    return _state_dict(params, config, dtype, "prior")


def _state_dict(params: Mapping[str, Any], cfg: Any, dtype: str,
                model: str) -> dict[str, np.ndarray]:
    """``unet_state_dict`` of any model `_spec` knows."""
    np_dtype = _numpy_dtype(dtype)
    spec = _spec(cfg)
    flat = _flatten(_unwrap(params))
    _mismatch("Flax params", ["/".join(p) for p in spec if p not in flat],
              ["/".join(p) for p in flat if p not in spec], model)
    out = {}
    for path, (name, kind, shape, _) in spec.items():
        x = np.asarray(flat[path], np.float32)
        if x.shape != shape:
            raise ValueError(f"Flax param {'/'.join(path)} has shape {x.shape}, the config "
                             f"expects {shape}")
        y = np.ascontiguousarray(_to_torch(kind, x)).astype(np_dtype)
        if dtype == "float16" and not np.isfinite(y).all() and np.isfinite(x).all():
            raise ValueError(f"{'/'.join(path)} overflows float16 (max |x| = "
                             f"{np.abs(x).max():.4g}); export float32 or bfloat16")
        out[name] = y
    return out


def unet_params_from_state_dict(state_dict: Mapping[str, Any],
                                config: UNetConfig | Mapping[str, Any]) -> dict[str, Any]:
    """A PyTorch state dict of ``TorchUNet(config)`` -> nested float32 Flax params.

    Args:
      state_dict: {PyTorch name: array}: numpy arrays (e.g. ``safetensors.numpy.load_file``)
        or torch tensors (any float dtype; they are read as float32).
      config: the U-Net's UNetConfig or its ``to_dict()``.

    Returns:
      The nested Flax parameter dict (without the ``'params'`` wrapper) of numpy float32
      arrays, ready for ``UNet(config).apply({'params': ...}, ...)``.

    Raises:
      ValueError: for missing, unexpected or mis-shaped tensors (listed by name).
    """
    spec = _spec(_as_config(config))
    names = {s[0]: path for path, s in spec.items()}
    _mismatch("PyTorch tensors", [n for n in names if n not in state_dict],
              [n for n in state_dict if n not in names])
    tree: dict[str, Any] = {}
    for name, path in names.items():
        _, kind, shape, tshape = spec[path]
        v = state_dict[name]
        if hasattr(v, "detach"):  # a torch tensor (read without importing torch)
            v = v.detach().cpu().float().numpy()
        x = np.asarray(v, np.float32)
        if x.shape != tshape:
            raise ValueError(f"tensor {name} has shape {x.shape}, the config expects {tshape}")
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(_from_torch(kind, x, shape))
    return tree


def _replace_atomically(path: str, write: Any) -> None:
    """Calls ``write(tmp_path)`` then moves the finished file onto ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_pretrained(directory: str, params: Mapping[str, Any],
                    unet_config_dict: UNetConfig | Mapping[str, Any], dtype: str = "float32",
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes ``model.safetensors`` + ``config.json`` for ``TorchUNet.from_pretrained``.

    Each file is written to a temporary name in ``directory`` and moved into place when
    complete, so a reader never sees a half-written file.

    Args:
      directory: output folder (created if needed).
      params: the Flax U-Net parameters (see ``unet_state_dict``).
      unet_config_dict: the UNetConfig or its ``to_dict()``.
      dtype: weight dtype in the file: 'float32', 'bfloat16' or 'float16'.
      extra: more top-level fields for config.json (e.g. the training config and step);
        they must be JSON-serialisable (other values are written as strings) and must not
        use the key 'unet'.

    Returns:
      The config.json record: ``{"unet": UNetConfig.to_dict(), **extra}``.
    """
    cfg = _as_config(unet_config_dict)
    return _save(directory, "unet", cfg, unet_state_dict(params, cfg, dtype=dtype), extra)


def save_prior_pretrained(directory: str, params: Mapping[str, Any],
                          config: prior_lib.PriorConfig, dtype: str = "float32",
                          extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``save_pretrained`` for the diffusion prior: ``model.safetensors`` + ``config.json``
    ({"prior": PriorConfig.to_dict(), **extra}) for ``torch_prior.TorchPrior.from_pretrained``."""
    return _save(directory, "prior", config, prior_state_dict(params, config, dtype=dtype), extra)


def _save(directory: str, key: str, cfg: Any, tensors: dict[str, np.ndarray],
          extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Writes `tensors` and {key: cfg.to_dict(), **extra}, each file atomically."""
    from safetensors.numpy import save_file

    extra = dict(extra or {})
    if key in extra:
        raise ValueError(f"extra must not contain {key!r} (save_pretrained writes that key)")
    record = {key: cfg.to_dict(), **extra}
    text = json.dumps(record, indent=2, default=str)
    os.makedirs(directory, exist_ok=True)

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _replace_atomically(os.path.join(directory, MODEL_FILE),
                        lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _replace_atomically(os.path.join(directory, CONFIG_FILE), write_json)
    return record
