"""The reverse-diffusion loop: one `jax.lax.scan` over sampler steps.

Step times are computed inside the scan from the step index, so the traced program (and its
compile time) does not depend on the number of steps. `sample` is a pure, traceable function:
jit it with the configuration static, and the model parameters as a traced argument, e.g.

    @jax.jit
    def generate(params, cond, uncond, rng):
        fn = lambda x, t, c: unet.apply(params, x, t, c)
        return sample(fn, (8, 64, 64, 3), rng, cond=cond, uncond=uncond, schedule='cosine',
                                    sampler='dpmpp_2m', num_steps=50, guidance_scale=5.0,
                                    prediction='eps', thresholding='dynamic')
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from jaxt2i.diffusion import guidance as guidance_lib
from jaxt2i.diffusion import losses
from jaxt2i.diffusion import samplers as samplers_lib
from jaxt2i.diffusion import schedules as schedules_lib


def _point_after(schedule, i, num_steps: int) -> schedules_lib.Point:
    """Noise level after step i: the next grid point, or the clean point after the last step."""
    nxt = schedule.point(schedule.sampling_time(jnp.minimum(i + 1, num_steps - 1), num_steps))
    last = i + 1 >= num_steps
    return schedules_lib.Point(*(jnp.where(last, c, n) for c, n in
                                 zip(schedules_lib.clean_point(), nxt)))


def sample(denoise_fn, shape: Sequence[int], rng, *, schedule, sampler='ddim',
           num_steps: int = 50, cond=None, uncond=None, guidance_scale=1.0,
           prediction: str = 'eps', thresholding='none', x_init: Optional[jax.Array] = None,
           return_trajectory: bool = False):
    """Generates samples by reverse diffusion from pure noise.

    Args:
        denoise_fn: (x_t [B', ...], model_t [B'] float32, cond) -> prediction [B', ...]; B' = 2B
            with guidance. model_t is `schedule.model_t(t)`: continuous time t in [0, 1] (or
            log-SNR if the schedule says model_input='logsnr'), or the diffusers timestep for a
            discrete schedule.
        shape: output shape [B, ...] (static).
        rng: PRNG key; split into the initial noise and per-step noise (fold_in of the step).
        schedule: schedule object or name (static).
        sampler: 'ddpm' | 'ddim' | 'dpmpp_2m' or a sampler object, e.g. DDIM(eta=1.0) (static).
        num_steps: number of denoiser evaluations (static).
        cond: conditioning pytree of [B, ...] leaves, passed to denoise_fn (None allowed).
        uncond: unconditional pytree with the structure of cond (leaves may have batch 1). When
            given, classifier-free guidance runs cond and uncond as one batched call of size 2B.
        guidance_scale: w (float or traced scalar); needs uncond unless it is 1.
        prediction: what denoise_fn predicts: 'eps' | 'v' | 'x0' (static).
        thresholding: 'none' | 'static' | 'dynamic' or a guidance.Thresholding (static); applied
            to the x0 prediction in every step.
        x_init: optional initial noise [B, ...] (replaces the draw from rng).
        return_trajectory: also return x after every step, [num_steps, B, ...].

    Returns:
        x_0 [B, ...] float32, or (x_0, trajectory) if return_trajectory.
    """
    schedule = schedules_lib.as_schedule(schedule)
    sampler = samplers_lib.as_sampler(sampler)
    threshold = guidance_lib.as_thresholding(thresholding)
    schedules_lib.check_choice('prediction type', prediction, losses.OBJECTIVES)
    if num_steps < 1:
        raise ValueError(f'num_steps ({num_steps}) must be at least 1')
    use_cfg = uncond is not None
    if not use_cfg and isinstance(guidance_scale, (int, float)) and guidance_scale != 1:
        raise ValueError(f'guidance_scale ({guidance_scale}) needs an uncond pytree')
    shape = tuple(shape)
    init_rng, step_rng = jax.random.split(rng)
    x = (jax.random.normal(init_rng, shape, jnp.float32) if x_init is None
         else jnp.asarray(x_init, jnp.float32))

    def denoise(x_s, s: schedules_lib.Point, t_s):
        model_t = jnp.broadcast_to(schedule.model_t(t_s), (shape[0],))  # [B]
        if use_cfg:
            pred = guidance_lib.guided_denoise(denoise_fn, x_s, model_t, cond, uncond,
                                               guidance_scale)
        else:
            pred = denoise_fn(x_s, model_t, cond).astype(jnp.float32)
        x0, eps = losses.to_x0_eps(pred, prediction, x_s, s.alpha, s.sigma)
        if threshold.kind != 'none':
            x0 = threshold(x0)
            eps = (x_s - s.alpha * x0) / s.sigma
        return samplers_lib.Denoised(x0, eps)

    def body(carry, _):
        i, state = carry
        t_s = schedule.sampling_time(i, num_steps)
        s = schedule.point(t_s)
        t = _point_after(schedule, i, num_steps)
        noise = jax.random.normal(jax.random.fold_in(step_rng, i), shape, jnp.float32)
        state = sampler.update(state, denoise(state['x'], s, t_s), s, t, noise)
        return (i + 1, state), (state['x'] if return_trajectory else None)

    carry = (jnp.int32(0), sampler.initialize(x))
    (_, state), trajectory = jax.lax.scan(body, carry, None, length=num_steps)
    x0 = sampler.finalize(state)
    return (x0, trajectory) if return_trajectory else x0
