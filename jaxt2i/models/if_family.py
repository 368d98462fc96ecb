"""DeepFloyd IF as a `Stage` family: the stage-level config around an `IFUNet` and how a
`Stage`'s inputs map onto it.

What a Stage means and what IF's U-Net takes (diffusers' IF pipelines):

  x_t, t         x_t [B, H, W, 3]; t the DDPM timestep (the stage's discrete schedule).
  text           the T5 hidden states, without a text mask in attention: IF's pipelines pass
                 none, so padded positions are seen (their T5 outputs, as T5 computes them).
  stage II       cond['lowres'] is the low-res image upsampled to H x W (bilinear,
                 align_corners=True, `upsample`) and noised by the stage's augmentation
                 schedule (DDPM squaredcos, `Stage.augment`); it is concatenated after x_t
                 ([x_t, lowres], 6 channels). cond['aug_level'] in [0, 1] is IF's noise level
                 over AUG_TIMESTEPS: the U-Net's `class_labels` = aug_level * 1000, so IF's
                 default noise_level 250 is aug_level 0.25.
  output         [B, H, W, 6] for IF's published stages: eps, then the learned-range variance
                 interpolation v in [-1, 1] (Nichol & Dhariwal 2021 eq. 15), which the DDPM
                 sampler uses (`jaxt2i.diffusion.DDPM(variance='learned_range')`); the
                 deterministic samplers take eps alone (`Stage.denoise`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.models import if_unet

# The noise levels of IF's stage-II augmentation: its image_noising_scheduler is a 1000-step
# DDPM, and the U-Net's class embedding takes that scheduler's timestep.
AUG_TIMESTEPS = 1000
OBJECTIVES = ("eps",)


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"IF model.{field} must be {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class IFModelConfig:
    """An IF stage's `model` section: the U-Net and the sizes the Stage samples at.

    Attributes:
      unet: the `IFUNetConfig` (diffusers' fields).
      image_size: the stage's output side (IF: 64 for stage I, 256 for stage II).
      lowres_size: side of the previous stage's images (stage II: 64); 0 for stage I.
      channels: image channels (3); the U-Net takes 2x for stage II and predicts 1x (eps) or
        2x (eps and the learned-range variance).
      objective: what the first `channels` output channels predict ('eps').
    """

    unet: if_unet.IFUNetConfig
    image_size: int
    lowres_size: int = 0
    channels: int = 3
    objective: str = "eps"

    def __post_init__(self):
        u, c = self.unet, self.channels
        if not isinstance(self.image_size, int) or self.image_size < 1 or \
                self.image_size % u.size_factor:
            _fail("image_size", self.image_size, f"a positive multiple of {u.size_factor}")
        if not isinstance(self.lowres_size, int) or not 0 <= self.lowres_size < self.image_size:
            _fail("lowres_size", self.lowres_size, f"0 (stage I) or in [1, {self.image_size})")
        if self.objective not in OBJECTIVES:
            _fail("objective", self.objective, f"one of {OBJECTIVES}")
        if u.in_channels != c * (2 if self.is_sr else 1):
            _fail("unet.in_channels", u.in_channels,
                  f"{c * (2 if self.is_sr else 1)} for a stage with lowres_size "
                  f"{self.lowres_size} and {c} image channels")
        if u.out_channels not in (c, 2 * c):
            _fail("unet.out_channels", u.out_channels, f"{c} (eps) or {2 * c} (eps + variance)")
        if (u.class_embed_type == "timestep") != self.is_sr:
            _fail("unet.class_embed_type", u.class_embed_type,
                  "'timestep' for a super-resolution stage (it takes the noise level) and "
                  "None otherwise")

    @property
    def is_sr(self) -> bool:
        return self.lowres_size > 0

    @property
    def learned_variance(self) -> bool:
        """The network also predicts the learned-range variance interpolation."""
        return self.unet.out_channels == 2 * self.channels

    @property
    def text_dim(self) -> int:
        return self.unet.text_dim

    @property
    def dtype(self) -> str:
        return self.unet.dtype

    @property
    def remat(self) -> bool:
        return self.unet.remat

    @property
    def remat_policy(self) -> str:
        return self.unet.remat_policy

    @property
    def crop_size(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"unet": self.unet.to_dict(), "image_size": self.image_size,
                "lowres_size": self.lowres_size, "channels": self.channels,
                "objective": self.objective}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], dtype: str | None = None) -> "IFModelConfig":
        """Parses `to_dict()` output (`dtype` overrides the U-Net's compute dtype).

        Raises ValueError naming an unknown or missing field.
        """
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown IF model field(s) {unknown}; allowed: {', '.join(allowed)}")
        if not isinstance(d.get("unet"), Mapping) or "image_size" not in d:
            raise ValueError("an IF model section needs 'unet' (an object) and 'image_size'")
        unet = dict(d["unet"], **({"dtype": dtype} if dtype else {}))
        return cls(**dict(d, unet=if_unet.IFUNetConfig.from_dict(unet)))


@functools.lru_cache(maxsize=None)
def align_corners_matrix(n: int, size: int) -> np.ndarray:
    """[size, n] float32 M with M @ v == torch's bilinear interpolate(align_corners=True) of v.

    Output i samples the input at i (n - 1) / (size - 1) (torch's float32 arithmetic), so the
    corners map to the corners.
    """
    f = np.float32
    scale = f((n - 1) / (size - 1)) if size > 1 else f(0)
    src = scale * np.arange(size, dtype=f)
    lo = np.minimum(np.floor(src).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = (src - lo.astype(f)).astype(f)
    m = np.zeros((size, n), f)
    np.add.at(m, (np.arange(size), lo), f(1) - w)
    np.add.at(m, (np.arange(size), hi), w)
    return m


def upsample(lowres, size: int):
    """[B, h, w, C] -> [B, size, size, C] float32, as diffusers' IF super-resolution pipeline
    upscales its input (bilinear, align_corners=True)."""
    lowres = jnp.asarray(lowres, jnp.float32)
    h, w = lowres.shape[1:3]
    if (h, w) == (size, size):
        return lowres
    rows, cols = align_corners_matrix(h, size), align_corners_matrix(w, size)
    return jnp.einsum("Hh,bhwc,Ww->bHWc", rows, lowres, cols,
                      precision=jax.lax.Precision.HIGHEST)


class IFFamily:
    """The 'if' family of `jaxt2i.models.registry`."""

    name = "if"

    def config_from_dict(self, section: Mapping[str, Any], dtype: str | None = None):
        return IFModelConfig.from_dict(section, dtype)

    def network(self, cfg: IFModelConfig):
        return if_unet.IFUNet(cfg.unet)

    def example_inputs(self, cfg: IFModelConfig, batch_size: int, text_len: int) -> dict:
        return if_unet.example_inputs(cfg.unet, batch_size, text_len, image_size=cfg.image_size)

    def param_shapes(self, cfg: IFModelConfig):
        return if_unet.param_shapes(cfg.unet)

    def count_params(self, cfg: IFModelConfig) -> int:
        return if_unet.count_params(cfg.unet)

    def learned_variance(self, cfg: IFModelConfig) -> bool:
        return cfg.learned_variance

    def network_inputs(self, cfg: IFModelConfig, x_t, t, cond: Mapping[str, Any]
                       ) -> tuple[tuple, dict]:
        """`IFUNet`'s arguments for a Stage's [B, H, W, C] x_t, t and cond (module
        docstring); it returns [B, H, W, C or 2C]."""
        x, aug = x_t, None
        if cond.get("lowres") is not None:
            low = upsample(cond["lowres"], x_t.shape[1])  # already x_t's size: unchanged
            x = jnp.concatenate([x_t, low.astype(x_t.dtype)], axis=-1)
            aug = jnp.asarray(cond["aug_level"], jnp.float32) * AUG_TIMESTEPS
        if (cond.get("lowres") is not None) != cfg.is_sr:
            raise ValueError("an IF stage-II U-Net needs cond['lowres'] and cond['aug_level'] "
                             "(and a stage-I U-Net takes neither)")
        return (x, t, cond["text_emb"], None, aug), {}

    def upsample(self, cfg: IFModelConfig, lowres, size: int):
        return upsample(lowres, size)


__all__ = ["AUG_TIMESTEPS", "IFFamily", "IFModelConfig", "align_corners_matrix", "upsample"]
