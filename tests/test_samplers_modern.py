"""The modern samplers (EDM Euler / Heun with churn, DPM-Solver++ 2M SDE / 3M / 3M SDE) and the
step grids ('karras', 'logsnr'): diffusers trajectories driven by the same analytic denoiser,
Gaussian recovery, denoiser calls per step, and the settings through `Stage.sample`.

Diffusers' Euler / Heun schedulers work in EDM's variables x_e = x / alpha, sigma_e = sigma /
alpha; their model input `scale_model_input(x_e)` is our variance-preserving x, and their
trajectories are compared after x_e -> x_e / sqrt(1 + sigma_e^2). DPMSolverMultistep works in
x itself. Stochastic steps get the loop's own noise (fold_in(split(key)[1], i)): as
`variance_noise` (DPM-Solver SDE) or through a patched `randn_tensor` (Euler churn).
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i import diffusion
from jaxt2i.diffusion import schedules

diffusers = pytest.importorskip('diffusers')
torch = pytest.importorskip('torch')
torch.set_num_threads(1)

SHAPE = (2, 3, 4, 4)
PHASE = np.arange(3.0).reshape(1, 3, 1, 1)
X_T = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
KEY = 3
TOL = 1e-5
MU, S = 0.5, 0.6  # Gaussian data N(MU, S^2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_model(a, b):
    """eps prediction of the VP x at (fractional) timestep t, in float64 numpy."""
    return lambda x, t: a * x + b * np.sin(t / 300.0 + PHASE)


def _jax_model(a, b):
    return lambda x, t, cond: a * x + b * jnp.sin(t[:, None, None, None] / 300.0 + PHASE)


def _noises(num_steps, shape=SHAPE):
    """The per-step noise `diffusion.sample(rng=key(KEY))` draws."""
    step_rng = jax.random.split(jax.random.key(KEY))[1]
    return [np.asarray(jax.random.normal(jax.random.fold_in(step_rng, i), shape, jnp.float32))
            for i in range(num_steps)]


def _ours(model, schedule, sampler, num_steps, **kwargs):
    fn = jax.jit(lambda: diffusion.sample(model, SHAPE, jax.random.key(KEY), schedule=schedule,
                                          sampler=sampler, num_steps=num_steps, x_init=X_T,
                                          return_trajectory=True, **kwargs))
    x, traj = fn()
    np.testing.assert_array_equal(x, traj[-1])
    return np.asarray(traj, np.float64)


def _assert_close(ours, ref, tol=TOL):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    for i, (a, b) in enumerate(zip(ours, ref)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f'step {i}')
    return float(np.abs(ours - ref).max())


def _float64(sched):
    """The scheduler's alphas_cumprod in float64 (its float32 1 - alpha_bar(0) cancels)."""
    sched.alphas_cumprod = torch.cumprod(1 - sched.betas.double(), 0)
    return sched


def _log_sigmas(sched):
    abar = sched.alphas_cumprod.numpy()
    return np.log(((1 - abar) / abar) ** 0.5)


def _vp(x_e, sigma_e):
    return x_e / math.sqrt(float(sigma_e) ** 2 + 1.0)


# ------------------------------------------------------------------------------- EDM Euler

def _euler_reference(sched, num_steps, model, *, churn=0.0, tmin=0.0, tmax=float('inf'),
                     monkeypatch=None):
    """diffusers' EulerDiscreteScheduler, with the model evaluated at the churned point
    (Karras et al. Algorithm 2) and the loop's noise as its randn."""
    from diffusers.schedulers import scheduling_euler_discrete

    sched.set_timesteps(num_steps)
    sched.is_scale_input_called = True  # the model input is computed here (x_hat / alpha_hat)
    sigmas = sched.sigmas.double().numpy()
    log_sigmas = _log_sigmas(sched)
    noises = _noises(num_steps)
    current = {}
    monkeypatch.setattr(scheduling_euler_discrete, 'randn_tensor',
                        lambda shape, **kw: torch.from_numpy(current['noise']).to(kw['dtype']))
    x = torch.from_numpy(X_T.astype(np.float64) * math.sqrt(sigmas[0] ** 2 + 1))
    out = []
    for k, t in enumerate(sched.timesteps):
        sigma = sigmas[k]
        gamma = min(churn / (len(sigmas) - 1), 2**0.5 - 1) if tmin <= sigma <= tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        current['noise'] = noises[k].astype(np.float64)
        x_hat = x.numpy() + current['noise'] * math.sqrt(sigma_hat**2 - sigma**2)
        t_hat = float(t) if gamma == 0 else float(sched._sigma_to_t(np.array(sigma_hat),
                                                                    log_sigmas))
        eps = model(_vp(x_hat, sigma_hat), t_hat)
        x = sched.step(torch.from_numpy(eps), t, x, s_churn=churn, s_tmin=tmin,
                       s_tmax=tmax).prev_sample.double()
        out.append(_vp(x.numpy(), sigmas[k + 1]))
    return np.stack(out)


@pytest.mark.parametrize('num_steps,spacing,churn', [
    (10, 'trailing', 0.0), (1, 'trailing', 0.0), (12, 'leading', 0.0),
    (10, 'trailing', 4.0), (25, 'leading', 30.0)])
def test_euler_matches_diffusers(num_steps, spacing, churn, monkeypatch):
    tmin, tmax = (0.3, 20.0) if churn else (0.0, float('inf'))  # churn on only in the middle
    ref = _euler_reference(diffusers.EulerDiscreteScheduler(timestep_spacing=spacing),
                           num_steps, _np_model(0.9, 0.3), churn=churn, tmin=tmin, tmax=tmax,
                           monkeypatch=monkeypatch)
    sched = diffusion.get_schedule('discrete_linear', spacing=spacing)
    sampler = diffusion.get_sampler('euler', churn_tmin=tmin, churn_tmax=tmax)
    ours = _ours(_jax_model(0.9, 0.3), sched, sampler, num_steps, churn=churn)
    _assert_close(ours, ref)
    if churn:  # the churn is really on for some steps and changes the result
        plain = _ours(_jax_model(0.9, 0.3), sched, 'euler', num_steps)
        assert np.abs(plain[-1] - ours[-1]).max() > 1e-2


def test_euler_without_churn_is_ddim():
    sched = diffusion.get_schedule('cosine')
    model = _jax_model(0.8, 0.4)
    np.testing.assert_allclose(_ours(model, sched, 'euler', 12), _ours(model, sched, 'ddim', 12),
                               rtol=1e-5, atol=1e-5)


def test_euler_karras_matches_diffusers(monkeypatch):
    ref = _euler_reference(diffusers.EulerDiscreteScheduler(use_karras_sigmas=True), 15,
                           _np_model(0.9, 0.3), monkeypatch=monkeypatch)
    ours = _ours(_jax_model(0.9, 0.3), diffusion.get_schedule('discrete_linear'), 'euler', 15,
                 spacing='karras')
    _assert_close(ours, ref)


# -------------------------------------------------------------------------------- EDM Heun

def _heun_reference(sched, num_steps, model):
    """diffusers' HeunDiscreteScheduler: x after each whole step (2 calls, 1 for the last)."""
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(X_T.astype(np.float64) * math.sqrt(float(sched.sigmas[0]) ** 2 + 1))
    out = []
    calls = len(sched.timesteps)
    for k, t in enumerate(sched.timesteps):
        eps = model(sched.scale_model_input(x, t).numpy(), float(t))
        x = sched.step(torch.from_numpy(eps), t, x).prev_sample.double()
        if sched.state_in_first_order or k == calls - 1:  # a whole step is done
            sigma_next = float(sched.sigmas[sched.step_index]) if k < calls - 1 else 0.0
            out.append(_vp(x.numpy(), sigma_next))
    assert calls == 2 * num_steps - 1
    return np.stack(out)


@pytest.mark.parametrize('num_steps,spacing,grid', [
    (10, 'trailing', 'default'), (1, 'trailing', 'default'), (2, 'leading', 'default'),
    (12, 'linspace', 'karras')])
def test_heun_matches_diffusers(num_steps, spacing, grid):
    kw = dict(use_karras_sigmas=True) if grid == 'karras' else {}
    ref = _heun_reference(diffusers.HeunDiscreteScheduler(  # its betas default to SD's
        timestep_spacing=spacing, beta_start=1e-4, beta_end=0.02, **kw), num_steps,
        _np_model(0.9, 0.3))
    sched = diffusion.get_schedule('discrete_linear',
                                   spacing='trailing' if spacing == 'linspace' else spacing)
    heun = diffusion.get_sampler('heun', heun_sigma_max=float('inf'))  # diffusers' has no limit
    ours = _ours(_jax_model(0.9, 0.3), sched, heun, num_steps, spacing=grid)
    _assert_close(ours, ref)
    if num_steps == 10:  # the default's first step (from sigma_e 157 > 80) is Euler: it differs
        default = _ours(_jax_model(0.9, 0.3), sched, 'heun', num_steps, spacing=grid)
        assert np.abs(default[0] - ours[0]).max() > 1e-3
        euler = _ours(_jax_model(0.9, 0.3), sched, 'euler', num_steps, spacing=grid)
        np.testing.assert_allclose(default[0], euler[0], rtol=1e-6, atol=1e-6)


def _gauss_eps(a, s, t):
    """The eps prediction of an x0 prediction for data N(MU, S^2) (its posterior mean) plus a
    time-dependent term, at alpha a, sigma s, time t: bounded, unlike a fixed map of x."""
    return lambda x: (x - a * (MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)
                               + 0.1 * np.sin(2.0 * t + PHASE))) / s


def _karras_reference(schedule, num_steps, *, heun, churn, tmin=0.0, tmax=float('inf')):
    """Karras et al. Algorithm 2 (k-diffusion's sample_euler / sample_heun) in float64 numpy
    on the continuous grid t = 1, 1 - 1/n, ..., 1/n of `schedule`, in EDM variables."""
    times = 1.0 - np.arange(num_steps) / num_steps
    sig = lambda t: float(np.exp(-0.5 * schedule._logsnr_np(float(t))))  # sigma_e
    sigmas = [sig(t) for t in times] + [0.0]
    a, b = schedule._ab()
    time_of = lambda s: min(max((math.atan(s) - b) / a, 0.0), 1.0)

    def denoise(xe, s):  # x0 from the eps of the model, which sees the clipped time
        t = time_of(s)
        st = math.exp(-0.5 * schedule._logsnr_np(t))
        eps = _gauss_eps(1 / math.sqrt(1 + st**2), st / math.sqrt(1 + st**2), t)(_vp(xe, s))
        return xe - s * eps

    noises = _noises(num_steps)
    x = X_T.astype(np.float64) * math.sqrt(sigmas[0] ** 2 + 1)
    out = []
    for i in range(num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn / num_steps, 2**0.5 - 1) if tmin <= s <= tmax else 0.0
        s_hat = s * (1 + gamma)
        x = x + noises[i] * math.sqrt(s_hat**2 - s**2)
        d = (x - denoise(x, s_hat)) / s_hat
        x_2 = x + d * (s_next - s_hat)
        if heun and s_next > 0:
            d_2 = (x_2 - denoise(x_2, s_next)) / s_next
            x_2 = x + 0.5 * (d + d_2) * (s_next - s_hat)
        x = x_2
        out.append(_vp(x, s_next))
    return np.stack(out)


@pytest.mark.parametrize('sampler,churn', [('heun', 0.0), ('heun', 5.0), ('euler', 5.0)])
def test_edm_churn_matches_karras_algorithm_2(sampler, churn):
    """Heun's churn has no diffusers counterpart (its HeunDiscreteScheduler has gamma = 0):
    k-diffusion's algorithm in float64, on the cosine_offset schedule's time grid (from
    sigma_e = e^3: float32's eps -> x0 loses 1 / alpha = 20 times its precision there); churn
    on where 0.05 <= sigma_e <= 10."""
    sched = diffusion.get_schedule('cosine_offset', logsnr_min=-6.0)

    def model(x, t, cond):
        a, s = sched.alpha(t)[:, None, None, None], sched.sigma(t)[:, None, None, None]
        x0 = MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)
        return (x - a * (x0 + 0.1 * jnp.sin(2.0 * t[:, None, None, None] + PHASE))) / s

    ref = _karras_reference(sched, 8, heun=sampler == 'heun', churn=churn, tmin=0.05,
                            tmax=10.0)
    ours = _ours(model, sched, diffusion.get_sampler(sampler, churn_tmin=0.05, churn_tmax=10.0),
                 8, churn=churn)
    _assert_close(ours, ref)


# --------------------------------------------------------------------------- DPM-Solver++

DPM_CASES = {  # our name: (diffusers algorithm_type, solver_order)
    'dpmpp_2m_sde': ('sde-dpmsolver++', 2),
    'dpmpp_3m': ('dpmsolver++', 3),
    'dpmpp_3m_sde': ('sde-dpmsolver++', 3),
}


def _sde3_d2_fix(sched):
    """alpha_t D2 of diffusers' current third-order sde-dpmsolver++ step: the amount by which
    its D2 coefficient alpha_t ((1 - e^-2h - 2h) / (2h)^2 - 1/2) misses the integral's
    alpha_t ((1 - e^-2h - 2h) / (2h)^2 + 1/2) (k-diffusion's -phi_3 of sample_dpmpp_3m_sde;
    the -1/2 makes D2's coefficient O(1) rather than O(h))."""
    sigmas = [sched.sigmas[sched.step_index + k] for k in (1, 0, -1, -2)]
    alpha_t = sched._sigma_to_alpha_sigma_t(sigmas[0])[0]
    lam = [torch.log(a) - torch.log(s) for a, s in map(sched._sigma_to_alpha_sigma_t, sigmas)]
    h, h_0, h_1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
    m0, m1, m2 = sched.model_outputs[-1], sched.model_outputs[-2], sched.model_outputs[-3]
    r0, r1 = h_0 / h, h_1 / h
    d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
    return alpha_t * d2


class _FixedDPMSolver(diffusers.DPMSolverMultistepScheduler):
    """diffusers' scheduler with the third-order SDE step's D2 coefficient corrected."""

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None,
                                                 noise=None, **kwargs):
        x_t = super().multistep_dpm_solver_third_order_update(
            model_output_list, *args, sample=sample, noise=noise, **kwargs)
        if self.config.algorithm_type == 'sde-dpmsolver++':
            x_t = x_t + _sde3_d2_fix(self)
        return x_t


def _dpm_reference(sched, num_steps, model, noise, fractional=False):
    """diffusers' DPMSolverMultistepScheduler; `fractional`: the model gets the unrounded
    timestep of each sigma (diffusers' `timesteps` of karras / lu grids are int64)."""
    sched.set_timesteps(num_steps)
    sched.set_begin_index(0)  # rounded timesteps may repeat
    noises = _noises(num_steps)
    x, out = torch.from_numpy(X_T), []
    for k, t in enumerate(sched.timesteps):
        if fractional:
            t = sched._sigma_to_t(sched.sigmas[k].double().numpy(), _log_sigmas(sched))
        eps = torch.from_numpy(model(x.double().numpy(), float(t)).astype(np.float32))
        kw = dict(variance_noise=torch.from_numpy(noises[k].copy())) if noise else {}
        x = sched.step(eps, t, x, **kw).prev_sample
        out.append(x.double().numpy())
    return np.stack(out)


@pytest.mark.parametrize('name', sorted(DPM_CASES))
@pytest.mark.parametrize('num_steps', [1, 2, 3, 4, 10, 20])
def test_dpmsolver_pp_matches_diffusers(name, num_steps):
    """10 steps: third order from step 2 on but second order at step n - 2 (diffusers'
    lower_order_final below 15 steps); 20 steps: third order up to the (first order) last.
    3M SDE: against diffusers with its D2 coefficient corrected (`_FixedDPMSolver`)."""
    algorithm, order = DPM_CASES[name]
    ref_sched = _FixedDPMSolver(algorithm_type=algorithm, solver_order=order)
    ref = _dpm_reference(ref_sched, num_steps, _np_model(0.9, 0.3), 'sde' in name)
    sched = diffusion.get_schedule('discrete_linear', spacing='linspace_exclusive')
    ours = _ours(_jax_model(0.9, 0.3), sched, name, num_steps)
    _assert_close(ours, ref)


@pytest.mark.parametrize('name,spacing,diffusers_kw', [
    ('dpmpp_3m', 'karras', dict(use_karras_sigmas=True)),
    ('dpmpp_2m', 'logsnr', dict(use_lu_lambdas=True)),
    ('dpmpp_3m_sde', 'karras', dict(use_karras_sigmas=True))])
def test_dpmsolver_pp_grids_match_diffusers(name, spacing, diffusers_kw):
    """On karras / lu grids diffusers hands the model integer timesteps (rounded, or
    truncated for squaredcos_cap_v2) of the exact sigmas; ours are the fractional ones of
    `_sigma_to_t`, which the reference model gets here too."""
    algorithm, order = DPM_CASES.get(name, ('dpmsolver++', 2))
    ref_sched = _float64(_FixedDPMSolver(algorithm_type=algorithm, solver_order=order,
                                         **diffusers_kw))
    ref = _dpm_reference(ref_sched, 16, _np_model(0.9, 0.3), 'sde' in name, fractional=True)
    ours = _ours(_jax_model(0.9, 0.3), diffusion.get_schedule('discrete_linear'), name, 16,
                 spacing=spacing)
    _assert_close(ours, ref)


def test_3m_sde_differs_from_diffusers_only_by_its_d2_coefficient():
    """Documents the deviation: plain diffusers agrees up to the first third-order step (2)
    and then differs; `_FixedDPMSolver` agrees throughout (test above)."""
    plain = _dpm_reference(diffusers.DPMSolverMultistepScheduler(
        algorithm_type='sde-dpmsolver++', solver_order=3), 20, _np_model(0.9, 0.3), True)
    sched = diffusion.get_schedule('discrete_linear', spacing='linspace_exclusive')
    ours = _ours(_jax_model(0.9, 0.3), sched, 'dpmpp_3m_sde', 20)
    _assert_close(ours[:2], plain[:2])
    assert np.abs(ours[2] - plain[2]).max() > 1e-4


def test_third_order_and_sde_change_the_result():
    sched = diffusion.get_schedule('discrete_linear', spacing='linspace_exclusive')
    model = _jax_model(0.9, 0.3)
    two, three = _ours(model, sched, 'dpmpp_2m', 10), _ours(model, sched, 'dpmpp_3m', 10)
    sde = _ours(model, sched, 'dpmpp_2m_sde', 10)
    np.testing.assert_allclose(two[:2], three[:2], rtol=1e-6, atol=1e-6)  # first two steps
    assert np.abs(two[2] - three[2]).max() > 1e-4 and np.abs(two - sde).max() > 1e-2


# ------------------------------------------------------------------------------ the grids

@pytest.mark.parametrize('name', ['cosine', 'cosine_offset', 'linear', 'discrete_linear',
                                  'discrete_squaredcos_cap_v2'])
def test_time_at_logsnr_inverts_logsnr(name):
    sched = diffusion.get_schedule(name)
    lo, hi = sched.logsnr_range()
    if sched.is_discrete:
        t = np.arange(0, sched.num_train_timesteps, 7, dtype=np.float32)
        np.testing.assert_allclose(sched.time_at_logsnr(sched.logsnr(t)), t, atol=2e-3)
        assert lo == pytest.approx(float(sched.logsnr(sched.num_train_timesteps - 1)), abs=1e-4)
    else:
        t = np.linspace(0.0, 1.0, 101, dtype=np.float32)[1:]
        back = sched.time_at_logsnr(sched.logsnr(t))
        np.testing.assert_allclose(back, t, atol=2e-5 if name != 'linear' else 1e-4)
        assert lo == pytest.approx(float(sched.logsnr(1.0)), abs=5e-3)  # float32 tan near pi/2
        assert hi == pytest.approx(float(sched.logsnr(0.0)), abs=5e-3)
    # clipped to the time range beyond the schedule's ends
    top = sched.num_train_timesteps - 1 if sched.is_discrete else 1.0
    assert float(sched.time_at_logsnr(lo - 5.0)) == pytest.approx(top)
    assert float(sched.time_at_logsnr(jnp.inf)) == 0.0


def test_discrete_time_at_logsnr_is_diffusers_sigma_to_t():
    ref = diffusers.EulerDiscreteScheduler()
    sched = diffusion.get_schedule('discrete_linear')
    sigmas = np.exp(np.random.default_rng(0).uniform(-5.0, 5.5, 200))  # beyond both ends too
    want = np.array([ref._sigma_to_t(np.array(s), _log_sigmas(ref)) for s in sigmas])
    np.testing.assert_allclose(sched.time_at_logsnr(-2.0 * np.log(sigmas)), want, atol=2e-3)


def _grid(schedule, spacing, n):
    points, times = jax.vmap(lambda i: schedules.grid_point(schedule, spacing, i, n))(
        jnp.arange(n))
    return np.asarray(points.sigma / points.alpha, np.float64), np.asarray(times), points


@pytest.mark.parametrize('name', ['cosine', 'linear', 'discrete_linear'])
@pytest.mark.parametrize('n', [1, 7, 50])
def test_karras_and_logsnr_grids_follow_their_formulas(name, n):
    sched = diffusion.get_schedule(name)
    lo, hi = sched.logsnr_range()
    ramp = np.linspace(0, 1, n)
    smax, smin = np.exp(-0.5 * lo), np.exp(-0.5 * hi)
    want = (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    sigma_e, times, points = _grid(sched, 'karras', n)
    np.testing.assert_allclose(sigma_e, want, rtol=2e-5)
    np.testing.assert_allclose(points.alpha**2 + points.sigma**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(times, sched.time_at_logsnr(points.logsnr))
    _, _, points = _grid(sched, 'logsnr', n)
    np.testing.assert_allclose(points.logsnr, lo + ramp * (hi - lo), rtol=1e-5, atol=1e-5)
    if not sched.is_discrete:  # the grid's times give its points back
        np.testing.assert_allclose(sched.logsnr(times), -2 * np.log(sigma_e), rtol=1e-3,
                                   atol=1e-3)


def test_karras_grid_is_diffusers():
    ref = _float64(diffusers.EulerDiscreteScheduler(use_karras_sigmas=True))
    ref.set_timesteps(20)
    sigma_e, times, _ = _grid(diffusion.get_schedule('discrete_linear'), 'karras', 20)
    np.testing.assert_allclose(sigma_e, ref.sigmas.numpy()[:-1], rtol=2e-6)
    np.testing.assert_allclose(times, ref.timesteps.numpy(), atol=2e-3)  # fractional
    assert np.abs(times - np.round(times)).max() > 0.1


def test_default_spacing_is_the_schedule_grid():
    sched = diffusion.get_schedule('discrete_linear', spacing='leading')
    point, time = schedules.grid_point(sched, 'default', 3, 10)
    assert float(time) == float(sched.sampling_time(3, 10))
    assert float(point.logsnr) == float(sched.point(time).logsnr)


# ------------------------------------------------------ Gaussian recovery (statistical)


def _gaussian_denoiser(schedule, prediction='eps'):
    def fn(x, model_t, cond):
        a, s = schedule.alpha(model_t)[:, None], schedule.sigma(model_t)[:, None]
        x0 = MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)
        eps = (x - a * x0) / s
        return {'x0': x0, 'eps': eps, 'v': a * eps - s * x0}[prediction]
    return fn


# Schedules of sensible ranges: EDM-style grids over e^+-10 (the 'cosine' default) spend
# their steps where nothing happens (Heun on karras over 22026 .. 4.5e-5 needs many more).
GAUSS_SCHEDULES = {
    'cos10': diffusion.get_schedule('cosine_offset', logsnr_min=-10.0),  # sigma_e 148 .. 0.0125
    'cosine': diffusion.get_schedule('cosine'),
    'linear': diffusion.get_schedule('linear'),
    'discrete_linear': diffusion.get_schedule('discrete_linear'),
}


@pytest.mark.parametrize('schedule,sampler,steps,kwargs', [
    ('cos10', 'euler', 250, dict(churn=10.0)),
    ('linear', 'euler', 1000, dict(churn=40.0)),
    ('cos10', 'heun', 40, {}),
    ('cos10', 'heun', 40, dict(spacing='karras')),
    ('cos10', 'heun', 40, dict(churn=10.0)),
    ('cos10', 'heun', 80, dict(churn=20.0, spacing='karras')),
    ('cosine', 'heun', 80, dict(spacing='logsnr')),
    ('cos10', 'dpmpp_2m_sde', 100, {}),
    ('linear', 'dpmpp_3m', 30, dict(spacing='karras')),
    ('cos10', 'dpmpp_3m_sde', 100, dict(spacing='logsnr')),
    ('discrete_linear', 'dpmpp_3m', 50, {}),
])
def test_samplers_recover_gaussian_data(schedule, sampler, steps, kwargs):
    """Data N(MU, S^2), exact posterior-mean denoiser: the samplers return N(MU, S^2) up to
    their discretisation error and the sampling error of 64k draws (~0.6% on the variance)."""
    sched = GAUSS_SCHEDULES[schedule]
    fn = jax.jit(lambda rng: diffusion.sample(
        _gaussian_denoiser(sched, 'v'), (16384, 4), rng, schedule=sched, sampler=sampler,
        num_steps=steps, prediction='v', **kwargs))
    x = np.asarray(fn(jax.random.key(1)))
    assert abs(x.mean() - MU) < 0.01, x.mean()
    assert 0.95 < x.var() / S**2 < 1.04, x.var() / S**2
    np.testing.assert_allclose(x.mean(0), MU, atol=0.02)
    assert np.abs(np.corrcoef(x.T) - np.eye(4)).max() < 0.04


def test_heun_first_step_from_the_cosine_top_is_euler():
    """The continuous cosine schedule starts at sigma_e = e^10 = 22026 and a uniform-time grid
    of 12 steps goes next to sigma_e 7.6: Heun over that ratio (the model's x0 changes from the
    data mean to the posterior mean) overshoots by thousands; Euler above EDM's sigma_max does not."""
    sched = GAUSS_SCHEDULES['cosine']

    def run(**kw):
        return np.asarray(jax.jit(lambda rng: diffusion.sample(
            _gaussian_denoiser(sched, 'v'), (16384, 4), rng, schedule=sched,
            sampler=diffusion.get_sampler('heun', **kw), num_steps=12, prediction='v'))(
                jax.random.key(2)))

    x = run()
    assert abs(x.mean() - MU) < 0.01, x.mean()
    assert 0.95 < x.var() / S**2 < 1.05, x.var() / S**2
    unlimited = run(heun_sigma_max=float('inf'))
    assert unlimited.var() / S**2 > 10, unlimited.var() / S**2


def test_third_order_sde_converges():
    """The corrected D2 coefficient: 3M SDE's variance error shrinks with the steps (with
    diffusers' coefficient it was still 11% / 22% at 100 steps on cos10 / discrete_linear)."""
    sched = GAUSS_SCHEDULES['discrete_linear']
    run = lambda n: np.asarray(jax.jit(lambda rng: diffusion.sample(
        _gaussian_denoiser(sched), (16384, 4), rng, schedule=sched, sampler='dpmpp_3m_sde',
        num_steps=n))(jax.random.key(1))).var() / S**2
    assert abs(run(100) - 1) < 0.02


# ------------------------------------------------------------- cost and one traced program

def test_heun_evaluates_the_denoiser_twice_per_step_but_once_at_the_last():
    traced, ran = {}, []

    def run(sampler, num_steps):
        calls = []

        def model(x, t, cond):
            calls.append(1)  # at trace time
            jax.debug.callback(lambda: ran.append(1))  # at run time
            return 0.9 * x
        fn = jax.jit(lambda rng: diffusion.sample(model, (2, 3), rng, schedule='cosine',
                                                  sampler=sampler, num_steps=num_steps))
        ran.clear()
        jax.block_until_ready(fn(jax.random.key(0)))
        traced[(sampler, num_steps)] = len(calls)
        return len(ran)

    # 2n - 1 evaluations, less the first step's second one: from sigma_e 22026 > 80 it is Euler
    assert run('heun', 5) == 8 and run('heun', 40) == 78
    assert run('euler', 5) == 5 and run('dpmpp_3m_sde', 5) == 5
    assert run('heun', 1) == 1
    for n in (1, 5, 40):
        assert diffusion.denoiser_evaluations('cosine', 'heun', n) == run('heun', n)
    # karras from 22026 (rho 7): the steps from 22026, 10154, 4250, 1572, 493 and 123 are Euler
    assert diffusion.denoiser_evaluations('cosine', 'heun', 10, 'karras') == 10 + 3
    assert traced[('heun', 5)] == traced[('heun', 40)] == traced[('heun', 1)] == 2
    assert traced[('euler', 5)] == traced[('dpmpp_3m_sde', 5)] == 1


def _model(x, t, cond):
    return 0.5 * x + 0.01 * t[:, None, None, None] + cond['text'].mean((1, 2))[:, None, None, None]


@pytest.mark.parametrize('sampler,spacing,churn', [
    ('heun', 'karras', 10.0), ('dpmpp_3m_sde', 'logsnr', 0.0), ('euler', 'default', 3.0)])
def test_program_size_does_not_grow_with_steps(sampler, spacing, churn):
    cond, uncond = {'text': jnp.ones((2, 5, 4))}, {'text': jnp.zeros((1, 5, 4))}
    sched = diffusion.get_schedule('discrete_linear', spacing='leading')

    def lowered(num_steps):
        fn = jax.jit(lambda rng, c, u: diffusion.sample(
            _model, (2, 8, 8, 3), rng, cond=c, uncond=u, guidance_scale=3.0, schedule=sched,
            sampler=sampler, num_steps=num_steps, thresholding='dynamic', spacing=spacing,
            churn=churn))
        return fn.lower(jax.random.key(0), cond, uncond).as_text()

    small, large = lowered(10), lowered(1000)
    ops = lambda text: text.count(' = ')
    assert ops(small) == ops(large)
    assert 'while' in small and small.count('func.func') == large.count('func.func')


@pytest.mark.parametrize('kwargs,needle', [
    (dict(spacing='uniform'), "'uniform'"),
    (dict(sampler='ddim', churn=1.0), "'euler', 'heun'"),
    (dict(sampler='heun', churn=-1.0), 'churn (-1.0)'),
])
def test_bad_spacing_and_churn_raise_one_line(kwargs, needle):
    args = dict(schedule='cosine', sampler='euler', num_steps=2) | kwargs
    with pytest.raises(ValueError) as err:
        diffusion.sample(lambda x, t, c: x, (1, 2), jax.random.key(0), **args)
    assert needle in str(err.value) and '\n' not in str(err.value)


def test_names():
    assert set(diffusion.SAMPLER_NAMES) >= {'ddpm', 'ddim', 'dpmpp_2m', 'dpmpp_2m_sde',
                                            'dpmpp_3m', 'dpmpp_3m_sde', 'euler', 'heun'}
    assert diffusion.get_sampler('dpmpp_3m_sde') == diffusion.DPMSolverPP(order=3, sde=True)
    assert diffusion.get_sampler('heun', churn=2.0) == diffusion.EDM(order=2, churn=2.0)
    assert diffusion.get_sampler('dpmpp_2m') == diffusion.DPMSolverPP()
    hash(diffusion.get_sampler('heun'))


# ------------------------------------------------------------------ settings and Stage

def test_old_stage_configs_without_the_new_settings_load():
    """Exports written before `spacing` / `churn` existed (round 10's demo base, bundled
    until round 11) load with their defaults; a config that has them keeps them."""
    from jaxt2i.stage import StageConfig, StageSettings

    with open(os.path.join(ROOT, 'tests', 'data', 'round10_base_config.json')) as f:
        raw = json.load(f)['config']
    assert 'spacing' not in raw['sample'] and 'churn' not in raw['sample']
    cfg = StageConfig.from_dict(raw)
    assert cfg.sample.spacing == 'default' and cfg.sample.churn == 0.0
    new = dict(raw, sample=dict(raw['sample'], sampler='heun', spacing='karras', churn=3))
    s = StageConfig.from_dict(new).sample
    assert (s.sampler, s.spacing, s.churn) == ('heun', 'karras', 3.0)
    assert StageSettings('ddpm', 4, 1.0, 'none', 0.1) == StageSettings(
        'ddpm', 4, 1.0, 'none', 0.1, spacing='default', churn=0.0)


def test_stage_settings_check_the_new_fields():
    from jaxt2i.config import ConfigError
    from jaxt2i.stage import StageSettings

    ok = dict(sampler='heun', steps=4, guidance=3.0, thresholding='static', aug_level=0.1)
    assert StageSettings(**ok, churn=5).churn == 5.0
    for bad, expected in [({'churn': float('nan')}, 'sample.churn=nan'),
                          ({'churn': -1.0}, 'sample.churn=-1.0'),
                          ({'spacing': 'uniform'}, "sample.spacing='uniform'"),
                          ({'sampler': 'ddim', 'churn': 1.0}, "'euler', 'heun'")]:
        with pytest.raises(ConfigError, match=expected):
            StageSettings(**{**ok, **bad})


def test_config_defaults_and_validation():
    from jaxt2i.config import ConfigError, load_config_file, validate

    cfg = load_config_file(os.path.join(ROOT, 'configs/base.py:tiny'))
    assert cfg.sample.spacing == 'default' and cfg.sample.churn == 0.0
    validate(cfg)
    cfg.sample.spacing = 'karas'
    with pytest.raises(ConfigError, match="did you mean 'karras'"):
        validate(cfg)
    cfg.sample.spacing = 'karras'
    cfg.sample.churn = float('inf')
    with pytest.raises(ConfigError, match='sample.churn'):
        validate(cfg)


class _StubBase:
    """Stands in for a base stage's U-Net: a fixed, bounded eps prediction."""

    def __init__(self):
        from types import SimpleNamespace

        self.config = SimpleNamespace(is_sr=False, image_size=8, channels=3, objective='eps')

    def apply(self, variables, x_t, model_t, text_emb, text_mask, lowres=None, aug_level=None):
        return 0.5 * jnp.tanh(x_t) + 0.1 * text_emb.mean((1, 2))[:, None, None, None] \
            + 0.01 * model_t[:, None, None, None]


@pytest.mark.parametrize('sampler,spacing,churn', [
    ('heun', 'karras', 2.0), ('dpmpp_3m_sde', 'logsnr', 0.0), ('euler', 'default', 1.0)])
def test_stage_sample_takes_the_new_settings(sampler, spacing, churn):
    from jaxt2i.models.unet import get_unet_config
    from jaxt2i.stage import Stage, StageConfig, StageSettings

    settings = StageSettings(sampler=sampler, steps=3, guidance=2.0, thresholding='dynamic',
                             aug_level=0.0, spacing=spacing, churn=churn)
    unet = get_unet_config('tiny', image_size=8, text_dim=8, objective='eps').to_dict()
    stage = Stage(StageConfig.from_dict({
        'model': unet, 'text': {'encoder': 'bundled', 'max_length': 4},
        'diffusion': {'schedule': 'cosine', 'aug_schedule': 'cosine'},
        'sample': settings.to_dict()}))
    assert stage.config.sample == settings
    stage.model = _StubBase()
    rng = np.random.default_rng(1)
    emb = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.float32)
    mask = jnp.ones((2, 4), bool)
    fn = jax.jit(lambda key, s: stage.sample({}, (emb, mask), (emb[:1] * 0, mask[:1]), key,
                                             settings=s), static_argnums=1)
    x = np.asarray(fn(jax.random.key(0), settings))
    assert x.shape == (2, 8, 8, 3) and np.isfinite(x).all()
    want = diffusion.sample(
        lambda x, t, c: stage.model.apply({}, x, t, c['text_emb'], c['text_mask']),
        (2, 8, 8, 3), jax.random.key(0), schedule='cosine', sampler=sampler, num_steps=3,
        cond={'text_emb': emb, 'text_mask': mask},
        uncond={'text_emb': emb[:1] * 0, 'text_mask': mask[:1]}, guidance_scale=2.0,
        prediction='eps', thresholding='dynamic', spacing=spacing, churn=churn)
    np.testing.assert_allclose(x, want, atol=1e-5, rtol=0)
    other = np.asarray(fn(jax.random.key(0), settings.replace(spacing='default', churn=0.0)
                          if sampler != 'euler' else settings.replace(churn=0.0)))
    assert np.abs(other - x).max() > 1e-4


def _cli(args, cwd):
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
               JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, '-m', 'jaxt2i.sample', *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_flags_run_and_are_recorded(tmp_path):
    """`--sampler=heun --churn=1 --spacing=karras` on the bundled demo's base stage; sample.json
    records the settings."""
    out = tmp_path / 'out'
    r = _cli(['--prompt=a red circle', '--stages=1', '--steps=2', '--sampler=heun',
              '--churn=1', '--spacing=karras', f'--out={out}'], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    settings = json.loads((out / 'sample.json').read_text())['settings'][0]
    assert (settings['sampler'], settings['spacing'], settings['churn']) == ('heun', 'karras', 1.0)


@pytest.mark.parametrize('args,expected', [
    (['--spacing=uniform'], "sample.spacing='uniform' is not one of 'default', 'karras', "
                            "'logsnr'"),
    (['--churn=nan'], '--churn=nan is out of range'),
    (['--churn=2'], "sample.churn=2.0 applies only to the samplers 'euler', 'heun'"),
])
def test_cli_refuses_bad_new_settings_in_one_line(args, expected, tmp_path):
    out = tmp_path / 'out'
    r = _cli(['--prompt=a red circle', f'--out={out}', *args], tmp_path)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr[-2000:]
    assert not out.exists() or not os.listdir(out)
