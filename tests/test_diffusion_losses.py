"""Tests of forward noising, noise augmentation, prediction conversions and the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i import diffusion

diffusers = pytest.importorskip('diffusers')
torch = pytest.importorskip('torch')
torch.set_num_threads(1)


def _gaussians(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _alpha_sigma(batch=5):
    """Random VP noise levels from numpy, independent of our schedules."""
    lam = np.linspace(-6, 6, batch)
    return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam))), lam


def test_q_sample_matches_diffusers_add_noise():
    x0, noise = _gaussians(0, (4, 3, 8, 8), (4, 3, 8, 8))
    steps = np.array([0, 10, 500, 999])
    ref = diffusers.DDPMScheduler(beta_schedule='scaled_linear', beta_start=0.00085,
                                  beta_end=0.012).add_noise(
        torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(steps)).numpy()
    sched = diffusion.get_schedule('discrete_scaled_linear', beta_start=0.00085, beta_end=0.012)
    got = diffusion.q_sample(jnp.asarray(x0), jnp.asarray(steps, jnp.float32), noise, sched)
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-6)


def test_conversions_match_definitions_and_round_trip():
    alpha, sigma, _ = _alpha_sigma()
    x0, eps = _gaussians(1, (5, 6), (5, 6))
    a, s = alpha[:, None], sigma[:, None]
    x_t = (a * x0 + s * eps).astype(np.float32)
    v = (a * eps - s * x0).astype(np.float32)  # Salimans & Ho 2022
    truth = {'eps': eps, 'v': v, 'x0': x0}
    for src in ('eps', 'v', 'x0'):
        got_x0, got_eps = diffusion.to_x0_eps(truth[src], src, x_t, alpha, sigma)
        np.testing.assert_allclose(got_x0, x0, atol=2e-4, err_msg=src)
        np.testing.assert_allclose(got_eps, eps, atol=2e-4, err_msg=src)
        for dst in ('eps', 'v', 'x0'):
            there = diffusion.convert(truth[src], src, dst, x_t, alpha, sigma)
            np.testing.assert_allclose(there, truth[dst], atol=2e-4, err_msg=f'{src}->{dst}')
            back = diffusion.convert(there, dst, src, x_t, alpha, sigma)
            np.testing.assert_allclose(back, truth[src], atol=2e-4, err_msg=f'{src}->{dst}->{src}')


def test_min_snr_weights_formula():
    _, _, lam = _alpha_sigma()
    snr = np.exp(lam)
    gamma = 5.0
    expect = {'x0': np.minimum(snr, gamma), 'eps': np.minimum(snr, gamma) / snr,
              'v': np.minimum(snr, gamma) / (snr + 1)}
    for obj, w in expect.items():
        np.testing.assert_allclose(diffusion.loss_weight(lam, obj, 'min_snr', gamma), w, rtol=1e-5)
        np.testing.assert_array_equal(diffusion.loss_weight(lam, obj, 'uniform'), np.ones(5))


def test_min_snr_loss_is_the_same_in_every_parameterisation():
    # Same x0 error expressed as eps / v / x0 errors: min-SNR weights make all three equal
    # to min(SNR, gamma) * |x0_hat - x0|^2.
    alpha, sigma, lam = _alpha_sigma()
    x0, eps, err = _gaussians(2, (5, 4, 4, 3), (5, 4, 4, 3), (5, 4, 4, 3))
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    x_t = a * x0 + s * eps
    x0_hat = x0 + 0.1 * err
    eps_hat = (x_t - a * x0_hat) / s
    pred = {'x0': (x0_hat, x0), 'eps': (eps_hat, eps),
            'v': (a * eps_hat - s * x0_hat, a * eps - s * x0)}
    expect = np.minimum(np.exp(lam), 5.0) * np.mean((x0_hat - x0) ** 2, axis=(1, 2, 3))
    for obj, (p, target) in pred.items():
        got = diffusion.weighted_mse(jnp.asarray(p, jnp.float32), jnp.asarray(target, jnp.float32),
                                     lam, objective=obj, weighting='min_snr', gamma=5.0)
        assert got.shape == (5,)
        np.testing.assert_allclose(got, expect, rtol=1e-3, err_msg=obj)


def test_uniform_loss_is_per_example_mean():
    p, q = _gaussians(3, (3, 2, 5), (3, 2, 5))
    got = diffusion.weighted_mse(p, q, np.zeros(3), objective='eps')
    np.testing.assert_allclose(got, ((p - q) ** 2).reshape(3, -1).mean(1), rtol=1e-6)


@pytest.mark.parametrize('objective', ['eps', 'v', 'x0'])
def test_diffusion_loss_is_zero_for_the_exact_denoiser(objective):
    # Point-mass data x0 = c: the exact prediction of each objective is known in closed form.
    sched = diffusion.get_schedule('discrete_linear')
    c = jnp.full((6, 4, 4, 3), 0.3)
    calls = []

    def exact(x_t, t, cond):
        calls.append((x_t.shape, t.shape, cond))
        a = sched.alpha(t)[:, None, None, None]
        s = sched.sigma(t)[:, None, None, None]
        eps = (x_t - a * c) / s
        return {'eps': eps, 'x0': c, 'v': a * eps - s * c}[objective]

    loss = jax.jit(lambda r: diffusion.diffusion_loss(
        exact, c, 'cond', r, schedule=sched, objective=objective, weighting='min_snr'))(
            jax.random.key(0))
    assert loss.shape == (6,) and calls == [((6, 4, 4, 3), (6,), 'cond')]
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)
    bad = diffusion.diffusion_loss(lambda x, t, cond: jnp.zeros_like(x), c, None,
                                   jax.random.key(1), schedule='cosine', objective=objective)
    assert float(bad.min()) > 0


def test_noise_augment_levels():
    x = jnp.asarray(_gaussians(4, (256, 8, 8, 3))[0]).clip(-1, 1)
    rng = jax.random.key(0)
    aug, level = diffusion.noise_augment(rng, x, max_level=0.4)
    assert aug.shape == x.shape and level.shape == (256,)
    assert float(level.min()) >= 0 and float(level.max()) < 0.4 and float(level.std()) > 0.05
    clean, level0 = diffusion.noise_augment(rng, x, level=0.0)
    np.testing.assert_array_equal(level0, np.zeros(256))
    np.testing.assert_allclose(clean, x, atol=5e-4)  # sigma(0) = exp(-10)
    # Symmetric cosine (logsnr in [-20, 20]) has alpha = sigma = 1/sqrt(2) at level 0.5.
    half, _ = diffusion.noise_augment(rng, x, level=0.5)
    noise = (np.asarray(half) - np.asarray(x) / np.sqrt(2)) * np.sqrt(2)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
    assert abs(np.corrcoef(noise.ravel(), np.asarray(x).ravel())[0, 1]) < 0.03
    # A discrete schedule's timestep is level * num_train_timesteps (DeepFloyd IF: 250 = 0.25).
    sched = diffusion.get_schedule('discrete_squaredcos_cap_v2')
    noised, _ = diffusion.noise_augment(rng, x, level=0.25, schedule=sched)
    noise = jax.random.normal(jax.random.split(rng)[1], x.shape, x.dtype)
    np.testing.assert_allclose(noised, diffusion.q_sample(x, jnp.full((256,), 250.0), noise, sched),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('call,needle', [
    (lambda: diffusion.loss_weight(jnp.zeros(2), 'score'), "'score'"),
    (lambda: diffusion.loss_weight(jnp.zeros(2), 'eps', 'p2'), "'p2'"),
    (lambda: diffusion.to_x0_eps(jnp.zeros(2), 'epsilon', jnp.zeros(2), 1.0, 0.0), "'epsilon'"),
])
def test_unknown_names_raise_one_line(call, needle):
    with pytest.raises(ValueError) as err:
        call()
    assert needle in str(err.value) and 'allowed' in str(err.value)
    assert '\n' not in str(err.value)
