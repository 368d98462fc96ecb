"""Tests of classifier-free guidance, condition dropout and x0 thresholding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i import diffusion


def _np_dynamic_threshold(x0, p, max_value=None):
    """Imagen's formula in numpy: s = max(1, percentile(|x0|, p)) per sample; clip; divide."""
    out = np.empty_like(x0)
    for b in range(x0.shape[0]):
        s = max(1.0, np.percentile(np.abs(x0[b]), p))
        if max_value is not None:
            s = min(s, max_value)
        out[b] = np.clip(x0[b], -s, s) / s
    return out


@pytest.mark.parametrize('p,max_value', [(99.5, None), (90.0, None), (95.0, 1.5)])
def test_dynamic_threshold_matches_numpy(p, max_value):
    rng = np.random.default_rng(0)
    # Per-sample scales below and above 1, so s = 1 (plain clip) and s > 1 both occur.
    x0 = (rng.standard_normal((4, 8, 8, 3)) * np.array([0.2, 0.8, 2.0, 5.0])[:, None, None, None])
    x0 = x0.astype(np.float32)
    got = diffusion.dynamic_threshold(jnp.asarray(x0), p, max_value)
    np.testing.assert_allclose(got, _np_dynamic_threshold(x0, p, max_value), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0], x0[0], atol=0)  # |x0| < 1: untouched
    th = diffusion.Thresholding('dynamic', percentile=p, max_value=max_value)
    np.testing.assert_array_equal(th(jnp.asarray(x0)), got)


def test_static_threshold_and_none():
    x = jnp.array([[-3.0, -0.5, 0.25, 7.0]])
    np.testing.assert_array_equal(diffusion.static_threshold(x), [[-1.0, -0.5, 0.25, 1.0]])
    np.testing.assert_array_equal(diffusion.as_thresholding('static')(x), [[-1.0, -0.5, 0.25, 1.0]])
    np.testing.assert_array_equal(diffusion.as_thresholding(None)(x), x)
    assert diffusion.Thresholding().percentile == 99.5
    with pytest.raises(ValueError, match="'adaptive'.*allowed"):
        diffusion.as_thresholding('adaptive')


def _toy_model(x, t, cond):
    """A denoiser whose output depends on x, t and both conditioning leaves."""
    return (0.7 * x + 0.01 * t[:, None]
            + cond['text'].sum(-1)[:, :1] * (1.0 + cond['mask'][:, :1]))


def _conds(batch=3):
    rng = np.random.default_rng(1)
    cond = {'text': jnp.asarray(rng.standard_normal((batch, 5, 4)), jnp.float32),
            'mask': jnp.ones((batch, 5))}
    uncond = {'text': jnp.zeros((1, 5, 4)), 'mask': jnp.zeros((1, 5))}
    return cond, uncond


def test_cfg_is_one_batched_call_and_matches_two_calls():
    cond, uncond = _conds()
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 6)), jnp.float32)
    t = jnp.full((3,), 0.5)
    seen = []

    def model(x, t, c):
        seen.append((x.shape, t.shape, c['text'].shape))
        return _toy_model(x, t, c)

    got = diffusion.guided_denoise(model, x, t, cond, uncond, 4.0)
    assert seen == [((6, 6), (6,), (6, 5, 4))]
    full_uncond = jax.tree.map(lambda u: jnp.broadcast_to(u, (3,) + u.shape[1:]), uncond)
    c, u = _toy_model(x, t, cond), _toy_model(x, t, full_uncond)
    np.testing.assert_allclose(got, u + 4.0 * (c - u), rtol=1e-6)
    np.testing.assert_allclose(diffusion.guided_denoise(_toy_model, x, t, cond, uncond, 1.0),
                               c, rtol=1e-6)
    np.testing.assert_allclose(diffusion.cfg_combine(c, u, 0.0), u)


def test_guidance_scale_one_sample_equals_conditional_sample():
    cond, uncond = _conds()
    kw = dict(schedule='cosine', sampler='ddim', num_steps=8, prediction='eps')
    rng = jax.random.key(3)
    guided = diffusion.sample(_toy_model, (3, 6), rng, cond=cond, uncond=uncond,
                              guidance_scale=1.0, **kw)
    plain = diffusion.sample(_toy_model, (3, 6), rng, cond=cond, **kw)
    np.testing.assert_allclose(guided, plain, rtol=1e-5, atol=1e-5)
    strong = diffusion.sample(_toy_model, (3, 6), rng, cond=cond, uncond=uncond,
                              guidance_scale=3.0, **kw)
    assert float(jnp.abs(strong - plain).max()) > 1e-2
    with pytest.raises(ValueError, match='uncond'):
        diffusion.sample(_toy_model, (3, 6), rng, cond=cond, guidance_scale=3.0, **kw)


def test_drop_condition():
    batch = 2000
    cond = {'text': jnp.ones((batch, 3, 2)), 'mask': jnp.ones((batch, 3), bool)}
    uncond = {'text': jnp.zeros((1, 3, 2)), 'mask': jnp.zeros((1, 3), bool)}
    rng = jax.random.key(0)
    out, dropped = diffusion.drop_condition(rng, cond, uncond, 0.1)
    assert dropped.shape == (batch,) and out['mask'].dtype == jnp.bool_
    assert 0.08 < float(dropped.mean()) < 0.12
    # A dropped row is entirely the null condition, in every leaf; a kept row is untouched.
    np.testing.assert_array_equal(out['text'].max(axis=(1, 2)), ~dropped)
    np.testing.assert_array_equal(out['text'].min(axis=(1, 2)), ~dropped)
    np.testing.assert_array_equal(out['mask'].any(axis=1), ~dropped)
    none, d0 = diffusion.drop_condition(rng, cond, uncond, 0.0)
    assert not bool(d0.any()) and bool(none['mask'].all())
    all_, d1 = diffusion.drop_condition(rng, cond, uncond, 1.0)
    assert bool(d1.all()) and not bool(all_['mask'].any())
