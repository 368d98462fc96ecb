"""PyTorch building blocks shared by the exported models' torch twins (`torch_unet.TorchUNet`,
`torch_prior.TorchPrior`): the JAX numerics they mirror (float32 statistics, logits and
softmax), and the strict loader of an exported folder (``model.safetensors`` + ``config.json``).

Needs the ``[torch]`` extra; nothing in the JAX package imports this module.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import nn

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

Tensor = torch.Tensor


def sinusoidal_embedding(t: Tensor, dim: int, scale: float) -> Tensor:
    """Sinusoidal features of a per-example scalar, as ``jaxt2i.models.layers``.

    Args:
      t: [B] values.
      dim: even number of features.
      scale: multiplier on ``t`` before the sinusoids.

    Returns:
      [B, dim] float32 features: sines of every frequency, then cosines.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                        device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Scaled dot-product attention with float32 logits and softmax (as jax.nn's).

    Args:
      q: [B, T, heads, hd] queries.
      k: [B, S, heads, hd] keys.
      v: [B, S, heads, hd] values.
      mask: [B, S] bool, True for the keys every query may attend, or [B, T, S] per query,
        or None.

    Returns:
      [B, T, heads, hd] in v's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.einsum("btnd,bsnd->bnts", q.float(), k.float()) * scale  # [B, N, T, S]
    if mask is not None:
        big = -0.7 * torch.finfo(torch.float32).max
        mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]  # -> [B, 1, T, S]
        logits = logits.masked_fill(~mask, big)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    return torch.einsum("bnts,bsnd->btnd", probs, v)


class GroupNorm(nn.Module):
    """GroupNorm over NCHW maps with float32 statistics and an optional scale and shift.

    Mirrors ``jaxt2i.models.layers.GroupNorm``: ``gcd(groups, channels)`` groups, variance
    as E[x^2] - E[x]^2 (clamped at 0), epsilon 1e-5, and ``y * (1 + s) + t`` conditioning
    folded into one multiply-add per element.
    """

    def __init__(self, channels: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.groups = math.gcd(groups, channels)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Args: x [B, C, H, W]; scale_shift: optional ([B, C], [B, C]).

        Returns:
          [B, C, H, W] in x's dtype.
        """
        b, c, h, w = x.shape
        g = self.groups
        xf = x.float()
        s1 = xf.sum(dim=(2, 3)).reshape(b, g, c // g)  # [B, G, C/G]
        s2 = xf.square().sum(dim=(2, 3)).reshape(b, g, c // g)
        n = h * w * (c // g)
        mean = s1.sum(dim=-1, keepdim=True) / n  # [B, G, 1]
        var = torch.clamp(s2.sum(dim=-1, keepdim=True) / n - mean.square(), min=0.0)
        inv = torch.rsqrt(var + self.eps)
        gamma, beta = self.weight.float(), self.bias.float()
        a = (inv * gamma.reshape(g, -1)).reshape(b, c)  # [B, C]
        shift = beta - (mean * inv).expand(b, g, c // g).reshape(b, c) * gamma
        if scale_shift is not None:
            s, t = scale_shift[0].float(), scale_shift[1].float()
            a = a * (1 + s)
            shift = shift * (1 + s) + t
        return x * a[:, :, None, None].to(x.dtype) + shift[:, :, None, None].to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with float32 statistics (flax's fast variance)."""

    def __init__(self, features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: Tensor) -> Tensor:
        """[..., D] -> [..., D] in the parameters' dtype."""
        xf = x.float()
        mean = xf.mean(dim=-1, keepdim=True)
        var = torch.clamp(xf.square().mean(dim=-1, keepdim=True) - mean.square(), min=0.0)
        y = (xf - mean) * (torch.rsqrt(var + self.eps) * self.weight.float())
        return (y + self.bias.float()).to(self.weight.dtype)


def load_pretrained(cls: Any, directory: str, key: str, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """Builds ``cls(config.json[key])`` and loads ``model.safetensors`` into it strictly.

    Args:
      cls: the torch module class (its constructor takes the config dict under ``key``).
      directory: folder with ``config.json`` and ``model.safetensors``.
      key: the config.json entry holding the model config ('unet', 'prior').
      dtype: parameter dtype; default: the dtype stored in the file (a bfloat16 export
        gives a bfloat16 module).
      device: where the parameters are loaded.

    Returns:
      The module with every weight loaded (``strict=True``), in training mode as any freshly
      built torch module: call ``.eval()``.

    Raises:
      FileNotFoundError: if a file is missing.
      ValueError: if config.json has no ``key`` entry, or the file's tensors do not match the
        config (the missing, unexpected and mis-shaped names are listed).
    """
    from safetensors.torch import load_file

    for name in (CONFIG_FILE, MODEL_FILE):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"no {name} in {directory}: not a {cls.__name__} export "
                                    "(write one with python -m jaxt2i.export --format=torch)")
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        record = json.load(f)
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{os.path.join(directory, CONFIG_FILE)} has no {key!r} entry")
    path = os.path.join(directory, MODEL_FILE)
    state = load_file(path, device=str(device))
    with torch.device("meta"):  # no memory or init cost before the weights arrive
        net = cls(record[key])
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)}, model {want[k]}"
                    for k in set(want) & set(state) if tuple(state[k].shape) != want[k])
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not match its config.json {key}: missing tensors "
                         f"{missing}; unexpected tensors {unexpected}; shape mismatches "
                         f"{shapes}")
    dtypes = {v.dtype for v in state.values()}
    target = dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
    state = {k: v.to(target) for k, v in state.items()}
    net.load_state_dict(state, strict=True, assign=True)
    return net
