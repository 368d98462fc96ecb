"""The reverse-diffusion loop: one `jax.lax.scan` over sampler steps.

Step times (of any step grid: `spacing`) are computed inside the scan from the step index, so
the traced program (and its compile time) does not depend on the number of steps. Each step
calls `sampler.step(state, denoise, s, t, noise)` with a closure `denoise(x, point)` (guided,
thresholded x0 and eps), which a sampler may call more than once per step (Heun). `sample`
is a pure, traceable function: jit it with the configuration static, and the model parameters
as a traced argument, e.g.

    @jax.jit
    def generate(params, cond, uncond, rng):
        fn = lambda x, t, c: unet.apply(params, x, t, c)
        return sample(fn, (8, 64, 64, 3), rng, cond=cond, uncond=uncond, schedule='cosine',
                                    sampler='dpmpp_2m', num_steps=50, guidance_scale=5.0,
                                    prediction='eps', thresholding='dynamic')
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from jaxt2i.diffusion import guidance as guidance_lib
from jaxt2i.diffusion import losses
from jaxt2i.diffusion import samplers as samplers_lib
from jaxt2i.diffusion import schedules as schedules_lib


def _point_after(schedule, spacing: str, i, num_steps: int):
    """(Point, time) after step i: the next grid point, or the clean point (time 0) after the
    last step."""
    nxt, nxt_time = schedules_lib.grid_point(schedule, spacing, jnp.minimum(i + 1, num_steps - 1),
                                             num_steps)
    last = i + 1 >= num_steps
    point = schedules_lib.Point(*(jnp.where(last, c, n) for c, n in
                                  zip(schedules_lib.clean_point(), nxt)))
    return point, jnp.where(last, 0.0, nxt_time)


def sample(denoise_fn, shape: Sequence[int], rng, *, schedule, sampler='ddim',
           num_steps: int = 50, cond=None, uncond=None, guidance_scale=1.0,
           prediction: str = 'eps', thresholding='none', x_init: Optional[jax.Array] = None,
           return_trajectory: bool = False, spacing: str = 'default', churn: float = 0.0):
    """Generates samples by reverse diffusion from pure noise.

    Args:
        denoise_fn: (x_t [B', ...], model_t [B'] float32, cond) -> prediction [B', ...]; B' = 2B
            with guidance. model_t is `schedule.model_t(t)`: continuous time t in [0, 1] (or
            log-SNR if the schedule says model_input='logsnr'), or the diffusers timestep for a
            discrete schedule.
        shape: output shape [B, ...] (static).
        rng: PRNG key; split into the initial noise and per-step noise (fold_in of the step).
        schedule: schedule object or name (static).
        sampler: 'ddpm' | 'ddim' | 'dpmpp_2m' | 'dpmpp_2m_sde' | 'dpmpp_3m' | 'dpmpp_3m_sde' |
            'euler' | 'heun' or a sampler object, e.g. DDIM(eta=1.0) (static).
        num_steps: number of sampler steps (static); one denoiser evaluation each, two for
            'heun' (except its last step).
        cond: conditioning pytree of [B, ...] leaves, passed to denoise_fn (None allowed).
        uncond: unconditional pytree with the structure of cond (leaves may have batch 1). When
            given, classifier-free guidance runs cond and uncond as one batched call of size 2B.
        guidance_scale: w (float or traced scalar); needs uncond unless it is 1.
        prediction: what denoise_fn predicts: 'eps' | 'v' | 'x0' (static).
        thresholding: 'none' | 'static' | 'dynamic' or a guidance.Thresholding (static); applied
            to the x0 prediction in every step.
        x_init: optional initial noise [B, ...] (replaces the draw from rng).
        return_trajectory: also return x after every step, [num_steps, B, ...].
        spacing: the step grid (static): 'default' (the schedule's `sampling_time`), 'karras'
            (rho = 7 sigma spacing) or 'logsnr' (uniform log-SNR); see `schedules.grid_point`.
        churn: EDM's S_churn (static) for 'euler' / 'heun' (0 = deterministic); replaces the
            sampler object's own value when nonzero. Other samplers refuse a nonzero churn.

    Returns:
        x_0 [B, ...] float32, or (x_0, trajectory) if return_trajectory.
    """
    schedule = schedules_lib.as_schedule(schedule)
    sampler = samplers_lib.as_sampler(sampler)
    threshold = guidance_lib.as_thresholding(thresholding)
    schedules_lib.check_choice('prediction type', prediction, losses.OBJECTIVES)
    schedules_lib.check_choice('step spacing', spacing, schedules_lib.GRID_SPACINGS)
    if num_steps < 1:
        raise ValueError(f'num_steps ({num_steps}) must be at least 1')
    if churn:
        if not isinstance(sampler, samplers_lib.EDM):
            raise ValueError(f'churn ({churn}) applies only to the samplers '
                             f'{", ".join(map(repr, samplers_lib.CHURN_SAMPLERS))}')
        sampler = dataclasses.replace(sampler, churn=float(churn))
    if hasattr(sampler, 'for_steps'):
        sampler = sampler.for_steps(num_steps)
    use_cfg = uncond is not None
    if not use_cfg and isinstance(guidance_scale, (int, float)) and guidance_scale != 1:
        raise ValueError(f'guidance_scale ({guidance_scale}) needs an uncond pytree')
    shape = tuple(shape)
    init_rng, step_rng = jax.random.split(rng)
    x = (jax.random.normal(init_rng, shape, jnp.float32) if x_init is None
         else jnp.asarray(x_init, jnp.float32))

    def denoise_at(x_s, s: schedules_lib.Point, t_s):
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
        s, s_time = schedules_lib.grid_point(schedule, spacing, i, num_steps)
        t, t_time = _point_after(schedule, spacing, i, num_steps)
        noise = jax.random.normal(jax.random.fold_in(step_rng, i), shape, jnp.float32)

        def denoise(x, point: schedules_lib.Point) -> samplers_lib.Denoised:
            """Predictions at `point`: the grid's time for s and t (checked by identity at
            trace time), else the schedule's time of its log-SNR (s itself where equal)."""
            if point is s:
                time = s_time
            elif point is t:
                time = t_time
            else:
                time = jnp.where(point.logsnr == s.logsnr, s_time,
                                 schedule.time_at_logsnr(point.logsnr))
            return denoise_at(x, point, time)

        if hasattr(sampler, 'step'):
            state = sampler.step(state, denoise, s, t, noise)
        else:  # a sampler of the old protocol (update only)
            state = sampler.update(state, denoise(state['x'], s), s, t, noise)
        return (i + 1, state), (state['x'] if return_trajectory else None)

    carry = (jnp.int32(0), sampler.initialize(x))
    (_, state), trajectory = jax.lax.scan(body, carry, None, length=num_steps)
    x0 = sampler.finalize(state)
    return (x0, trajectory) if return_trajectory else x0
