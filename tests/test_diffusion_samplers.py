"""Tests of the samplers and the scan loop: diffusers trajectories, Gaussian recovery, HLO size.

The reference is diffusers' DDPMScheduler / DDIMScheduler / DPMSolverMultistepScheduler (torch,
CPU) driven by the same analytic denoiser, a fixed function of (x_t, t) that is linear in x_t.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i import diffusion

diffusers = pytest.importorskip('diffusers')
torch = pytest.importorskip('torch')
torch.set_num_threads(1)

SHAPE = (2, 3, 4, 4)  # torch's NCHW; the denoiser is elementwise, so layout is irrelevant.
PHASE = np.arange(3.0).reshape(1, 3, 1, 1)
X_T = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
TOL = 1e-5


def _torch_model(a, b):
    return lambda x, t: a * x + b * torch.sin(torch.tensor(t / 300.0 + PHASE, dtype=x.dtype))


def _jax_model(a, b):
    return lambda x, t, cond: a * x + b * jnp.sin(t[:, None, None, None] / 300.0 + PHASE)


def _float64(sched):
    """Makes a diffusers DDPM/DDIM scheduler compute its coefficients in float64."""
    sched.alphas_cumprod = torch.cumprod(1 - sched.betas.double(), 0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _reference(sched, num_steps, model, dtype=torch.float64, **step_kwargs):
    """Runs a diffusers scheduler from X_T; returns x after every step [num_steps, *SHAPE]."""
    sched.set_timesteps(num_steps)
    x, out = torch.from_numpy(X_T).to(dtype), []
    for t in sched.timesteps:
        x = sched.step(model(x, float(t)), t, x, **step_kwargs).prev_sample
        out.append(x.double().numpy())
    return np.stack(out)


def _ours(model, schedule, sampler, num_steps, **kwargs):
    fn = jax.jit(lambda: diffusion.sample(model, SHAPE, jax.random.key(0), schedule=schedule,
                                          sampler=sampler, num_steps=num_steps, x_init=X_T,
                                          return_trajectory=True, **kwargs))
    x, traj = fn()
    np.testing.assert_array_equal(x, traj[-1])
    return np.asarray(traj)


def _assert_trajectories_close(ours, ref):
    assert ours.shape == ref.shape
    for i, (a, b) in enumerate(zip(ours, ref)):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL, err_msg=f'step {i}')


@dataclasses.dataclass(frozen=True)
class _ConstNoiseDDPM(diffusion.DDPM):
    """DDPM whose noise is a constant: value 0 gives the step mean, 1 gives mean + std."""
    value: float = 0.0

    def update(self, state, denoised, s, t, noise):
        return super().update(state, denoised, s, t, jnp.full_like(noise, self.value))


@dataclasses.dataclass(frozen=True)
class _ConstNoiseDDIM(diffusion.DDIM):
    value: float = 0.0

    def update(self, state, denoised, s, t, noise):
        return super().update(state, denoised, s, t, jnp.full_like(noise, self.value))


@pytest.mark.parametrize('num_steps,spacing', [(10, 'leading'), (20, 'trailing')])
def test_ddim_matches_diffusers(num_steps, spacing):
    # diffusers' DDIM steps to t - N // n, the next timestep only when n divides N.
    ref = _reference(_float64(diffusers.DDIMScheduler(clip_sample=False, timestep_spacing=spacing)),
                     num_steps, _torch_model(0.9, 0.3))
    sched = diffusion.get_schedule('discrete_linear', spacing=spacing)
    ours = _ours(_jax_model(0.9, 0.3), sched, 'ddim', num_steps)
    _assert_trajectories_close(ours, ref)


def test_ddim_v_prediction_matches_diffusers():
    ref = _reference(_float64(diffusers.DDIMScheduler(clip_sample=False,
                                                      prediction_type='v_prediction')),
                     20, _torch_model(0.4, 0.2))
    ours = _ours(_jax_model(0.4, 0.2), diffusion.get_schedule('discrete_linear', spacing='leading'),
                 'ddim', 20, prediction='v')
    _assert_trajectories_close(ours, ref)


@pytest.mark.parametrize('eta,value', [(0.5, 0.0), (1.0, 1.0)])
def test_ddim_eta_step_mean_and_std_match_diffusers(eta, value):
    ref = _reference(_float64(diffusers.DDIMScheduler(clip_sample=False)), 10,
                     _torch_model(0.9, 0.3), eta=eta,
                     variance_noise=torch.full(SHAPE, value, dtype=torch.float64))
    ours = _ours(_jax_model(0.9, 0.3), diffusion.get_schedule('discrete_linear', spacing='leading'),
                 _ConstNoiseDDIM(eta=eta, value=value), 10)
    _assert_trajectories_close(ours, ref)


# (diffusers kwargs, our thresholding): none, static clip, diffusers' dynamic thresholding
# with a ratio and an upper clamp, and the paper's unclamped dynamic thresholding.
DDPM_CASES = [
    (dict(clip_sample=False), 'none'),
    (dict(clip_sample=True), 'static'),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0),
     diffusion.Thresholding('dynamic', percentile=90.0, max_value=3.0)),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1e6),
     diffusion.Thresholding('dynamic')),
]


@pytest.mark.parametrize('case', range(len(DDPM_CASES)))
@pytest.mark.parametrize('value', [0.0, 1.0])
def test_ddpm_step_mean_and_std_match_diffusers(case, value, monkeypatch):
    """Per-step mean (noise = 0) and mean + std (noise = 1) along the whole trajectory."""
    kwargs, thresholding = DDPM_CASES[case]
    from diffusers.schedulers import scheduling_ddpm
    monkeypatch.setattr(scheduling_ddpm, 'randn_tensor',
                        lambda shape, **kw: torch.full(shape, value, dtype=kw['dtype']))
    ref = _reference(_float64(diffusers.DDPMScheduler(**kwargs)), 10, _torch_model(0.9, 0.3))
    ours = _ours(_jax_model(0.9, 0.3), diffusion.get_schedule('discrete_linear', spacing='leading'),
                 _ConstNoiseDDPM(value=value), 10, thresholding=thresholding)
    _assert_trajectories_close(ours, ref)


def test_ddpm_thresholding_is_active_in_reference_case():
    # Guards the test above: thresholding must change the trajectory for this denoiser.
    sched = diffusion.get_schedule('discrete_linear', spacing='leading')
    plain = _ours(_jax_model(0.9, 0.3), sched, _ConstNoiseDDPM(), 10)
    for _, th in DDPM_CASES[1:]:
        assert np.abs(_ours(_jax_model(0.9, 0.3), sched, _ConstNoiseDDPM(), 10,
                            thresholding=th) - plain).max() > 1e-2


@pytest.mark.parametrize('num_steps,beta_schedule,prediction', [
    (10, 'linear', 'eps'), (1, 'linear', 'eps'), (20, 'scaled_linear', 'x0')])
def test_dpmsolver_pp_2m_matches_diffusers(num_steps, beta_schedule, prediction):
    kw = dict(beta_start=0.00085, beta_end=0.012) if beta_schedule == 'scaled_linear' else {}
    ref_sched = diffusers.DPMSolverMultistepScheduler(
        algorithm_type='dpmsolver++', solver_order=2, beta_schedule=beta_schedule,
        prediction_type={'eps': 'epsilon', 'x0': 'sample'}[prediction], **kw)
    ref = _reference(ref_sched, num_steps, _torch_model(0.9, 0.3), dtype=torch.float32)
    sched = diffusion.get_schedule(f'discrete_{beta_schedule}', spacing='linspace_exclusive', **kw)
    ours = _ours(_jax_model(0.9, 0.3), sched, 'dpmpp_2m', num_steps, prediction=prediction)
    _assert_trajectories_close(ours, ref)


def test_dpmsolver_second_order_differs_from_first_order():
    sched = diffusion.get_schedule('discrete_linear', spacing='linspace_exclusive')
    model = _jax_model(0.9, 0.3)
    two = _ours(model, sched, 'dpmpp_2m', 10)
    one = _ours(model, sched, diffusion.DPMSolverPP(order=1), 10)
    ddim = _ours(model, sched, 'ddim', 10)
    np.testing.assert_allclose(one, ddim, rtol=1e-5, atol=1e-5)  # DPM-Solver++(1) is DDIM.
    assert np.abs(two - one).max() > 1e-3


# Gaussian data x0 ~ N(MU, S^2): E[x0 | x_t] is exact and analytic, so the samplers should
# return N(MU, S^2) up to their discretisation error (first order for DDPM / DDIM, hence the
# step counts) and the sampling error of 64k draws (~0.6% on the variance).
MU, S = 0.5, 0.6
STEPS = {'ddpm': 500, 'ddim': 250, 'dpmpp_2m': 50}


def _gaussian_denoiser(schedule, prediction):
    def fn(x, model_t, cond):
        del cond
        if schedule.model_input == 'logsnr':  # alpha, sigma straight from the model input
            a, s = jnp.sqrt(jax.nn.sigmoid(model_t)), jnp.sqrt(jax.nn.sigmoid(-model_t))
        else:
            a, s = schedule.alpha(model_t), schedule.sigma(model_t)
        a, s = a[:, None], s[:, None]
        x0 = MU + a * S**2 / (a**2 * S**2 + s**2) * (x - a * MU)
        eps = (x - a * x0) / s
        return {'x0': x0, 'eps': eps, 'v': a * eps - s * x0}[prediction]
    return fn


@pytest.mark.parametrize('schedule,sampler,prediction', [
    (diffusion.get_schedule('cosine', model_input='logsnr'), 'ddpm', 'eps'),
    (diffusion.get_schedule('cosine'), 'ddim', 'v'),
    (diffusion.get_schedule('cosine'), 'dpmpp_2m', 'x0'),
    (diffusion.get_schedule('linear'), 'ddpm', 'v'),
    (diffusion.get_schedule('linear', model_input='logsnr'), 'ddim', 'eps'),
    (diffusion.get_schedule('linear'), 'dpmpp_2m', 'eps'),
    (diffusion.get_schedule('discrete_linear'), 'ddpm', 'x0'),
    (diffusion.get_schedule('discrete_linear'), 'ddim', 'eps'),
    (diffusion.get_schedule('discrete_linear'), 'dpmpp_2m', 'v'),
])
def test_samplers_recover_gaussian_data(schedule, sampler, prediction):
    fn = jax.jit(lambda rng: diffusion.sample(
        _gaussian_denoiser(schedule, prediction), (16384, 4), rng, schedule=schedule,
        sampler=sampler, num_steps=STEPS[sampler], prediction=prediction))
    x = np.asarray(fn(jax.random.key(1)))
    assert abs(x.mean() - MU) < 0.01  # 4 standard errors
    assert 0.95 < x.var() / S**2 < 1.03
    # Each coordinate on its own, and no spurious correlation between coordinates.
    np.testing.assert_allclose(x.mean(0), MU, atol=0.02)
    assert np.abs(np.corrcoef(x.T) - np.eye(4)).max() < 0.04


def test_ddpm_is_stochastic_and_reproducible():
    sched = diffusion.get_schedule('cosine')
    run = lambda key: diffusion.sample(_gaussian_denoiser(sched, 'eps'), (256, 1), key,
                                       schedule=sched, sampler='ddpm', num_steps=20,
                                       x_init=jnp.zeros((256, 1)))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.std(a)) > 0.3 and float(jnp.abs(a - c).max()) > 0.1


def _model(x, t, cond):
    return 0.5 * x + 0.01 * t[:, None, None, None] + cond['text'].mean((1, 2))[:, None, None, None]


@pytest.mark.parametrize('schedule,sampler', [
    ('cosine', 'ddpm'), (diffusion.get_schedule('discrete_linear', spacing='leading'), 'ddim'),
    (diffusion.get_schedule('discrete_linear', spacing='leading'), 'dpmpp_2m')])
def test_program_size_does_not_grow_with_steps(schedule, sampler):
    cond, uncond = {'text': jnp.ones((2, 5, 4))}, {'text': jnp.zeros((1, 5, 4))}

    def lowered(num_steps):
        fn = jax.jit(lambda rng, c, u: diffusion.sample(
            _model, (2, 8, 8, 3), rng, cond=c, uncond=u, guidance_scale=3.0, schedule=schedule,
            sampler=sampler, num_steps=num_steps, thresholding='dynamic'))
        return fn.lower(jax.random.key(0), cond, uncond)

    small, large = lowered(10), lowered(1000)
    ops = lambda text: len(re.findall(r' = ', text))
    assert ops(small.as_text()) == ops(large.as_text())
    assert abs(len(small.as_text()) - len(large.as_text())) < 0.001 * len(small.as_text())
    if sampler == 'dpmpp_2m':  # after XLA optimisation too (constant folding may differ a bit)
        small_ops, large_ops = ops(small.compile().as_text()), ops(large.compile().as_text())
        assert abs(small_ops - large_ops) <= 0.05 * small_ops


@pytest.mark.parametrize('sampler,extra,calls', [
    ('dpmpp_2m', {}, 1),
    ('heun', dict(churn=2.0, spacing='karras'), 2),  # Heun's two evaluations per step
])
def test_jitted_sample_traces_once_and_guidance_is_one_call(sampler, extra, calls):
    traces = []

    def denoise(params, x, t, cond):
        traces.append(x.shape)
        return params['w'] * x + cond['text'].mean((1, 2))[:, None, None, None]

    @jax.jit
    def generate(params, rng, cond, uncond, scale):
        return diffusion.sample(lambda x, t, c: denoise(params, x, t, c), (2, 4, 4, 3), rng,
                                cond=cond, uncond=uncond, guidance_scale=scale,
                                schedule='cosine', sampler=sampler, num_steps=6,
                                thresholding='dynamic', **extra)

    cond, uncond = {'text': jnp.ones((2, 5, 4))}, {'text': jnp.zeros((1, 5, 4))}
    a = generate({'w': 0.5}, jax.random.key(0), cond, uncond, 2.0)
    b = generate({'w': 0.6}, jax.random.key(1), cond, uncond, 5.0)
    # traced once; each evaluation is one batched call of 2B
    assert traces == [(4, 4, 4, 3)] * calls
    assert a.shape == (2, 4, 4, 3) and float(jnp.abs(a - b).max()) > 0
    assert generate._cache_size() == 1


@pytest.mark.parametrize('kwargs,needle', [
    (dict(sampler='lms'), "'lms'"),
    (dict(prediction='epsilon'), "'epsilon'"),
    (dict(schedule='sigmoid'), "'sigmoid'"),
    (dict(thresholding='clip'), "'clip'"),
])
def test_unknown_names_raise_one_line(kwargs, needle):
    args = dict(schedule='cosine', sampler='ddim', num_steps=2) | kwargs
    with pytest.raises(ValueError) as err:
        diffusion.sample(lambda x, t, c: x, (1, 2), jax.random.key(0), **args)
    assert needle in str(err.value) and 'allowed' in str(err.value)
    assert '\n' not in str(err.value)
