"""Classifier-free guidance, condition dropout for training it, and x0 thresholding.

Classifier-free guidance (Ho & Salimans 2022): pred = uncond + w (cond - uncond), with the
conditional and unconditional halves run as ONE batched call of the denoiser.
Thresholding (Imagen, Saharia et al. 2022, sec. 2.3): 'static' clips x0 to [-1, 1];
'dynamic' sets s = max(1, percentile(|x0|, p)) per sample, clips to [-s, s], divides by s.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp

from jaxt2i.diffusion import schedules as schedules_lib

THRESHOLDINGS = ('none', 'static', 'dynamic')


def cfg_combine(pred_cond, pred_uncond, guidance_scale):
    """uncond + w (cond - uncond); w = 1 gives the conditional prediction."""
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def concat_cond(cond, uncond):
    """Stacks the conditional and unconditional pytrees along batch: [B, ...] -> [2B, ...].

    Leaves of `uncond` may have batch 1 (e.g. one null text embedding); they are broadcast.
    """
    def cat(c, u):
        c, u = jnp.asarray(c), jnp.asarray(u)
        return jnp.concatenate([c, jnp.broadcast_to(u, c.shape).astype(c.dtype)], axis=0)
    return jax.tree.map(cat, cond, uncond)


def rescale_guidance(guided, pred_cond, phi):
    """Guidance rescale (Lin et al. 2023, eqs. (15)-(16)): the guided prediction scaled to the
    conditional one's standard deviation over each sample, mixed phi : 1 - phi with itself."""
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(pred_cond, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    rescaled = guided * (std_cond / std_guided)
    return phi * rescaled + (1.0 - phi) * guided


def guided_denoise(denoise_fn, x_t, model_t, cond, uncond, guidance_scale, rescale=0.0,
                   guided_channels: Optional[int] = None):
    """Classifier-free guided prediction with one batched denoiser call.

    Args:
        denoise_fn: (x [2B, ...], model_t [2B], cond pytree of [2B, ...]) -> [2B, ...].
        x_t: noisy sample [B, ...].
        model_t: [B] noise-level input of the model.
        cond, uncond: conditioning pytrees with equal structure (uncond leaves may have batch 1).
            Leaves that do not depend on the text (low-res image, aug level) repeat in uncond.
        guidance_scale: w, a float or traced scalar.
        rescale: guidance rescale phi (`rescale_guidance`); 0 = plain guidance.
        guided_channels: None (every channel is guided), or k: only the first k channels of
            the last axis are; the others are the conditional half's (DeepFloyd IF guides its
            eps and keeps the conditional learned variance).

    Returns:
        Guided prediction [B, ...] (float32).
    """
    batch = x_t.shape[0]
    out = denoise_fn(jnp.concatenate([x_t, x_t], axis=0),
                     jnp.concatenate([model_t, model_t], axis=0),
                     concat_cond(cond, uncond)).astype(jnp.float32)  # [2B, ...]
    pred_cond, pred_uncond, kept = out[:batch], out[batch:], None
    if guided_channels is not None:
        kept = pred_cond[..., guided_channels:]
        pred_cond = pred_cond[..., :guided_channels]
        pred_uncond = pred_uncond[..., :guided_channels]
    guided = cfg_combine(pred_cond, pred_uncond, guidance_scale)
    if not (isinstance(rescale, (int, float)) and rescale == 0):
        guided = rescale_guidance(guided, pred_cond, rescale)
    return guided if kept is None else jnp.concatenate([guided, kept], axis=-1)


def drop_condition(rng, cond, uncond, drop_prob: float):
    """Training-side condition dropout: each example's cond becomes uncond with prob drop_prob.

    Args:
        rng: PRNG key.
        cond: pytree of [B, ...] leaves (e.g. {'text': [B, L, D], 'mask': [B, L]}).
        uncond: same structure; leaves broadcastable to the cond leaves (e.g. zeros [1, L, D] and
            an all-False mask for the null text).
        drop_prob: probability of dropping, 0.1 in Imagen.

    Returns:
        (cond with dropped examples replaced, dropped [B] bool).
    """
    batch = jax.tree.leaves(cond)[0].shape[0]
    dropped = jax.random.bernoulli(rng, drop_prob, (batch,))  # [B]

    def pick(c, u):
        keep = dropped.reshape((batch,) + (1,) * (c.ndim - 1))
        return jnp.where(keep, jnp.broadcast_to(u, c.shape).astype(c.dtype), c)
    return jax.tree.map(pick, cond, uncond), dropped


def static_threshold(x0):
    """Clips x0 to [-1, 1]."""
    return jnp.clip(x0, -1.0, 1.0)


def dynamic_threshold(x0, percentile: float = 99.5, max_value: Optional[float] = None):
    """Imagen's dynamic thresholding.

    Args:
        x0: predicted clean sample [B, ...].
        percentile: p in [0, 100]; s is the p-th percentile of |x0| over each sample (linear
            interpolation, like numpy / torch.quantile).
        max_value: optional upper clamp of s (diffusers' `sample_max_value`); None = paper.

    Returns:
        x0 clipped to [-s, s] and divided by s, with s = max(1, percentile) per sample.
    """
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)  # [B, N]
    s = jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0)  # [B]
    if max_value is not None:
        s = jnp.minimum(s, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


@dataclasses.dataclass(frozen=True)
class Thresholding:
    """How the x0 prediction is thresholded inside each sampler step.

    kind: 'none' | 'static' | 'dynamic'; percentile and max_value apply to 'dynamic'.
    """

    kind: str = 'dynamic'
    percentile: float = 99.5
    max_value: Optional[float] = None

    def __post_init__(self):
        schedules_lib.check_choice('thresholding', self.kind, THRESHOLDINGS)
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f'thresholding percentile ({self.percentile}) must be in [0, 100]')

    def __call__(self, x0):
        if self.kind == 'static':
            return static_threshold(x0)
        if self.kind == 'dynamic':
            return dynamic_threshold(x0, self.percentile, self.max_value)
        return x0


def as_thresholding(thresholding: Union[str, Thresholding, None]) -> Thresholding:
    """A Thresholding from a Thresholding, a kind name, or None ('none')."""
    if isinstance(thresholding, Thresholding):
        return thresholding
    return Thresholding(kind='none' if thresholding is None else thresholding)
