"""Sampler steps: DDPM ancestral, DDIM, DPM-Solver++ (2M, 3M, SDE), EDM Euler and Heun.

Every sampler is a frozen dataclass with one shared protocol, run by `loop.sample` inside one
`jax.lax.scan`:

    sampler = sampler.for_steps(num_steps)                # static: the run's step count
    state = sampler.initialize(x_T)                       # pytree with state['x']
    state = sampler.step(state, denoise, s, t, noise)     # one step from point s to point t
    x_0   = sampler.finalize(state)

`denoise(x, point) -> Denoised` is the loop's closure: the (guided, thresholded) predictions
x0 and eps of the model at noise level `point` for the sample x at that level. A step may call
it more than once (Heun: at s and at t) or at a level off the grid (churn); its model time is
the grid's time for `s` and `t` themselves and `schedule.time_at_logsnr` otherwise. `s` and `t`
are `schedules.Point`s (alpha, sigma, logsnr) with t less noisy than s (the last t is the
clean point alpha = 1, sigma = 0, logsnr = inf); `noise` is N(0, I) shaped like x, used only by
stochastic samplers (deterministic ones ignore it and XLA removes it).

Single-evaluation samplers subclass `Sampler` and define `update(state, denoised, s, t, noise)`
with `denoised = denoise(state['x'], s)`; its default `step` makes that one call.

All formulas are written for a general pair of noise levels (alpha, sigma), so they hold for
any step count and step grid on continuous and discrete schedules. With alpha_ts = alpha_s /
alpha_t and sigma2_ts = sigma_s^2 - alpha_ts^2 sigma_t^2 (Kingma et al. 2021, VDM, appendix A),
the posterior q(x_t | x_s, x_0) has
    mean = alpha_ts sigma_t^2 / sigma_s^2 x_s + alpha_t sigma2_ts / sigma_s^2 x_0
    var  = sigma2_ts sigma_t^2 / sigma_s^2,
which for adjacent DDPM timesteps is Ho et al. 2020 eqs. (6)-(7).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jaxt2i.diffusion import schedules as schedules_lib
from jaxt2i.diffusion.schedules import Point

SAMPLER_NAMES = ('ddpm', 'ddim', 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_3m', 'dpmpp_3m_sde',
                 'euler', 'heun')
# Samplers that take EDM's churn (S_churn > 0 adds noise before each step).
CHURN_SAMPLERS = ('euler', 'heun')


class Denoised(NamedTuple):
    """The model's clean-sample and noise predictions at the current point, shaped like x,
    and, for a model with a learned variance (DeepFloyd IF), its variance interpolation v in
    [-1, 1] (None otherwise)."""
    x0: jax.Array
    eps: jax.Array
    variance: Optional[jax.Array] = None


def _posterior(s: Point, t: Point):
    """Coefficients (c_x, c_x0, var) of q(x_t | x_s, x_0) = N(c_x x_s + c_x0 x_0, var)."""
    alpha_ts = s.alpha / t.alpha
    sigma2_ts = jnp.maximum(s.sigma**2 - alpha_ts**2 * t.sigma**2, 0.0)
    c_x = alpha_ts * t.sigma**2 / s.sigma**2
    c_x0 = t.alpha * sigma2_ts / s.sigma**2
    return c_x, c_x0, sigma2_ts * t.sigma**2 / s.sigma**2


class Sampler:
    """Defaults of the sampler protocol: state {'x': x}, one denoiser call per step."""

    def for_steps(self, num_steps: int) -> 'Sampler':
        """The sampler for a run of `num_steps` steps (static); most ignore it."""
        del num_steps
        return self

    def initialize(self, x):
        return {'x': x}

    def step(self, state, denoise, s: Point, t: Point, noise):
        """One step from s to t: `update` with the predictions at (state['x'], s)."""
        return self.update(state, denoise(state['x'], s), s, t, noise)

    def update(self, state, denoised: Denoised, s: Point, t: Point, noise):
        raise NotImplementedError

    def finalize(self, state):
        return state['x']


DDPM_VARIANCES = ('fixed_small', 'learned_range')
# diffusers clamps the posterior variance to this before taking its log.
_MIN_VARIANCE = 1e-20


@dataclasses.dataclass(frozen=True)
class DDPM(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2 and eqs. (6)-(7)).

    x_t ~ q(x_t | x_s, x_0 = x0_pred), mean as the posterior's, with the variance
      'fixed_small':   the posterior variance beta~ = sigma2_ts sigma_t^2 / sigma_s^2 (Ho et al.
                       eq. 7; diffusers' DDPMScheduler 'fixed_small'), or
      'learned_range': the model's interpolation v in [-1, 1] between beta~ and
                       beta = sigma2_ts (1 - alpha_s^2 / alpha_t^2, the step's own beta) in the
                       log domain, Nichol & Dhariwal 2021 eq. 15:
                       log var = frac log beta + (1 - frac) log beta~, frac = (v + 1) / 2
                       (beta~ clamped to 1e-20 first; DeepFloyd IF, diffusers' 'learned_range').
    The last step, to the clean point, adds no noise.
    """

    variance: str = 'fixed_small'

    def __post_init__(self):
        schedules_lib.check_choice('DDPM variance', self.variance, DDPM_VARIANCES)

    def mean_std(self, x, denoised: Denoised, s: Point, t: Point):
        """Mean and standard deviation of the step's Gaussian: x_t = mean + std * noise."""
        c_x, c_x0, var = _posterior(s, t)
        mean = c_x * x + c_x0 * denoised.x0
        if self.variance == 'fixed_small':
            return mean, jnp.sqrt(var)
        if denoised.variance is None:
            raise ValueError("DDPM(variance='learned_range') needs a model that predicts its "
                             'variance (Denoised.variance; sample(..., learned_variance=True))')
        alpha_ts = s.alpha / t.alpha
        beta = jnp.maximum(s.sigma**2 - alpha_ts**2 * t.sigma**2, _MIN_VARIANCE)
        frac = (denoised.variance.astype(jnp.float32) + 1.0) / 2.0
        log_var = frac * jnp.log(beta) + (1.0 - frac) * jnp.log(jnp.maximum(var, _MIN_VARIANCE))
        return mean, jnp.where(t.sigma > 0, jnp.exp(0.5 * log_var), 0.0)

    def update(self, state, denoised: Denoised, s: Point, t: Point, noise):
        mean, std = self.mean_std(state['x'], denoised, s, t)
        return {'x': mean + std * noise}


@dataclasses.dataclass(frozen=True)
class DDIM(Sampler):
    """DDIM (Song et al. 2021, eq. (12), with sigma_eta of eq. (16)).

    x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps + c noise, c^2 = eta^2 * (posterior variance).
    eta = 0 is deterministic; eta = 1 has DDPM's step variance. When thresholding changed x0,
    eps is re-derived from the thresholded x0 (diffusers' `use_clipped_model_output=True`).
    """

    eta: float = 0.0

    def update(self, state, denoised: Denoised, s: Point, t: Point, noise):
        c2 = self.eta**2 * _posterior(s, t)[2]
        direction = jnp.sqrt(jnp.maximum(t.sigma**2 - c2, 0.0))
        x = t.alpha * denoised.x0 + direction * denoised.eps
        if self.eta:
            x = x + jnp.sqrt(c2) * noise
        return {'x': x}


@dataclasses.dataclass(frozen=True)
class DPMSolverPP(Sampler):
    """Multistep DPM-Solver++ in data (x0) prediction (Lu et al. 2022, arXiv:2211.01095), as
    diffusers' DPMSolverMultistepScheduler (algorithm_type 'dpmsolver++' or, with sde=True,
    'sde-dpmsolver++'; solver_type 'midpoint'; lower_order_final=True; final_sigmas_type
    'zero').

    With lambda = logsnr / 2, h = lambda_t - lambda_s, x0 predictions m0 (at s), m1, m2 (the
    two previous steps) and r0 = h_0 / h, r1 = h_1 / h (h_0, h_1 the previous steps' h):
        ODE:  x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) D0 + c1 D1 + c2 D2
        SDE:  x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) D0 + c1 D1 + c2 D2
                    + sigma_t sqrt(1 - e^-2h) noise
    First order: D0 = m0, no D1, D2 (ODE: DDIM with eta = 0). Second order (2M, midpoint):
    D1 = (m0 - m1) / r0 with c1 = half D0's coefficient. Third order (3M): D1_0 = (m0 - m1) / r0,
    D1_1 = (m1 - m2) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
    D2 = (D1_0 - D1_1) / (r0 + r1), and
        ODE:  c1 = alpha_t ((e^-h - 1) / h + 1),      c2 = alpha_t (1/2 - (e^-h - 1 + h) / h^2)
        SDE:  c1 = alpha_t ((1 - e^-2h) / (-2h) + 1), c2 = alpha_t (1/2 + (1 - e^-2h - 2h) / (4h^2))
    (each c the integral of alpha_t e^-(k(h - u)) times the Taylor term, k = 1 or 2, so
    c2 = O(h)). Deviation: diffusers (0.42) has -1/2 in the SDE c2, an O(1) coefficient, with
    which 3M SDE converges slowly (variance still 11-22% off at 100 steps on Gaussian data);
    ours is k-diffusion's -phi_3 (sample_dpmpp_3m_sde). The order used at step i of n is
    diffusers': 1 at the first step and at the last (to the clean point), at most i + 1
    otherwise, and at most 2 at step n - 2 when n < 15.
    """

    order: int = 2
    sde: bool = False
    num_steps: int = 0  # set by `for_steps` (the 3M order rule looks at it)

    def __post_init__(self):
        if self.order not in (1, 2, 3):
            raise ValueError(f'DPM-Solver++ order ({self.order}) must be 1, 2 or 3')

    def for_steps(self, num_steps: int) -> 'DPMSolverPP':
        return dataclasses.replace(self, num_steps=num_steps)

    def initialize(self, x):
        # i: steps taken (the history's length); k: the step's index in the run's grid (they
        # differ after the steps an image-to-image run skips, see `skip`)
        state = {'x': x, 'i': jnp.int32(0), 'k': jnp.int32(0)}
        for k in range(1, self.order):  # history of x0 predictions and their lambdas
            state[f'x0_{k}'] = jnp.zeros_like(x)
            state[f'lambda_{k}'] = jnp.float32(0.0)
        return state

    def skip(self, state):
        """A grid step an image-to-image run does not take: only the grid index moves on."""
        return {**state, 'k': state['k'] + 1}

    def update(self, state, denoised: Denoised, s: Point, t: Point, noise):
        x, m0, i = state['x'], denoised.x0, state['i']
        lambda_s, lambda_t = 0.5 * s.logsnr, 0.5 * t.logsnr
        h = lambda_t - lambda_s
        if self.sde:
            x_coef = (t.sigma / s.sigma) * jnp.exp(-h)
            d0_coef = -t.alpha * jnp.expm1(-2.0 * h)  # alpha_t (1 - e^-2h)
        else:
            x_coef = t.sigma / s.sigma
            d0_coef = -t.alpha * jnp.expm1(-h)  # alpha_t (1 - e^-h)
        extra = 0.0
        if self.order >= 2:
            final = t.sigma <= 0  # the last step goes to the clean point: first order
            use2 = (i >= 1) & ~final
            m1 = state['x0_1']
            r0 = (lambda_s - state['lambda_1']) / h
            d1 = (m0 - m1) / r0
            extra = jnp.where(use2, 0.5 * d0_coef, 0.0) * jnp.where(use2, d1, 0.0)
            if self.order == 3:
                n = self.num_steps
                use3 = use2 & (i >= 2) & ~((state['k'] == n - 2) & (n < 15))
                m2 = state['x0_2']
                r1 = (state['lambda_1'] - state['lambda_2']) / h
                d1_0, d1_1 = d1, (m1 - m2) / r1
                d1_3 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2_3 = (d1_0 - d1_1) / (r0 + r1)
                if self.sde:
                    e = jnp.expm1(-2.0 * h)  # e^-2h - 1
                    c1 = t.alpha * (e / (2.0 * h) + 1.0)
                    c2 = t.alpha * ((-e - 2.0 * h) / (2.0 * h) ** 2 + 0.5)
                else:
                    e = jnp.expm1(-h)
                    c1 = t.alpha * (e / h + 1.0)
                    c2 = -t.alpha * ((e + h) / h**2 - 0.5)
                third = jnp.where(use3, c1, 0.0) * jnp.where(use3, d1_3, 0.0) + \
                    jnp.where(use3, c2, 0.0) * jnp.where(use3, d2_3, 0.0)
                extra = jnp.where(use3, third, extra)
        out = x_coef * x + d0_coef * m0 + extra
        if self.sde:
            out = out + t.sigma * jnp.sqrt(-jnp.expm1(-2.0 * h)) * noise
        new = {'x': out, 'i': i + 1, 'k': state['k'] + 1}
        if self.order >= 2:
            new.update(x0_1=m0, lambda_1=lambda_s)
        if self.order == 3:
            new.update(x0_2=state['x0_1'], lambda_2=state['lambda_1'])
        return new


@dataclasses.dataclass(frozen=True)
class EDM(Sampler):
    """Karras et al. (2022, "EDM") Euler (order 1) and Heun (order 2) steps, Algorithm 2.

    In EDM's variables sigma_e = sigma / alpha = exp(-logsnr / 2) and x_e = x / alpha (the
    variance-exploding form of our variance-preserving x), with d = (x_e - x0) / sigma_e = eps:
        churn:  gamma = min(churn / n, sqrt(2) - 1) if churn_tmin <= sigma_e <= churn_tmax else 0,
                sigma_hat = (1 + gamma) sigma_e,
                x_hat = x_e + sqrt(sigma_hat^2 - sigma_e^2) churn_noise * noise
        Euler:  x_e' = x_hat + (sigma_t - sigma_hat) d(x_hat, sigma_hat)
        Heun:   x_e(t) = x_hat + (sigma_t - sigma_hat) (d(x_hat, sigma_hat) + d(x_e', sigma_t)) / 2,
    except that the last step (to sigma_t = 0) is Euler, as in Karras and diffusers; it is a
    `lax.cond`, so an n-step Heun run makes 2n - 1 denoiser evaluations. A step that starts
    above `heun_sigma_max` (sigma_hat,e > 80, EDM's sigma_max, Karras et al. Table 1) is
    Euler too: Heun's trapezoid averages d over [sigma_t, sigma_hat], and when the step spans
    a ratio r = sigma_hat / sigma_t of thousands (a uniform-time grid on the cosine schedule:
    22026 -> 6.3) the correction is about r / 2 times the change of the model's x0 over the
    step, which swamps the sample (1.5% whole-prompt accuracy on the demo); from that high a
    level the Euler (DDIM) step is already exact up to the model's x0, which is the data mean
    there. diffusers' HeunDiscreteScheduler has no such limit (`heun_sigma_max=inf`). Without churn, Euler
    is DDIM (eta = 0). The model is evaluated at the churned level sigma_hat (Karras,
    k-diffusion); diffusers' EulerDiscreteScheduler evaluates it before churning instead
    (its step takes a model output of x at sigma), and its Heun has no churn. Computed in x
    itself (x_e(t) = x0 + sigma_t d, times alpha_t) rather than x_e, which would lose float32
    precision at a sigma_e of e^10 (the cosine schedule's t = 1).
    """

    order: int = 1
    churn: float = 0.0
    churn_tmin: float = 0.0
    churn_tmax: float = float('inf')
    churn_noise: float = 1.0
    heun_sigma_max: float = 80.0
    num_steps: int = 0  # set by `for_steps`: gamma's n

    def __post_init__(self):
        if self.order not in (1, 2):
            raise ValueError(f'EDM sampler order ({self.order}) must be 1 (Euler) or 2 (Heun)')
        if not (math.isfinite(self.churn) and self.churn >= 0):
            raise ValueError(f'churn ({self.churn}) must be a finite number >= 0')
        if not self.heun_sigma_max > 0:
            raise ValueError(f'heun_sigma_max ({self.heun_sigma_max}) must be > 0 (inf: Heun '
                             'at every level, as diffusers)')

    def for_steps(self, num_steps: int) -> 'EDM':
        return dataclasses.replace(self, num_steps=num_steps)

    def step(self, state, denoise, s: Point, t: Point, noise):
        x = state['x']
        if self.churn > 0:
            if self.num_steps < 1:
                raise ValueError('EDM churn needs the step count: call for_steps(num_steps)')
            sigma_e = s.sigma / s.alpha
            on = (sigma_e >= self.churn_tmin) & (sigma_e <= self.churn_tmax)
            gamma = jnp.where(on, min(self.churn / self.num_steps, math.sqrt(2.0) - 1.0), 0.0)
            hat = schedules_lib.point_at_sigma_edm(sigma_e * (1.0 + gamma))
            added = jnp.sqrt(jnp.maximum((hat.sigma / hat.alpha) ** 2 - sigma_e**2, 0.0))
            x = jnp.where(gamma > 0, (hat.alpha / s.alpha) * x
                          + hat.alpha * added * self.churn_noise * noise, x)
            s = Point(*(jnp.where(gamma > 0, a, b) for a, b in zip(hat, s)))
        d = denoise(x, s)
        euler = t.alpha * d.x0 + t.sigma * d.eps  # alpha_t (x0 + sigma_t,e d)
        if self.order == 1:
            return {'x': euler}

        def heun(_):
            d2 = denoise(euler, t)
            # alpha_t (sigma_t,e - sigma_hat,e) (d2 - d) / 2 added to the Euler step
            return euler + 0.5 * (t.sigma - t.alpha * s.sigma / s.alpha) * (d2.eps - d.eps)

        second_order = (t.sigma > 0) & (s.sigma <= self.heun_sigma_max * s.alpha)
        return {'x': jax.lax.cond(second_order, heun, lambda _: euler, None)}


AnySampler = Union[DDPM, DDIM, DPMSolverPP, EDM]

_BY_NAME = {
    'ddpm': (DDPM, {}),
    'ddim': (DDIM, {}),
    'dpmpp_2m': (DPMSolverPP, dict(order=2)),
    'dpmpp_2m_sde': (DPMSolverPP, dict(order=2, sde=True)),
    'dpmpp_3m': (DPMSolverPP, dict(order=3)),
    'dpmpp_3m_sde': (DPMSolverPP, dict(order=3, sde=True)),
    'euler': (EDM, dict(order=1)),
    'heun': (EDM, dict(order=2)),
}


def get_sampler(name: str, **kwargs) -> AnySampler:
    """Builds a sampler step object by name.

    Args:
        name: 'ddpm' | 'ddim' | 'dpmpp_2m' | 'dpmpp_2m_sde' | 'dpmpp_3m' | 'dpmpp_3m_sde' |
            'euler' | 'heun'.
        **kwargs: fields of the sampler (DDIM: eta; DPMSolverPP: order, sde; EDM: churn,
            churn_tmin, churn_tmax, churn_noise, heun_sigma_max), over the name's defaults.

    Returns:
        A frozen, hashable sampler.
    """
    schedules_lib.check_choice('sampler', name, SAMPLER_NAMES)
    cls, defaults = _BY_NAME[name]
    return cls(**{**defaults, **kwargs})


def as_sampler(sampler) -> AnySampler:
    """A sampler object from a sampler or its name."""
    return get_sampler(sampler) if isinstance(sampler, str) else sampler
