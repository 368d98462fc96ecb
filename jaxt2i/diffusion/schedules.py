"""Noise schedules: continuous log-SNR schedules and discrete DDPM beta schedules.

Every schedule describes a variance-preserving process x_t = alpha(t) x_0 + sigma(t) eps with
alpha^2 + sigma^2 = 1, parameterised by logsnr(t) = log(alpha^2 / sigma^2), and shares one
interface:

    logsnr(t), alpha(t), sigma(t), point(t)   noise level at schedule time t
    model_t(t)                                the [B] float the denoiser is given
    sample_t(rng, shape)                      training times
    sampling_time(i, num_steps)               time of sampler step i (traced i), i < num_steps
    time_at_logsnr(logsnr)                    the inverse of logsnr(t) (clipped to the time range)
    logsnr_range()                            (logsnr at the noisiest time, logsnr at t = 0), floats

Schedule time t means, for continuous schedules, t in [0, 1] (0 = clean, 1 = pure noise); for
discrete schedules the integer diffusers timestep 0 .. N-1 as a float. Samplers walk
`sampling_time(0..num_steps-1)` and then jump to the clean point (alpha = 1, sigma = 0), like
diffusers with `set_alpha_to_one=True` / `final_sigmas_type="zero"`. Other step grids
(`GRID_SPACINGS`: Karras et al.'s rho = 7 sigma spacing, uniform log-SNR) are built by
`grid_point` from `logsnr_range()`, with `time_at_logsnr` giving the model's time input.

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
# Step grids of the samplers: the schedule's own `sampling_time`, Karras et al. (2022) rho = 7
# spacing of sigma_edm = sigma / alpha between the schedule's ends (diffusers'
# `use_karras_sigmas=True`), or uniform in log-SNR between them.
GRID_SPACINGS = ('default', 'karras', 'logsnr')
KARRAS_RHO = 7.0


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


def point_at_logsnr(logsnr) -> Point:
    """The variance-preserving noise level with log-SNR `logsnr`."""
    logsnr = jnp.asarray(logsnr, jnp.float32)
    return Point(jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr)), logsnr)


def point_at_sigma_edm(sigma_edm) -> Point:
    """The noise level of EDM's sigma = sigma / alpha = exp(-logsnr / 2) (Karras et al. 2022):
    alpha = 1 / sqrt(1 + sigma_edm^2), as diffusers' `_sigma_to_alpha_sigma_t`."""
    sigma_edm = jnp.asarray(sigma_edm, jnp.float32)
    alpha = jax.lax.rsqrt(1.0 + sigma_edm**2)
    return Point(alpha, sigma_edm * alpha, -2.0 * jnp.log(sigma_edm))


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

    def logsnr_range(self) -> tuple[float, float]:
        """(logsnr(1), logsnr(0)) as Python floats (float64 arithmetic, no tracing)."""
        return self._logsnr_np(1.0), self._logsnr_np(0.0)

    def time_at_logsnr(self, logsnr):
        """The time t in [0, 1] with logsnr(t) = logsnr (closed form; clipped to [0, 1], so a
        noise level beyond the schedule's ends maps to its end time)."""
        return jnp.clip(self._time_at_logsnr(jnp.asarray(logsnr, jnp.float32)), 0.0, 1.0)


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
        a, b = self._ab()
        return -2.0 * jnp.log(jnp.tan(a * jnp.asarray(t, jnp.float32) + b))

    def _ab(self):
        b = math.atan(math.exp(-0.5 * self.logsnr_max))
        return math.atan(math.exp(-0.5 * self.logsnr_min)) - b, b

    def _logsnr_np(self, t: float) -> float:
        a, b = self._ab()
        return -2.0 * math.log(math.tan(a * t + b))

    def _time_at_logsnr(self, logsnr):
        a, b = self._ab()  # tan(a t + b) = exp(-logsnr / 2)
        return (jnp.arctan(jnp.exp(-0.5 * logsnr)) - b) / a


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

    def _logsnr_np(self, t: float) -> float:
        integral = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t
        value = -math.log(math.expm1(integral)) if integral > 0 else math.inf
        return min(max(value, self.logsnr_min), self.logsnr_max)

    def _time_at_logsnr(self, logsnr):
        # integral(t) = log(1 + exp(-logsnr)); the root of beta_min t + d t^2 / 2 = integral,
        # written without cancellation (and valid for d = 0).
        integral = jnp.logaddexp(0.0, -logsnr)
        d = self.beta_max - self.beta_min
        return 2.0 * integral / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * d * integral))


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

    def _log_sigmas(self) -> np.ndarray:
        """[N] float64 log(sigma / alpha) = -logsnr / 2 of the integer timesteps (increasing)."""
        abar, one_minus = _discrete_tables(self.beta_schedule, self.beta_start, self.beta_end,
                                           self.num_train_timesteps)
        return 0.5 * (np.log(one_minus) - np.log(abar))

    def logsnr_range(self) -> tuple[float, float]:
        """(logsnr at timestep N - 1, logsnr at timestep 0) as Python floats."""
        log_sigmas = self._log_sigmas()
        return float(-2.0 * log_sigmas[-1]), float(-2.0 * log_sigmas[0])

    def time_at_logsnr(self, logsnr):
        """The fractional timestep of a noise level: log(sigma / alpha) interpolated linearly
        between the two nearest timesteps, clipped to [0, N - 1], as diffusers' `_sigma_to_t`
        (its karras grids' timesteps). `_lookup` interpolates alpha_bar instead, so
        point(time_at_logsnr(l)).logsnr is l only up to that difference between timesteps."""
        table = jnp.asarray(self._log_sigmas(), jnp.float32)  # [N]
        log_sigma = -0.5 * jnp.asarray(logsnr, jnp.float32)
        low = jnp.clip(jnp.searchsorted(table, log_sigma, side='right') - 1, 0,
                       self.num_train_timesteps - 2)
        lo, hi = table[low], table[low + 1]
        w = jnp.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
        return low.astype(jnp.float32) + w

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


def grid_point(schedule, spacing: str, i, num_steps: int):
    """(Point, schedule time) of sampler step i (traced int, i < num_steps) of a step grid.

    'default': `schedule.sampling_time(i, num_steps)` and its point. 'karras': Karras et al.
    (2022) eq. (5), sigma_i = (smax^(1/rho) + i / (n - 1) (smin^(1/rho) - smax^(1/rho)))^rho,
    rho = 7, with sigma = sigma_edm = exp(-logsnr / 2) and (smax, smin) the schedule's ends
    (`logsnr_range`), as diffusers' `use_karras_sigmas=True`. 'logsnr': logsnr_i = lmin + i /
    (n - 1) (lmax - lmin), uniform in log-SNR between the same ends (diffusers'
    `use_lu_lambdas=True`). Both include both ends (n = 1: the noisiest one only); the time of a
    karras / logsnr point is `schedule.time_at_logsnr` (fractional for discrete schedules).
    """
    check_choice('step spacing', spacing, GRID_SPACINGS)
    if spacing == 'default':
        t = schedule.sampling_time(i, num_steps)
        return schedule.point(t), t
    lo, hi = schedule.logsnr_range()
    frac = jnp.asarray(i, jnp.float32) / max(num_steps - 1, 1)
    if spacing == 'karras':
        inv = 1.0 / KARRAS_RHO
        top, bottom = math.exp(-0.5 * lo) ** inv, math.exp(-0.5 * hi) ** inv
        point = point_at_sigma_edm((top + frac * (bottom - top)) ** KARRAS_RHO)
    else:
        point = point_at_logsnr(lo + frac * (hi - lo))
    return point, schedule.time_at_logsnr(point.logsnr)
