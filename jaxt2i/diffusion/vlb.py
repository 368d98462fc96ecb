"""The hybrid loss of a model that learns its variance (Nichol & Dhariwal 2021, "Improved
Denoising Diffusion Probabilistic Models"): L_hybrid = L_simple + lambda L_vlb, lambda = 0.001.

For a discrete DDPM schedule with alpha-bar a_t (a_{-1} = 1), beta_t = 1 - a_t / a_{t-1}:
  q(x_{t-1} | x_t, x_0) = N(mu~, beta~),  beta~_t = beta_t (1 - a_{t-1}) / (1 - a_t),
      mu~ = sqrt(a_{t-1}) beta_t / (1 - a_t) x_0 + sqrt(1 - beta_t) (1 - a_{t-1}) / (1 - a_t) x_t
  p(x_{t-1} | x_t)  = N(mu~(x_0 = x0_pred), Sigma),  x0_pred from the predicted eps,
      log Sigma = frac log beta_t + (1 - frac) log beta~_t,  frac = (v + 1) / 2  (eq. 15)
  L_t (t > 0) = KL(q || p), L_0 = -log p(x_0 | x_1) with the discretised Gaussian decoder
      over 256 bins of [-1, 1] (Ho et al. 2020 eq. 13);
both in bits per dimension. The mean's eps is stop-gradded in L_vlb, so L_vlb trains only the
variance and L_simple only the mean (sec. 3.1). With t uniform over the N timesteps,
N L_t estimates L_vlb, so the loss is L_simple + lambda N L_t (improved-diffusion's code:
vb * N / 1000 for its MSE term at lambda = 0.001). log beta~ is clipped at t = 0 (where it is
-inf) to log beta~_1, as improved-diffusion (and IF's own training code) do; at t > 0 the
interpolation is diffusers' DDPMScheduler 'learned_range', which IF samples with.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr

from jaxt2i.diffusion import noising
from jaxt2i.diffusion import schedules as schedules_lib
from jaxt2i.diffusion.losses import weighted_mse

VLB_WEIGHT = 1e-3  # lambda of L_hybrid
_LOG_FLOOR = 1e-12


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) elementwise of x in [-1, 1] quantised to 256 bins under N(mean, exp(log_scale)^2);
    the edge bins take the tails (Ho et al. 2020 eq. 13)."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    upper, lower = inv_std * (centered + 1.0 / 255.0), inv_std * (centered - 1.0 / 255.0)
    # the bin at -1 takes (-inf, upper], the bin at 1 [lower, inf); probabilities floored at
    # 1e-12 (40 bits), as improved-diffusion does
    mass = jnp.where(x < -0.999, ndtr(upper),
                     jnp.where(x > 0.999, ndtr(-lower), ndtr(upper) - ndtr(lower)))
    return jnp.log(jnp.maximum(mass, _LOG_FLOOR))


def _tables(schedule, t):
    """(alpha-bar at t, at t - 1 (1 at t = 0), beta_t, log beta~ clipped) for integer t [B]."""
    abar = schedule.alpha(t) ** 2
    abar_prev = jnp.where(t > 0, schedule.alpha(jnp.maximum(t - 1, 0)) ** 2, 1.0)
    beta = 1.0 - abar / abar_prev
    a1, a0 = schedule.alpha(1.0) ** 2, schedule.alpha(0.0) ** 2
    beta_tilde_1 = (1.0 - a1 / a0) * (1.0 - a0) / (1.0 - a1)
    beta_tilde = jnp.where(t > 0, beta * (1.0 - abar_prev) / (1.0 - abar), beta_tilde_1)
    return abar, abar_prev, beta, jnp.log(beta_tilde)


def vlb_term(x0, x_t, t, eps, v, *, schedule):
    """L_t of the module docstring per example, in bits per dimension: [B].

    Args:
      x0: [B, ...] clean data in [-1, 1]; x_t: the noised data at integer timesteps t [B].
      eps: [B, ...] the predicted noise (the mean's; stop-gradded by the caller).
      v: [B, ...] the predicted variance interpolation in [-1, 1].
      schedule: a discrete schedule (`DiscreteSchedule`).
    """
    abar, abar_prev, beta, log_beta_tilde = (
        noising.expand(a, x0.ndim) for a in _tables(schedule, t))
    c_x0 = jnp.sqrt(abar_prev) * beta / (1.0 - abar)
    c_xt = jnp.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)
    x0_pred = (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
    true_mean = c_x0 * x0 + c_xt * x_t
    model_mean = c_x0 * x0_pred + c_xt * x_t
    frac = (v + 1.0) / 2.0
    model_logvar = frac * jnp.log(beta) + (1.0 - frac) * log_beta_tilde
    kl = normal_kl(true_mean, log_beta_tilde, model_mean, model_logvar)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
    per_dim = jnp.where(noising.expand(t, x0.ndim) > 0, kl, nll)
    return jnp.mean(per_dim.reshape(per_dim.shape[0], -1), axis=1) / math.log(2.0)


def hybrid_loss(network_fn, x0, cond, rng, *, schedule, weighting: str = "uniform",
                gamma: float = 5.0, vlb_weight: float = VLB_WEIGHT):
    """L_hybrid per example [B] of a network that predicts (eps, v) (module docstring).

    Args:
      network_fn: (x_t [B, H, W, C], model_t [B], cond) -> [B, H, W, 2C]: eps, then v.
      x0: [B, H, W, C] clean data in [-1, 1].
      cond: conditioning passed through to network_fn.
      rng: PRNG key (timesteps and noise, drawn as `diffusion_loss` draws them).
      schedule: a discrete schedule (or its name).
      weighting, gamma: the weighting of L_simple (`loss_weight`; uniform in the paper).
      vlb_weight: lambda.
    """
    schedule = schedules_lib.as_schedule(schedule)
    if not schedule.is_discrete:
        raise ValueError("the learned-variance (hybrid) loss needs a discrete schedule "
                         "(e.g. 'discrete_squaredcos_cap_v2'), whose timesteps define L_vlb")
    t_rng, noise_rng = jax.random.split(rng)
    x0 = x0.astype(jnp.float32)
    t = schedule.sample_t(t_rng, (x0.shape[0],))  # [B] integer timesteps as float
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    alpha, sigma, logsnr = schedule.point(t)
    x_t = noising.add_noise(x0, noise, alpha, sigma)
    out = network_fn(x_t, schedule.model_t(t), cond)
    channels = x0.shape[-1]
    eps, v = out[..., :channels], out[..., channels:]
    simple = weighted_mse(eps, noise, logsnr, objective="eps", weighting=weighting, gamma=gamma)
    vlb = vlb_term(x0, x_t, t, jax.lax.stop_gradient(eps), v.astype(jnp.float32),
                   schedule=schedule)
    return simple + vlb_weight * schedule.num_train_timesteps * vlb


__all__ = ["VLB_WEIGHT", "discretized_gaussian_log_likelihood", "hybrid_loss", "normal_kl",
           "vlb_term"]
