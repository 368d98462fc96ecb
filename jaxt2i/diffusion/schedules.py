"""Noise schedules: continuous log-SNR schedules and discrete DDPM beta schedules.

Every schedule describes a variance-preserving process x_t = alpha(t) x_0 + sigma(t) eps with
alpha^2 + sigma^2 = 1, parameterised by logsnr(t) = log(alpha^2 / sigma^2), and shares one
interface:

    logsnr(t), alpha(t), sigma(t), point(t)   noise level at schedule time t
    model_t(t)                                the [B] float the denoiser is given
    sample_t(rng, shape)                      training times
    sampling_time(i, num_steps)               time of sampler step i (traced i), i < num_steps

Schedule time t means, for continuous schedules, t in [0, 1] (0 = clean, 1 = pure noise); for
discrete schedules the integer diffusers timestep 0 .. N-1 as a float. Samplers walk
`sampling_time(0..num_steps-1)` and then jump to the clean point (alpha = 1, sigma = 0), like
diffusers with `set_alpha_to_one=True` / `final_sigmas_type="zero"`.

Schedules are frozen, hashable dataclasses, so they can be static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

CONTINUOUS_NAMES = ('cosine', 'cosine_offset', 'linear')
# Nichol & Dhariwal's offset s: alpha^2(t) = cos^2((t + s) / (1 + s) * pi / 2) / (its t=0 value).
COSINE_OFFSET = 0.008
BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
SCHEDULE_NAMES = CONTINUOUS_NAMES + tuple(f'discrete_{b}' for b in BETA_SCHEDULES)
SPACINGS = ('trailing', 'leading', 'linspace', 'linspace_exclusive')
MODEL_INPUTS = ('t', 'logsnr')


def check_choice(kind: str, value, allowed) -> None:
    """Raises a one-line ValueError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f'unknown {kind} {value!r}; allowed: {", ".join(map(repr, allowed))}')


class Point(NamedTuple):
    """Noise level of one point of a sampling grid (scalars, or [B] in training)."""
    alpha: jax.Array
    sigma: jax.Array
    logsnr: jax.Array


def clean_point() -> Point:
    """The noise-free end point of every sampling grid."""
    return Point(jnp.float32(1.0), jnp.float32(0.0), jnp.float32(jnp.inf))


class _ContinuousBase:
    """Shared methods of the continuous schedules (subclasses define `logsnr`)."""

    is_discrete: ClassVar[bool] = False

    def _check(self) -> None:
        check_choice('model_input', self.model_input, MODEL_INPUTS)
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f'logsnr_min ({self.logsnr_min}) must be below '
                             f'logsnr_max ({self.logsnr_max})')

    def alpha(self, t):
        return jnp.sqrt(jax.nn.sigmoid(self.logsnr(t)))

    def sigma(self, t):
        return jnp.sqrt(jax.nn.sigmoid(-self.logsnr(t)))

    def point(self, t) -> Point:
        return Point(self.alpha(t), self.sigma(t), self.logsnr(t))

    def model_t(self, t):
        """t itself (model_input='t') or logsnr(t) (model_input='logsnr')."""
        t = jnp.asarray(t, jnp.float32)
        return self.logsnr(t) if self.model_input == 'logsnr' else t

    def sample_t(self, rng, shape):
        """Training times, uniform in [0, 1)."""
        return jax.random.uniform(rng, shape, jnp.float32)

    def sampling_time(self, i, num_steps: int):
        """Time of step i of a uniform grid 1, 1 - 1/n, ..., 1/n (then the clean point)."""
        return 1.0 - jnp.asarray(i, jnp.float32) / num_steps


@dataclasses.dataclass(frozen=True)
class CosineSchedule(_ContinuousBase):
    """Cosine schedule (Nichol & Dhariwal 2021) in continuous time, as a log-SNR range.

    logsnr(t) = -2 log tan(a t + b), with a, b chosen so logsnr(0) = logsnr_max and
    logsnr(1) = logsnr_min: alpha^2 = cos^2 of an angle linear in t. With the defaults (+-20,
    the continuous-time form of Kingma et al.'s VDM and Hoogeboom et al.'s simple diffusion),
    t = 0 is nearly noise-free. Nichol & Dhariwal's schedule, which Imagen cites, has an
    offset s = 0.008 that starts it at logsnr_max = -2 log tan(s / (1 + s) pi / 2) = 8.77:
    `get_schedule('cosine_offset')` (the `paper` config variants use it); 'cosine' (+-20) is
    kept for the demo and existing runs.
    """

    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    model_input: str = 't'

    def __post_init__(self):
        self._check()

    def logsnr(self, t):
        b = math.atan(math.exp(-0.5 * self.logsnr_max))
        a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
        return -2.0 * jnp.log(jnp.tan(a * jnp.asarray(t, jnp.float32) + b))


@dataclasses.dataclass(frozen=True)
class LinearSchedule(_ContinuousBase):
    """Continuous-time linear-beta (VP-SDE) schedule (Song et al. 2021, Ho et al. 2020).

    beta(t) = beta_min + (beta_max - beta_min) t, alpha^2 = exp(-int_0^t beta), so
    logsnr(t) = -log(expm1(beta_min t + (beta_max - beta_min) t^2 / 2)), clipped. The defaults
    equal DDPM's 1e-4 .. 0.02 betas over 1000 steps.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    model_input: str = 't'

    def __post_init__(self):
        self._check()

    def logsnr(self, t):
        t = jnp.asarray(t, jnp.float32)
        integral = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t
        return jnp.clip(-jnp.log(jnp.expm1(integral)), self.logsnr_min, self.logsnr_max)


@functools.lru_cache(maxsize=32)
def _discrete_tables(beta_schedule: str, beta_start: float, beta_end: float, n: int):
    """[2, n] float64 numpy array: rows alpha_bar and 1 - alpha_bar, computed in float64."""
    if beta_schedule == 'linear':
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == 'scaled_linear':
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    else:  # squaredcos_cap_v2: GLIDE cosine, beta_i = 1 - abar((i+1)/n) / abar(i/n), capped.
        f = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
        grid = np.arange(n + 1, dtype=np.float64) / n
        betas = np.minimum(1.0 - f(grid[1:]) / f(grid[:-1]), 0.999)
    # 1 - alpha_bar directly as -expm1(sum log(1 - beta)): no cancellation near t = 0.
    log_abar = np.cumsum(np.log1p(-betas))
    return np.stack([np.exp(log_abar), -np.expm1(log_abar)])


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
    """Discrete DDPM schedule over `num_train_timesteps` integer timesteps (diffusers-compatible).

    Schedule time is the integer timestep as a float; non-integer times interpolate alpha_bar.
    `spacing` picks the sampling timesteps (n = num_steps, N = num_train_timesteps):
        'trailing'            round(N - i N / n) - 1       (diffusers 'trailing'; starts at N-1)
        'leading'             (n - 1 - i) (N // n) + offset (diffusers DDPM/DDIM 'leading')
        'linspace'            round((n - 1 - i)(N - 1) / (n - 1))  (diffusers DDPM/DDIM 'linspace')
        'linspace_exclusive'  round((n - i)(N - 1) / n)    (diffusers DPMSolverMultistep 'linspace')
    Exact halves round to even, as numpy does.
    """

    beta_schedule: str = 'linear'
    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_train_timesteps: int = 1000
    spacing: str = 'trailing'
    steps_offset: int = 0
    model_input: str = 't'
    is_discrete: ClassVar[bool] = True

    def __post_init__(self):
        check_choice('beta_schedule', self.beta_schedule, BETA_SCHEDULES)
        check_choice('spacing', self.spacing, SPACINGS)
        check_choice('model_input for a discrete schedule', self.model_input, ('t',))
        if self.num_train_timesteps < 2:
            raise ValueError(f'num_train_timesteps ({self.num_train_timesteps}) must be at least 2')

    def _lookup(self, t):
        """(alpha_bar, 1 - alpha_bar) at timestep t, linear between integer timesteps."""
        tables = jnp.asarray(_discrete_tables(  # [2, N]
            self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps),
            jnp.float32)
        t = jnp.clip(jnp.asarray(t, jnp.float32), 0, self.num_train_timesteps - 1)
        lo = jnp.floor(t).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, self.num_train_timesteps - 1)
        frac = t - lo
        both = tables[:, lo] * (1 - frac) + tables[:, hi] * frac  # [2, *t.shape]
        return both[0], both[1]

    def logsnr(self, t):
        abar, one_minus = self._lookup(t)
        return jnp.log(abar) - jnp.log(one_minus)

    def alpha(self, t):
        return jnp.sqrt(self._lookup(t)[0])

    def sigma(self, t):
        return jnp.sqrt(self._lookup(t)[1])

    def point(self, t) -> Point:
        abar, one_minus = self._lookup(t)
        return Point(jnp.sqrt(abar), jnp.sqrt(one_minus), jnp.log(abar) - jnp.log(one_minus))

    def model_t(self, t):
        """The diffusers timestep as float."""
        return jnp.asarray(t, jnp.float32)

    def sample_t(self, rng, shape):
        """Training timesteps, uniform integers in [0, N), as float."""
        return jax.random.randint(rng, shape, 0, self.num_train_timesteps).astype(jnp.float32)

    def sampling_time(self, i, num_steps: int):
        """Timestep of sampler step i (traced int) for `num_steps` steps, as float."""
        n, big_n = num_steps, self.num_train_timesteps
        i = jnp.asarray(i, jnp.int32)
        if self.spacing == 'leading':
            return ((n - 1 - i) * (big_n // n) + self.steps_offset).astype(jnp.float32)
        if self.spacing == 'trailing':
            num, den = big_n * (n - i), n
            offset = -1
        elif self.spacing == 'linspace':
            num, den = (big_n - 1) * (n - 1 - i), max(n - 1, 1)
            offset = 0
        else:
            num, den = (big_n - 1) * (n - i), n
            offset = 0
        # Integer round-half-to-even of num / den, exact for any size.
        q, r = num // den, num % den
        up = (2 * r > den) | ((2 * r == den) & (q % 2 == 1))
        return (q + up.astype(jnp.int32) + offset).astype(jnp.float32)


Schedule = Union[CosineSchedule, LinearSchedule, DiscreteSchedule]


def get_schedule(name: str, **kwargs) -> Schedule:
    """Builds a schedule by name.

    Args:
        name: 'cosine' | 'cosine_offset' (Nichol & Dhariwal's s = 0.008) | 'linear'
            (continuous log-SNR) or 'discrete_linear' |
            'discrete_scaled_linear' | 'discrete_squaredcos_cap_v2' (DDPM betas).
        **kwargs: fields of the schedule dataclass (e.g. logsnr_min, spacing, model_input).

    Returns:
        A frozen, hashable schedule.
    """
    check_choice('schedule', name, SCHEDULE_NAMES)
    if name == 'cosine':
        return CosineSchedule(**kwargs)
    if name == 'cosine_offset':
        s = COSINE_OFFSET
        kwargs.setdefault('logsnr_max', -2.0 * math.log(math.tan(s / (1 + s) * math.pi / 2)))
        return CosineSchedule(**kwargs)
    if name == 'linear':
        return LinearSchedule(**kwargs)
    return DiscreteSchedule(beta_schedule=name[len('discrete_'):], **kwargs)


def as_schedule(schedule) -> Schedule:
    """A schedule object from a schedule or its name."""
    return get_schedule(schedule) if isinstance(schedule, str) else schedule
