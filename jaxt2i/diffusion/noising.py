"""Forward process q(x_t | x_0) and noise-conditioning augmentation for super-resolution.

q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)  (Ho et al. 2020 eq. 4, in alpha/sigma form).

Noise-conditioning augmentation (Imagen, Saharia et al. 2022, sec. 2.4; Ho et al. 2022
"Cascaded Diffusion Models"): the low-resolution conditioning image of an SR stage is
corrupted by the same forward process at an augmentation level, and that level is given to
the model as an extra input. Training draws the level at random per example; sampling uses
one fixed level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxt2i.diffusion import schedules as schedules_lib


def expand(v, ndim: int):
    """Right-pads the shape of `v` ([] or [B]) with 1s so it broadcasts against rank `ndim`."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim)) if v.ndim else v


def add_noise(x0, noise, alpha, sigma):
    """x_t = alpha x0 + sigma noise.

    Args:
        x0: clean data [B, ...].
        noise: standard normal noise, same shape as x0.
        alpha, sigma: scalars or [B].

    Returns:
        x_t, same shape as x0.
    """
    return expand(alpha, x0.ndim) * x0 + expand(sigma, x0.ndim) * noise


def q_sample(x0, t, noise, schedule):
    """Samples q(x_t | x_0) at schedule time t.

    Args:
        x0: clean data [B, ...].
        t: schedule times [B] (see schedules.py for the convention).
        noise: standard normal noise, same shape as x0.
        schedule: a schedule object or name.

    Returns:
        x_t, same shape as x0.
    """
    schedule = schedules_lib.as_schedule(schedule)
    return add_noise(x0, noise, schedule.alpha(t), schedule.sigma(t))


def noise_augment(rng, x_cond, *, level=None, max_level: float = 1.0, schedule='cosine'):
    """Noise-conditioning augmentation of a low-resolution conditioning image.

    Args:
        rng: PRNG key.
        x_cond: the (upsampled) low-resolution image [B, H, W, C] in [-1, 1].
        level: None in training (a level uniform in [0, max_level) per example), or the fixed
            sampling level: a scalar or [B] in [0, 1].
        max_level: upper bound of the random training level.
        schedule: schedule (object or name) whose time is the augmentation level: a continuous
            one's t = level; a discrete one's timestep = level * num_train_timesteps
            (DeepFloyd IF's noise_level 250 of 1000 is level 0.25).

    Returns:
        (augmented image [B, H, W, C], level [B] float32). Pass the level to the model; level 0 is
        (almost) no corruption, level 1 is pure noise.
    """
    schedule = schedules_lib.as_schedule(schedule)
    batch = x_cond.shape[0]
    level_rng, noise_rng = jax.random.split(rng)
    if level is None:
        level = jax.random.uniform(level_rng, (batch,), jnp.float32, 0.0, max_level)
    level = jnp.broadcast_to(jnp.asarray(level, jnp.float32), (batch,))  # [B]
    noise = jax.random.normal(noise_rng, x_cond.shape, x_cond.dtype)
    t = level * schedule.num_train_timesteps if schedule.is_discrete else level
    return q_sample(x_cond, t, noise, schedule).astype(x_cond.dtype), level
