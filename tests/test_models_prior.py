"""Tests of the unCLIP diffusion prior: sizes, masks, sharding, loss, sampling, selection."""

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxt2i.models import prior as prior_lib
from jaxt2i.models.prior import (SIZES, DiffusionPrior, PriorConfig, count_params,
                                 example_inputs, get_prior_config, param_shapes, prior_loss,
                                 sample_prior, select_candidates)

PARAM_AXES = {None, "embed", "mlp", "heads", "kv", "norm", "text_embed", "length"}
TEXT_LEN = 6


def expected_params(c: PriorConfig) -> int:
    """The parameter count written out: blocks, input projections, positions, output."""
    w, d, dt = c.width, c.clip_dim, c.text_dim
    block = 4 * w * w + 2 * c.mlp_ratio * w * w + c.mlp_ratio * w + w + 4 * w
    inputs = (2 * dt + dt * w + w) + (d * w + w) + w + 2 * (w * w + w) + (d * w + w) + w
    return c.layers * block + inputs + (c.max_text_len + 4) * w + 2 * w + w * d + d


@pytest.fixture(scope="module")
def tiny():
    """The tiny prior, its initialised variables and random inputs (the last two text
    positions of every row are padding)."""
    config = get_prior_config("tiny")
    model = DiffusionPrior(config)
    rng = np.random.default_rng(0)
    b = 2
    inputs = {
        "x_t": jnp.asarray(rng.standard_normal((b, config.clip_dim)), jnp.float32),
        "noise_level": jnp.asarray(rng.uniform(size=(b,)), jnp.float32),
        "text_tokens": jnp.asarray(rng.standard_normal((b, TEXT_LEN, config.text_dim)),
                                   jnp.float32),
        "text_mask": jnp.arange(TEXT_LEN)[None].repeat(b, 0) < TEXT_LEN - 2,
        "text_embed": jnp.asarray(rng.standard_normal((b, config.clip_dim)), jnp.float32),
    }
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), **inputs))
    return model, variables, inputs


@pytest.fixture(scope="module")
def run(tiny):
    """Jitted forward passes (prediction, hidden states), shared by the tests."""
    model, variables, _ = tiny
    pred = jax.jit(lambda i, keep=None: model.apply(variables, **i, keep=keep))
    hidden = jax.jit(lambda i: model.apply(variables, **i, return_hidden=True))
    return pred, hidden


# ---------------------------------------------------------------- sizes and config


@pytest.mark.parametrize("name", list(SIZES))
def test_every_size_by_eval_shape_with_logical_names(name):
    config = SIZES[name]
    variables = param_shapes(config)
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= PARAM_AXES
        assert leaf.value.dtype == jnp.float32
    assert count_params(config) == expected_params(config)
    inputs = example_inputs(config, batch_size=3, text_len=5)
    out = jax.eval_shape(lambda v, i: DiffusionPrior(config).apply(v, **i), nn.unbox(variables),
                         inputs)
    assert out.shape == (3, config.clip_dim) and out.dtype == jnp.float32


def test_param_counts_of_named_sizes():
    assert count_params(SIZES["tiny"]) == 114_704
    assert 3e6 <= count_params(SIZES["demo"]) <= 6e6
    # Paper (Table 3): "1B"; 24 blocks of width 2048 alone are 1.21B.
    paper = count_params(SIZES["paper"])
    assert paper == 1_225_733_120 and abs(paper - 1e9) <= 0.25e9
    c = SIZES["paper"]
    assert (c.width, c.layers, c.heads, c.max_text_len) == (2048, 24, 32, 256)


def test_config_round_trip_and_errors_name_the_field():
    config = get_prior_config("demo", dtype="bfloat16", remat=True)
    assert PriorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"PriorConfig.width must be divisible by heads \(4\)"):
        get_prior_config("tiny", width=66)
    with pytest.raises(ValueError, match="PriorConfig.objective.*'x0'"):
        get_prior_config("tiny", objective="score")
    with pytest.raises(ValueError, match="unknown prior size 'huge'.*paper"):
        get_prior_config("huge")
    with pytest.raises(ValueError, match=r"unknown PriorConfig field.*'widht'.*width"):
        get_prior_config("tiny", widht=3)


# ---------------------------------------------------------------- shapes and masks


def test_shapes_and_input_checks(tiny, run):
    model, variables, inputs = tiny
    pred, hidden = run
    assert pred(inputs).shape == (2, model.config.clip_dim)
    assert hidden(inputs).shape == (2, TEXT_LEN + 4, model.config.width)
    long = dict(inputs, text_tokens=jnp.zeros((2, 17, 32)), text_mask=jnp.ones((2, 17), bool))
    with pytest.raises(ValueError, match="17 tokens.*at most 16"):
        model.apply(variables, **long)
    with pytest.raises(ValueError, match="x_t has width 8, this prior expects 16"):
        model.apply(variables, **dict(inputs, x_t=jnp.zeros((2, 8))))


def test_attention_is_causal_and_the_final_query_sees_everything(tiny, run):
    """Sequence: text tokens 0..L-1, text embedding L, time L+1, x_t L+2, query L+3.
    Changing one position's input leaves every earlier position's output unchanged and changes
    that position's and every later one's (up to the final query, i.e. the prediction)."""
    _, _, inputs = tiny
    pred, hidden = run
    base_h, base_p = np.asarray(hidden(inputs)), np.asarray(pred(inputs))
    L = TEXT_LEN
    bump = jax.random.normal(jax.random.key(3), inputs["text_tokens"].shape[-1:])
    changes = {  # (a constant shift of a token would vanish in its LayerNorm)
        1: dict(text_tokens=inputs["text_tokens"].at[:, 1].add(bump)),  # a real token
        L: dict(text_embed=inputs["text_embed"] * -1.0 + 0.5),
        L + 1: dict(noise_level=inputs["noise_level"] * 0.3 + 0.2),
        L + 2: dict(x_t=inputs["x_t"] + 1.0),
    }
    real = np.r_[np.arange(L - 2), np.arange(L, L + 4)]  # positions that are not padding
    for pos, change in changes.items():
        h = np.asarray(hidden(dict(inputs, **change)))
        np.testing.assert_array_equal(h[:, :pos], base_h[:, :pos], err_msg=f"position {pos}")
        later = real[real >= pos]
        diff = np.abs(h[:, later] - base_h[:, later]).max(axis=-1)  # [B, positions]
        assert np.all(diff > 1e-4), (pos, diff)
        assert np.all(np.abs(np.asarray(pred(dict(inputs, **change))) - base_p).max(-1) > 1e-4)


def test_padded_text_changes_nothing(tiny, run):
    _, _, inputs = tiny
    pred, hidden = run
    base_p, base_h = pred(inputs), hidden(inputs)
    pad = ~inputs["text_mask"][..., None]
    for value in (1e4, jnp.inf):
        padded = dict(inputs, text_tokens=jnp.where(pad, value, inputs["text_tokens"]))
        np.testing.assert_array_equal(pred(padded), base_p)
        real = np.r_[np.arange(TEXT_LEN - 2), np.arange(TEXT_LEN, TEXT_LEN + 4)]
        np.testing.assert_array_equal(np.asarray(hidden(padded))[:, real],
                                      np.asarray(base_h)[:, real])
    # More padding positions (a longer L) change nothing either: the extra tokens' positions
    # are fixed at the end of the position table.
    longer = dict(inputs, text_tokens=jnp.pad(inputs["text_tokens"], ((0, 0), (0, 5), (0, 0)),
                                              constant_values=3.0),
                  text_mask=jnp.pad(inputs["text_mask"], ((0, 0), (0, 5))))
    np.testing.assert_allclose(pred(longer), base_p, atol=1e-5)


def test_dropped_caption_ignores_tokens_and_text_embedding(tiny, run):
    _, _, inputs = tiny
    pred, _ = run
    keep = jnp.array([False, True])
    base = np.asarray(pred(inputs, keep))
    other = dict(inputs, text_tokens=inputs["text_tokens"] * 2 + 1,
                 text_embed=inputs["text_embed"] * -3.0)
    out = np.asarray(pred(other, keep))
    np.testing.assert_allclose(out[0], base[0], atol=1e-6)  # dropped: the null condition
    assert np.abs(out[1] - base[1]).max() > 1e-4  # kept: the caption matters
    np.testing.assert_allclose(np.asarray(pred(inputs))[1], base[1], atol=1e-6)


def test_remat_gives_same_outputs_and_gradients(tiny):
    model, variables, inputs = tiny

    def loss(m, v):
        return jnp.mean(m.apply(v, **inputs) ** 2)
    g = jax.jit(jax.value_and_grad(functools.partial(loss, model)))(variables)
    remat = DiffusionPrior(get_prior_config("tiny", remat=True))
    g_r = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(variables)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_sharded_fsdp_x_tensor_matches_unsharded(tiny, run):
    from jaxt2i.parallel import DEFAULT_RULES, logical_shardings, make_mesh

    if jax.device_count() < 4:
        pytest.skip("needs 4 (simulated) devices")
    model, _, inputs = tiny
    pred, _ = run
    mesh = make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    boxed = jax.jit(model.init)(jax.random.key(0, impl="rbg"), **inputs)
    shardings = logical_shardings(boxed, mesh)
    spec = shardings["params"]["block0"]["qkv"].spec
    assert tuple(spec) == (None, "fsdp", "tensor", None)  # embed -> fsdp, heads -> tensor
    assert tuple(shardings["params"]["block1"]["fc2"]["kernel"].spec) == ("tensor", "fsdp")
    params = jax.device_put(nn.unbox(boxed), shardings)
    batch = jax.tree.map(lambda x: jnp.concatenate([x, x[::-1]]), inputs)  # B = 4
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        out = jax.jit(lambda p, i: model.apply(p, **i))(params, batch)
    np.testing.assert_allclose(out, jnp.concatenate([pred(inputs), pred(inputs)[::-1]]),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- loss and sampling


def test_loss_has_gradients_for_every_parameter(tiny):
    model, variables, inputs = tiny
    batch = {"text_tokens": inputs["text_tokens"], "text_mask": inputs["text_mask"],
             "text_embed": inputs["text_embed"], "image_embed": inputs["x_t"]}
    batch = jax.tree.map(lambda x: jnp.concatenate([x] * 4), batch)  # B = 8
    # text_drop 0.5 with this key drops some captions and keeps others, so both the null
    # embedding and the caption projections get gradients.
    fn = jax.jit(jax.value_and_grad(lambda v: prior_loss(model, v, batch, jax.random.key(3),
                                                         text_drop=0.5)))
    loss, grads = fn(variables)
    assert np.isfinite(loss) and loss > 0
    flat = jax.tree_util.tree_leaves_with_path(grads)
    zero = [jax.tree_util.keystr(p) for p, g in flat if not np.any(g)]
    assert not zero, f"parameters without gradient: {zero}"


def test_select_candidates_is_numpy_argmax_dot():
    rng = np.random.default_rng(4)
    cands = rng.standard_normal((5, 3, 16)).astype(np.float32)
    text = rng.standard_normal((5, 16)).astype(np.float32)
    chosen, index = select_candidates(jnp.asarray(cands), jnp.asarray(text))
    want = np.argmax(np.einsum("bkd,bd->bk", cands, text), axis=1)
    np.testing.assert_array_equal(index, want)
    np.testing.assert_array_equal(chosen, cands[np.arange(5), want])


def test_guidance_one_equals_no_guidance_and_candidates_are_selected(tiny):
    model, variables, inputs = tiny
    args = (inputs["text_tokens"], inputs["text_mask"], inputs["text_embed"], jax.random.key(7))

    @functools.partial(jax.jit, static_argnames="cfg")
    def go(w, cfg):
        return sample_prior(model, variables, *args, guidance=w if cfg else None, steps=4,
                            num_candidates=3, return_candidates=True)
    plain, cands, index = go(None, cfg=False)
    guided, g_cands, _ = go(jnp.float32(1.0), cfg=True)  # the batched 2B path, w = 1
    np.testing.assert_allclose(guided, plain, atol=1e-5)
    np.testing.assert_allclose(g_cands, cands, atol=1e-5)
    assert not np.allclose(go(jnp.float32(3.0), cfg=True)[0], plain, atol=1e-3)
    # The candidates differ, are unit-norm, and the kept one is numpy's argmax dot product.
    assert cands.shape == (2, 3, 16) and np.abs(cands[:, 0] - cands[:, 1]).max() > 1e-3
    np.testing.assert_allclose(np.linalg.norm(cands, axis=-1), 1.0, rtol=1e-5)
    want = np.argmax(np.einsum("bkd,bd->bk", np.asarray(cands), np.asarray(inputs["text_embed"])),
                     axis=1)
    np.testing.assert_array_equal(index, want)
    np.testing.assert_array_equal(plain, np.asarray(cands)[np.arange(2), want])


# ---------------------------------------------------------------- training end to end

D_TEXT_LEN = 8


def synthetic_batch(key, n, config, mats):
    """Captions whose CLIP image embedding is a fixed function of the text embedding: text
    embedding t ~ N(0, I); tokens tanh(t B) of random length 3..8; image embedding tanh(t A)."""
    a, b = mats
    t = jax.random.normal(key, (n, config.clip_dim))
    tokens = jnp.tanh(t @ b).reshape(n, D_TEXT_LEN, config.text_dim)
    lens = jax.random.randint(jax.random.fold_in(key, 1), (n,), 3, D_TEXT_LEN + 1)
    mask = jnp.arange(D_TEXT_LEN)[None] < lens[:, None]
    return dict(text_tokens=tokens, text_mask=mask, text_embed=t, image_embed=jnp.tanh(t @ a))


def test_tiny_prior_learns_a_text_to_image_embedding_map():
    """Adam on fresh synthetic batches: the loss falls and the sampled embeddings of held-out
    captions point at their targets. Measured (this test's seeds, 150 steps of 64): loss
    ~1.1 over the first 10 steps -> ~0.14 over the last 10 (10% of captions dropped, whose
    loss stays high); sampled embeddings (DDIM, 16 steps, 2 candidates) at cosine ~0.95 with
    the targets (mean; ~0.89 the worst of 32), where the mean target direction scores ~0.18."""
    config = get_prior_config("tiny")
    model = DiffusionPrior(config)
    rs = np.random.default_rng(0)
    d, lt = config.clip_dim, D_TEXT_LEN * config.text_dim
    mats = (jnp.asarray(rs.standard_normal((d, d)) / np.sqrt(d), jnp.float32),
            jnp.asarray(rs.standard_normal((d, lt)) / np.sqrt(d), jnp.float32))
    variables = nn.unbox(jax.jit(model.init)(
        jax.random.key(0), **example_inputs(config, 1, D_TEXT_LEN)))
    tx = optax.adam(1e-3)

    @jax.jit
    def train_step(params, opt, key):
        bkey, lkey = jax.random.split(key)
        batch = synthetic_batch(bkey, 64, config, mats)
        loss, g = jax.value_and_grad(lambda p: prior_loss(model, p, batch, lkey))(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    params, opt, losses = variables, tx.init(variables), []
    start = time.time()
    for i in range(150):
        params, opt, loss = train_step(params, opt, jax.random.fold_in(jax.random.key(1), i))
        losses.append(float(loss))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"prior loss {first:.3f} -> {last:.3f} in {time.time() - start:.1f} s")
    assert last < 0.25 * first and last < 0.3, (first, last)

    test = synthetic_batch(jax.random.key(99), 32, config, mats)  # unseen captions
    sample = jax.jit(lambda p, b, k: sample_prior(model, p, b["text_tokens"], b["text_mask"],
                                                  b["text_embed"], k, steps=16))
    got = sample(params, test, jax.random.key(5))
    cos = np.sum(np.asarray(got) * np.asarray(prior_lib.unit_norm(test["image_embed"])), -1)
    print(f"sampled cosine mean {cos.mean():.3f} min {cos.min():.3f}")
    assert cos.mean() > 0.85 and cos.min() > 0.6, cos


def test_docs_snippet_runs():
    """The Python example of docs/unclip.md, on the tiny CLIP (random, with a stand-in
    tokenizer), the tiny prior and U-Net, and 4 sampler steps. Random inits take 'rbg' keys
    (XLA:CPU compiles them several times faster than threefry; the values do not matter)."""
    import pathlib
    import re

    from jaxt2i.text.clip import get_clip_config, init_clip
    from jaxt2i.text.clip_convert import CLIP

    def tokenizer(prompts, length=16):  # start, one id per word, end-of-text, padding
        ids = np.zeros((len(prompts), length), np.int32)
        for i, p in enumerate(prompts):
            words = [1 + sum(map(ord, w)) % 120 for w in p.split()][:length - 2]
            ids[i, :len(words) + 2] = [126, *words, 127]
        return ids, ids > 0

    def tiny_clip():  # random params of the right shapes, no init program to compile
        config = get_clip_config("tiny")
        rng = np.random.default_rng(0)
        shapes = nn.unbox(jax.eval_shape(lambda: init_clip(config, jax.random.key(0))))
        params = jax.tree.map(lambda x: jnp.asarray(
            0.05 * rng.standard_normal(x.shape), x.dtype), shapes)
        return CLIP(config, params, tokenizer)

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "unclip.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    for old, new in [('load_clip("/models/clip-vit-h-14")', "tiny_clip()"),
                     ('"demo"', '"tiny"'), ("steps=64", "steps=4"),
                     ("(2, 256, 256, 3)", "(2, 32, 32, 3)"),
                     ("jax.random.key(0)", "jax.random.key(0, impl='rbg')"),
                     ("jax.random.key(3)", "jax.random.key(3, impl='rbg')")]:
        assert old in code, old
        code = code.replace(old, new)
    scope = {"tiny_clip": tiny_clip}
    exec(compile(code, "docs/unclip.md", "exec"), scope)
    assert scope["z"].shape == (2, 16) and np.isfinite(scope["loss"])
    np.testing.assert_allclose(np.linalg.norm(scope["z"], axis=-1), 1.0, rtol=1e-5)
    assert scope["eps"].shape == (2, 16, 16, 3)
