"""Prediction targets (eps / v / x0), exact conversions between them, and the training loss.

With x_t = alpha x0 + sigma eps and alpha^2 + sigma^2 = 1:
    eps -> x0:  x0 = (x_t - sigma eps) / alpha
    x0 -> eps:  eps = (x_t - alpha x0) / sigma
    v = alpha eps - sigma x0 (Salimans & Ho 2022);  x0 = alpha x_t - sigma v,
    eps = sigma x_t + alpha v.
Loss weighting: 'uniform', or 'min_snr' (Hang et al. 2023, "Efficient Diffusion Training via
Min-SNR Weighting"): weight min(SNR, gamma) on the x0-space error, i.e. min(SNR, gamma) / SNR
for eps targets and min(SNR, gamma) / (SNR + 1) for v targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxt2i.diffusion import noising
from jaxt2i.diffusion import schedules as schedules_lib

OBJECTIVES = ('eps', 'v', 'x0')
WEIGHTINGS = ('uniform', 'min_snr')


def to_x0_eps(pred, prediction: str, x_t, alpha, sigma):
    """Converts a model prediction of any type to the pair (x0, eps).

    Args:
        pred: model output, same shape as x_t.
        prediction: what `pred` is: 'eps' | 'v' | 'x0'.
        x_t: the noisy input [B, ...].
        alpha, sigma: noise level of x_t, scalars or [B].

    Returns:
        (x0, eps), each shaped like x_t.
    """
    schedules_lib.check_choice('prediction type', prediction, OBJECTIVES)
    a, s = noising.expand(alpha, x_t.ndim), noising.expand(sigma, x_t.ndim)
    if prediction == 'eps':
        return (x_t - s * pred) / a, pred
    if prediction == 'x0':
        return pred, (x_t - a * pred) / s
    return a * x_t - s * pred, s * x_t + a * pred


def from_x0_eps(x0, eps, objective: str, alpha, sigma):
    """The `objective` quantity ('eps' | 'v' | 'x0') from x0 and eps (also the training target)."""
    schedules_lib.check_choice('objective', objective, OBJECTIVES)
    if objective == 'eps':
        return eps
    if objective == 'x0':
        return x0
    return noising.expand(alpha, x0.ndim) * eps - noising.expand(sigma, x0.ndim) * x0


def convert(pred, src: str, dst: str, x_t, alpha, sigma):
    """Converts a prediction of type `src` into type `dst` ('eps' | 'v' | 'x0')."""
    x0, eps = to_x0_eps(pred, src, x_t, alpha, sigma)
    return from_x0_eps(x0, eps, dst, alpha, sigma)


def loss_weight(logsnr, objective: str, weighting: str = 'uniform', gamma: float = 5.0):
    """Per-example loss weight [B] for a given objective.

    Args:
        logsnr: [B] log-SNR of the noised examples.
        objective: 'eps' | 'v' | 'x0'.
        weighting: 'uniform' | 'min_snr'.
        gamma: the min-SNR clamp.

    Returns:
        [B] float32 weights.
    """
    schedules_lib.check_choice('objective', objective, OBJECTIVES)
    schedules_lib.check_choice('weighting', weighting, WEIGHTINGS)
    logsnr = jnp.asarray(logsnr, jnp.float32)
    if weighting == 'uniform':
        return jnp.ones_like(logsnr)
    snr = jnp.exp(logsnr)
    clamped = jnp.minimum(snr, gamma)
    if objective == 'x0':
        return clamped
    if objective == 'eps':
        return clamped / snr
    return clamped / (snr + 1.0)


def weighted_mse(pred, target, logsnr, *, objective: str, weighting: str = 'uniform',
                 gamma: float = 5.0):
    """Weighted squared error, averaged over every non-batch axis: one value per example.

    Args:
        pred, target: [B, ...].
        logsnr: [B].
        objective, weighting, gamma: see `loss_weight`.

    Returns:
        [B] float32 per-example loss; take its mean for the batch loss.
    """
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)  # [B]
    return loss_weight(logsnr, objective, weighting, gamma) * per_example


def diffusion_loss(denoise_fn, x0, cond, rng, *, schedule, objective: str = 'eps',
                   weighting: str = 'uniform', gamma: float = 5.0):
    """The denoising training loss for one batch.

    Draws t ~ schedule.sample_t and eps ~ N(0, I), forms x_t, calls
    `denoise_fn(x_t, schedule.model_t(t), cond)` and regresses the `objective` target.

    Args:
        denoise_fn: (x_t [B, ...], model_t [B], cond) -> prediction [B, ...].
        x0: clean data [B, ...].
        cond: conditioning pytree passed through to denoise_fn.
        rng: PRNG key.
        schedule: schedule object or name.
        objective: what the model predicts: 'eps' | 'v' | 'x0'.
        weighting: 'uniform' | 'min_snr'.
        gamma: the min-SNR clamp.

    Returns:
        [B] per-example loss.
    """
    schedules_lib.check_choice('objective', objective, OBJECTIVES)
    schedule = schedules_lib.as_schedule(schedule)
    t_rng, noise_rng = jax.random.split(rng)
    t = schedule.sample_t(t_rng, (x0.shape[0],))  # [B]
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    alpha, sigma, logsnr = schedule.point(t)
    x_t = noising.add_noise(x0.astype(jnp.float32), noise, alpha, sigma)
    pred = denoise_fn(x_t, schedule.model_t(t), cond)
    target = from_x0_eps(x0.astype(jnp.float32), noise, objective, alpha, sigma)
    return weighted_mse(pred, target, logsnr, objective=objective, weighting=weighting, gamma=gamma)
