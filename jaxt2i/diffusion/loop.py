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
import math
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


def normalized_time(schedule, t):
    """Schedule time as a fraction in [0, 1] (1 = pure noise): t itself for continuous
    schedules, timestep / num_train_timesteps for discrete ones."""
    if schedule.is_discrete:
        return jnp.asarray(t, jnp.float32) / schedule.num_train_timesteps
    return jnp.asarray(t, jnp.float32)


def start_index(strength, num_steps: int):
    """First step run for an init image at `strength` S in (0, 1] (traced is fine): the last
    max(1, floor(S num_steps)) steps run, as diffusers' img2img pipelines count them."""
    run = jnp.clip(jnp.floor(jnp.asarray(strength, jnp.float32) * num_steps), 1, num_steps)
    return (num_steps - run).astype(jnp.int32)


def denoiser_evaluations(schedule, sampler, num_steps: int, spacing: str = 'default',
                         churn: float = 0.0) -> int:
    """Denoiser calls of an n-step run without editing: n, and for Heun one more per step
    that is second order (not the last step, nor one starting above `heun_sigma_max`)."""
    schedule = schedules_lib.as_schedule(schedule)
    sampler = samplers_lib.as_sampler(sampler)
    if not (isinstance(sampler, samplers_lib.EDM) and sampler.order == 2):
        return num_steps
    churn = churn or sampler.churn
    calls = num_steps
    for i in range(num_steps - 1):
        logsnr = float(schedules_lib.grid_point(schedule, spacing, i, num_steps)[0].logsnr)
        sigma_e = math.exp(-0.5 * logsnr)
        on = churn > 0 and sampler.churn_tmin <= sigma_e <= sampler.churn_tmax
        hat = sigma_e * (1.0 + min(churn / num_steps, math.sqrt(2.0) - 1.0)) if on else sigma_e
        calls += hat <= sampler.heun_sigma_max
    return calls


def sample(denoise_fn, shape: Sequence[int], rng, *, schedule, sampler='ddim',
           num_steps: int = 50, cond=None, uncond=None, guidance_scale=1.0,
           prediction: str = 'eps', thresholding='none', x_init: Optional[jax.Array] = None,
           return_trajectory: bool = False, spacing: str = 'default', churn: float = 0.0,
           init: Optional[jax.Array] = None, strength=None, mask: Optional[jax.Array] = None,
           resample: int = 0, guidance_rescale=0.0, guidance_interval=(0.0, 1.0),
           learned_variance: bool = False):
    """Generates samples by reverse diffusion from pure noise, or edits an image.

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
            'heun' (except its last step and steps above its `heun_sigma_max`;
            `denoiser_evaluations` counts them).
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
        init: a clean image [B, ...] in the model's range, for image-to-image and inpainting.
        strength: image-to-image (SDEdit, Meng et al. 2022): S in (0, 1] (traced is fine, so
            a new strength does not recompile). The loop starts at step `start_index(S)` from
            init noised to that step's level with the start noise; the earlier steps are
            skipped (`lax.cond`, no denoiser call). S = 1 starts from the start noise itself,
            exactly as without init. None = 1.
        mask: inpainting: [B, ...] or broadcastable (e.g. [B, H, W, 1]), 1 where the image is
            generated and 0 where init is kept (values between blend). After every step the
            kept region is replaced by init noised to the step's new level (q(x_t | init),
            fresh noise); after the last step it is init itself.
        resample: inpainting (static): RePaint (Lugmayr et al. 2022) jumps per step: the step's
            result is noised back to the step's start level and the step redone, `resample`
            times, so each step costs resample + 1 denoiser calls (imagen-pytorch's
            `inpaint_resample_times` = resample + 1).
        guidance_rescale: phi in [0, 1] (Lin et al. 2023, sec. 3.4): the guided prediction is
            rescaled to the conditional prediction's standard deviation (per sample) and mixed
            phi : 1 - phi with the plain guided one, as diffusers' `rescale_noise_cfg`.
        guidance_interval: (lo, hi): guidance applies only while the normalized time
            (`normalized_time`, 1 = pure noise) is in [lo, hi] (Kynkaanniemi et al. 2024);
            elsewhere the conditional prediction alone is used (w = 1), and only the
            conditional half is evaluated (a `lax.cond`: half the work outside).
        learned_variance: denoise_fn returns twice the channels of x (static): the prediction,
            then a variance interpolation v in [-1, 1] (DeepFloyd IF), which guidance leaves as
            the conditional half's and the sampler gets as `Denoised.variance`
            (`DDPM(variance='learned_range')` uses it; the other samplers ignore it).

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
    if (strength is not None or mask is not None) and init is None:
        raise ValueError('strength and mask need an init image')
    if resample and mask is None:
        raise ValueError(f'resample ({resample}) is for inpainting: it needs a mask')
    if resample < 0:
        raise ValueError(f'resample ({resample}) must be at least 0')
    shape = tuple(shape)
    init_rng, step_rng = jax.random.split(rng)
    x = (jax.random.normal(init_rng, shape, jnp.float32) if x_init is None
         else jnp.asarray(x_init, jnp.float32))
    lo, hi = guidance_interval
    full_interval = isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and (
        lo <= 0 and hi >= 1)
    start = None
    if init is not None:
        init = jnp.broadcast_to(jnp.asarray(init, jnp.float32), shape)
        if mask is not None:
            mask = jnp.asarray(mask, jnp.float32)
        if strength is not None:
            start = start_index(strength, num_steps)
            p0 = schedules_lib.grid_point(schedule, spacing, start, num_steps)[0]
            # S = 1 (start 0) keeps the start noise itself: the same images as without init.
            x = jnp.where(start == 0, x, p0.alpha * init + p0.sigma * x)
        # The kept region's noise (inpainting) and RePaint's jump noise: keys of their own, so
        # the sampler's step noise is that of a plain run.
        known_rng = jax.random.fold_in(step_rng, num_steps + 1)

    channels = shape[-1]

    def denoise_at(x_s, s: schedules_lib.Point, t_s):
        model_t = jnp.broadcast_to(schedule.model_t(t_s), (shape[0],))  # [B]
        if use_cfg:
            def guided(_):
                return guidance_lib.guided_denoise(
                    denoise_fn, x_s, model_t, cond, uncond, guidance_scale,
                    rescale=guidance_rescale,
                    guided_channels=channels if learned_variance else None)
            if full_interval:
                pred = guided(None)
            else:  # outside the interval only the conditional half runs (B, not 2B, images)
                tn = normalized_time(schedule, t_s)
                pred = jax.lax.cond((tn >= lo) & (tn <= hi), guided, lambda _: denoise_fn(
                    x_s, model_t, cond).astype(jnp.float32), None)
        else:
            pred = denoise_fn(x_s, model_t, cond).astype(jnp.float32)
        variance = None
        if learned_variance:  # [B, ..., 2C]: the prediction, then v
            pred, variance = pred[..., :channels], pred[..., channels:]
        x0, eps = losses.to_x0_eps(pred, prediction, x_s, s.alpha, s.sigma)
        if threshold.kind != 'none':
            x0 = threshold(x0)
            eps = (x_s - s.alpha * x0) / s.sigma
        return samplers_lib.Denoised(x0, eps, variance)

    def keep_known(state, t: schedules_lib.Point, key):
        """Inpainting: the kept region becomes init noised to t (init itself when clean)."""
        known = t.alpha * init + t.sigma * jax.random.normal(key, shape, jnp.float32)
        return {**state, 'x': mask * state['x'] + (1.0 - mask) * known}

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

        def advance(before, noise):
            if hasattr(sampler, 'step'):
                return sampler.step(before, denoise, s, t, noise)
            return sampler.update(before, denoise(before['x'], s), s, t, noise)  # old protocol

        def one_step(before):
            new = advance(before, noise)
            if mask is None:
                return new
            key = jax.random.fold_in(known_rng, i)
            new = keep_known(new, t, jax.random.fold_in(key, 0))

            def jump(r, new):  # RePaint: back to s with q(x_s | x_t), then the step again
                k = jax.random.split(jax.random.fold_in(key, r + 1), 3)  # fresh noise each time
                a_st = s.alpha / t.alpha
                std = jnp.sqrt(jnp.maximum(s.sigma**2 - a_st**2 * t.sigma**2, 0.0))
                x_s = a_st * new['x'] + std * jax.random.normal(k[0], shape, jnp.float32)
                again = advance({**before, 'x': x_s}, jax.random.normal(k[1], shape, jnp.float32))
                return keep_known(again, t, k[2])
            return jax.lax.fori_loop(0, resample, jump, new) if resample else new

        if start is None:
            state = one_step(state)
        else:  # image-to-image: the steps before `start` are skipped, not computed
            skip = getattr(sampler, 'skip', lambda st: st)  # e.g. a multistep grid index
            state = jax.lax.cond(i >= start, one_step, skip, state)
        return (i + 1, state), (state['x'] if return_trajectory else None)

    carry = (jnp.int32(0), sampler.initialize(x))
    (_, state), trajectory = jax.lax.scan(body, carry, None, length=num_steps)
    x0 = sampler.finalize(state)
    return (x0, trajectory) if return_trajectory else x0
