"""Tests of jaxt2i.diffusion.schedules against diffusers and closed-form references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i import diffusion

diffusers = pytest.importorskip('diffusers')
torch = pytest.importorskip('torch')
torch.set_num_threads(1)


@pytest.mark.parametrize('beta_schedule,start,end', [
    ('linear', 1e-4, 0.02), ('scaled_linear', 0.00085, 0.012), ('squaredcos_cap_v2', 1e-4, 0.02)])
def test_discrete_alphas_match_diffusers(beta_schedule, start, end):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                  beta_start=start, beta_end=end).alphas_cumprod.double().numpy()
    sched = diffusion.get_schedule(f'discrete_{beta_schedule}', beta_start=start, beta_end=end)
    t = jnp.arange(1000, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(sched.alpha(t)) ** 2, ref, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(sched.sigma(t)) ** 2, 1 - ref, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(sched.logsnr(t)), np.log(ref / (1 - ref)),
                               rtol=1e-4, atol=1e-4)


# (our spacing, diffusers scheduler class, its timestep_spacing)
SPACINGS = [
    ('leading', 'DDPMScheduler', 'leading'), ('trailing', 'DDPMScheduler', 'trailing'),
    ('linspace', 'DDIMScheduler', 'linspace'), ('leading', 'DDIMScheduler', 'leading'),
    ('linspace_exclusive', 'DPMSolverMultistepScheduler', 'linspace'),
    ('trailing', 'DPMSolverMultistepScheduler', 'trailing'),
]


@pytest.mark.parametrize('ours,cls,theirs', SPACINGS)
def test_sampling_timesteps_match_diffusers(ours, cls, theirs):
    sched = diffusion.get_schedule('discrete_linear', spacing=ours)
    ref_sched = getattr(diffusers, cls)(num_train_timesteps=1000, timestep_spacing=theirs)
    for n in (1, 2, 7, 10, 50, 250, 1000):
        ref_sched.set_timesteps(n)
        got = jax.vmap(lambda i, n=n: sched.sampling_time(i, n))(jnp.arange(n))
        np.testing.assert_array_equal(np.asarray(got), ref_sched.timesteps.numpy(),
                                      err_msg=f'{ours} n={n}')


def test_cosine_matches_nichol_dhariwal():
    # alpha_bar(t) = cos^2(pi/2 (t + s) / (1 + s)): the clipped cosine with matching ends.
    s = 0.008
    lmax = -2 * math.log(math.tan(math.pi / 2 * s / (1 + s)))
    sched = diffusion.CosineSchedule(logsnr_min=-30.0, logsnr_max=lmax)
    t = np.linspace(0, 0.95, 40)
    ref = np.cos(np.pi / 2 * (t + s) / (1 + s)) ** 2
    np.testing.assert_allclose(np.asarray(sched.alpha(t)) ** 2, ref, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(sched.sigma(t)) ** 2, 1 - ref, rtol=1e-4, atol=1e-6)
    # The named schedule the paper variants train with: the same curve (clipped at -20).
    named = diffusion.get_schedule("cosine_offset")
    np.testing.assert_allclose(float(named.logsnr(0.0)), 8.77, atol=5e-3)
    np.testing.assert_allclose(np.asarray(named.alpha(t)) ** 2, ref, rtol=2e-3)  # the clip


def test_linear_matches_numerical_integral_of_beta():
    sched = diffusion.get_schedule('linear')
    t = np.linspace(0.01, 1.0, 25)
    grid = np.linspace(0, 1, 200001)
    beta = 0.1 + (20.0 - 0.1) * grid
    integral = np.concatenate([[0], np.cumsum((beta[1:] + beta[:-1]) / 2 * np.diff(grid))])
    abar = np.exp(-np.interp(t, grid, integral))
    np.testing.assert_allclose(np.asarray(sched.alpha(t)) ** 2, abar, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(sched.logsnr(t)), np.log(abar / (1 - abar)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['cosine', 'linear'])
def test_continuous_ends_and_monotone(name):
    sched = diffusion.get_schedule(name, logsnr_min=-12.0, logsnr_max=9.0)
    t = jnp.linspace(0, 1, 101)
    lam = np.asarray(sched.logsnr(t))
    assert lam[0] == pytest.approx(9.0, abs=1e-4) and lam[-1] >= -12.0 - 1e-4
    assert np.all(np.diff(lam) < 0)
    a, s = np.asarray(sched.alpha(t)), np.asarray(sched.sigma(t))
    np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(np.log(a**2 / s**2), lam, rtol=1e-4, atol=1e-3)
    if name == 'cosine':
        assert lam[-1] == pytest.approx(-12.0, abs=1e-3)


def test_model_t_convention():
    t = jnp.array([0.0, 0.25, 1.0])
    np.testing.assert_array_equal(diffusion.get_schedule('cosine').model_t(t), t)
    by_logsnr = diffusion.get_schedule('cosine', model_input='logsnr')
    np.testing.assert_allclose(by_logsnr.model_t(t), by_logsnr.logsnr(t))
    disc = diffusion.get_schedule('discrete_linear')
    np.testing.assert_array_equal(disc.model_t(jnp.array([999.0, 0.0])), [999.0, 0.0])


def test_sample_t_ranges():
    rng = jax.random.key(0)
    t = diffusion.get_schedule('cosine').sample_t(rng, (4096,))
    assert t.shape == (4096,) and float(t.min()) >= 0 and float(t.max()) < 1
    assert abs(float(t.mean()) - 0.5) < 0.03
    k = diffusion.get_schedule('discrete_linear', num_train_timesteps=50).sample_t(rng, (4096,))
    assert set(np.unique(np.asarray(k)).tolist()) == set(range(50))


def test_schedules_are_hashable_static_args():
    a = diffusion.get_schedule('discrete_scaled_linear', spacing='leading')
    b = diffusion.DiscreteSchedule(beta_schedule='scaled_linear', spacing='leading')
    assert a == b and hash(a) == hash(b)
    f = jax.jit(lambda t, s: s.alpha(t), static_argnums=1)
    np.testing.assert_allclose(f(jnp.float32(3.0), a), a.alpha(3.0))


@pytest.mark.parametrize('call,needle', [
    (lambda: diffusion.get_schedule('cosinus'), "'cosinus'"),
    (lambda: diffusion.get_schedule('discrete_linear', spacing='middle'), "'middle'"),
    (lambda: diffusion.get_schedule('linear', model_input='sigma'), "'sigma'"),
])
def test_unknown_names_raise_one_line(call, needle):
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    assert needle in msg and 'allowed' in msg and '\n' not in msg
