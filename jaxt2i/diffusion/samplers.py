"""Sampler steps: DDPM ancestral, DDIM, DPM-Solver++(2M).

Every sampler is a frozen dataclass with one shared signature, run by `loop.sample`:

    state = sampler.initialize(x_T)                       # pytree with state['x']
    state = sampler.update(state, denoised, s, t, noise)  # one step from point s to point t
    x_0   = sampler.finalize(state)

`denoised` holds the (guided, thresholded) predictions x0 and eps at point s; `s` and `t` are
`schedules.Point`s (alpha, sigma, logsnr) with t less noisy than s (the last t is the clean
point alpha = 1, sigma = 0, logsnr = inf); `noise` is N(0, I) shaped like x, used only by
stochastic samplers (deterministic ones ignore it and XLA removes it).

All formulas are written for a general pair of noise levels (alpha, sigma), so they hold for
any step count on continuous and discrete schedules. With alpha_ts = alpha_s / alpha_t and
sigma2_ts = sigma_s^2 - alpha_ts^2 sigma_t^2 (Kingma et al. 2021, VDM, appendix A), the
posterior q(x_t | x_s, x_0) has
    mean = alpha_ts sigma_t^2 / sigma_s^2 x_s + alpha_t sigma2_ts / sigma_s^2 x_0
    var  = sigma2_ts sigma_t^2 / sigma_s^2,
which for adjacent DDPM timesteps is Ho et al. 2020 eqs. (6)-(7).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from jaxt2i.diffusion import schedules as schedules_lib
from jaxt2i.diffusion.schedules import Point

SAMPLER_NAMES = ('ddpm', 'ddim', 'dpmpp_2m')


class Denoised(NamedTuple):
    """The model's clean-sample and noise predictions at the current point, shaped like x."""
    x0: jax.Array
    eps: jax.Array


def _posterior(s: Point, t: Point):
    """Coefficients (c_x, c_x0, var) of q(x_t | x_s, x_0) = N(c_x x_s + c_x0 x_0, var)."""
    alpha_ts = s.alpha / t.alpha
    sigma2_ts = jnp.maximum(s.sigma**2 - alpha_ts**2 * t.sigma**2, 0.0)
    c_x = alpha_ts * t.sigma**2 / s.sigma**2
    c_x0 = t.alpha * sigma2_ts / s.sigma**2
    return c_x, c_x0, sigma2_ts * t.sigma**2 / s.sigma**2


@dataclasses.dataclass(frozen=True)
class DDPM:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2 and eqs. (6)-(7)).

    x_t ~ q(x_t | x_s, x_0 = x0_pred) with the 'fixed_small' (posterior) variance, matching
    diffusers' DDPMScheduler.
    """

    def initialize(self, x):
        return {'x': x}

    def mean_std(self, x, denoised: Denoised, s: Point, t: Point):
        """Mean and standard deviation of the step's Gaussian: x_t = mean + std * noise."""
        c_x, c_x0, var = _posterior(s, t)
        return c_x * x + c_x0 * denoised.x0, jnp.sqrt(var)

    def update(self, state, denoised: Denoised, s: Point, t: Point, noise):
        mean, std = self.mean_std(state['x'], denoised, s, t)
        return {'x': mean + std * noise}

    def finalize(self, state):
        return state['x']


@dataclasses.dataclass(frozen=True)
class DDIM:
    """DDIM (Song et al. 2021, eq. (12), with sigma_eta of eq. (16)).

    x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps + c noise, c^2 = eta^2 * (posterior variance).
    eta = 0 is deterministic; eta = 1 has DDPM's step variance. When thresholding changed x0,
    eps is re-derived from the thresholded x0 (diffusers' `use_clipped_model_output=True`).
    """

    eta: float = 0.0

    def initialize(self, x):
        return {'x': x}

    def update(self, state, denoised: Denoised, s: Point, t: Point, noise):
        c2 = self.eta**2 * _posterior(s, t)[2]
        direction = jnp.sqrt(jnp.maximum(t.sigma**2 - c2, 0.0))
        x = t.alpha * denoised.x0 + direction * denoised.eps
        if self.eta:
            x = x + jnp.sqrt(c2) * noise
        return {'x': x}

    def finalize(self, state):
        return state['x']


@dataclasses.dataclass(frozen=True)
class DPMSolverPP:
    """Multistep DPM-Solver++ in data (x0) prediction (Lu et al. 2022, arXiv:2211.01095).

    With lambda = logsnr / 2 and h = lambda_t - lambda_s, the first-order step is
        x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) x0_s          (= DDIM, eta = 0)
    and the second-order multistep update (Algorithm 2, DPM-Solver++(2M)) replaces x0_s by
        D = x0_s + (h / (2 h_prev)) (x0_s - x0_prev),  h_prev = lambda_s - lambda_prev.
    The first step (no history) and the last step (to the clean point) are first order, as in
    diffusers with `final_sigmas_type="zero"`.
    """

    order: int = 2

    def __post_init__(self):
        if self.order not in (1, 2):
            raise ValueError(f'DPM-Solver++ order ({self.order}) must be 1 or 2')

    def initialize(self, x):
        return {'x': x, 'x0_prev': jnp.zeros_like(x), 'lambda_prev': jnp.float32(0.0),
                'has_prev': jnp.array(False)}

    def update(self, state, denoised: Denoised, s: Point, t: Point, noise):
        del noise
        x0 = denoised.x0
        lambda_s, lambda_t = 0.5 * s.logsnr, 0.5 * t.logsnr
        h = lambda_t - lambda_s
        if self.order == 2:
            ratio = h / (lambda_s - state['lambda_prev'])  # h / h_prev
            second = state['has_prev'] & (t.sigma > 0)
            x0 = jnp.where(second, x0 + 0.5 * ratio * (x0 - state['x0_prev']), x0)
        x = (t.sigma / s.sigma) * state['x'] - t.alpha * jnp.expm1(-h) * x0
        return {'x': x, 'x0_prev': denoised.x0, 'lambda_prev': lambda_s,
                'has_prev': jnp.array(True)}

    def finalize(self, state):
        return state['x']


Sampler = Union[DDPM, DDIM, DPMSolverPP]


def get_sampler(name: str, **kwargs) -> Sampler:
    """Builds a sampler step object by name.

    Args:
        name: 'ddpm' | 'ddim' | 'dpmpp_2m'.
        **kwargs: fields of the sampler (DDIM: eta; DPMSolverPP: order).

    Returns:
        A frozen, hashable sampler.
    """
    schedules_lib.check_choice('sampler', name, SAMPLER_NAMES)
    return {'ddpm': DDPM, 'ddim': DDIM, 'dpmpp_2m': DPMSolverPP}[name](**kwargs)


def as_sampler(sampler) -> Sampler:
    """A sampler object from a sampler or its name."""
    return get_sampler(sampler) if isinstance(sampler, str) else sampler
