"""Fine-tuning DeepFloyd IF stages: the hybrid (learned-variance) loss against numpy and
diffusers, LoRA adapters (merge, optimizer mask, sharding), and `python -m jaxt2i.train` on a
tiny IF stage converted from a diffusers pipeline saved in the test (`test_if_pipeline`'s),
full and LoRA, through the commands of docs/deepfloyd-if.md, each in a fresh process.
"""

import functools
import os
import re
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
scipy_special = pytest.importorskip("scipy.special")

from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402
from doc_commands import bash_block  # noqa: E402
from test_if_pipeline import DOC, _run, converted, pipelines  # noqa: E402,F401  (fixtures)

from jaxt2i import diffusion  # noqa: E402
from jaxt2i.diffusion import vlb  # noqa: E402
from jaxt2i.models import lora  # noqa: E402
from jaxt2i.models.if_unet import SIZES, IFUNet, param_shapes  # noqa: E402


# ----------------------------------------------------------------------- the hybrid loss
def _np_vlb(x0, x_t, t, eps, v, abar):
    """L_t in bits per dim from the formulas (Ho et al. 2020, Nichol & Dhariwal 2021), numpy
    float64, alpha-bar from diffusers' scheduler."""
    abar = abar.astype(np.float64)
    a_t = abar[t]
    a_prev = abar[t - 1] if t > 0 else 1.0
    beta = 1 - a_t / a_prev
    # the clipped posterior log variance: beta~_0 is replaced by beta~_1
    bt = (lambda k: (1 - abar[k] / abar[k - 1]) * (1 - abar[k - 1]) / (1 - abar[k]))
    log_bt = np.log(bt(t) if t > 0 else bt(1))
    mean = lambda x0_: (np.sqrt(a_prev) * beta / (1 - a_t) * x0_  # noqa: E731
                        + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x_t)
    x0_pred = (x_t - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    frac = (v + 1) / 2
    logvar = frac * np.log(beta) + (1 - frac) * log_bt
    if t > 0:
        m1, m2 = mean(x0), mean(x0_pred)
        kl = 0.5 * (-1 + logvar - log_bt + np.exp(log_bt - logvar)
                    + (m1 - m2) ** 2 * np.exp(-logvar))
        return kl.mean() / np.log(2), logvar
    m, std = mean(x0_pred), np.exp(0.5 * logvar)  # the decoder: Ho et al. eq. 13
    cdf = scipy_special.ndtr
    hi, lo = cdf((x0 - m + 1 / 255) / std), cdf((x0 - m - 1 / 255) / std)
    p = np.where(x0 < -0.999, hi, np.where(x0 > 0.999, 1 - lo, hi - lo))  # tail bins at the ends
    return -np.log(np.maximum(p, 1e-12)).mean() / np.log(2), logvar


@pytest.mark.parametrize("t", [0, 1, 37, 500, 999])
def test_vlb_term_matches_numpy_and_diffusers_learned_range(t):
    """L_t (KL for t > 0, the discretised decoder NLL at t = 0) against numpy; the model's
    log variance for t > 0 against diffusers' DDPMScheduler._get_variance('learned_range')."""
    rng = np.random.default_rng(t)
    shape = (1, 4, 4, 3)
    # x0 on the 256-level grid, edges included (the decoder's tail bins)
    x0 = (rng.integers(0, 256, shape) / 127.5 - 1).astype(np.float32)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range")
    abar = sched.alphas_cumprod.numpy()
    noise = rng.standard_normal(shape)
    x_t = (np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * noise).astype(np.float32)
    eps = (noise + 0.05 * rng.standard_normal(shape)).astype(np.float32)  # a model's error
    v = rng.uniform(-1, 1, shape).astype(np.float32)
    want, logvar = _np_vlb(x0, x_t, t, eps, v, abar)
    schedule = diffusion.get_schedule("discrete_squaredcos_cap_v2")
    got = vlb.vlb_term(jnp.asarray(x0), jnp.asarray(x_t), jnp.full((1,), float(t)),
                       jnp.asarray(eps), jnp.asarray(v), schedule=schedule)
    np.testing.assert_allclose(np.asarray(got)[0], want, rtol=2e-3)
    assert np.isfinite(want) and want > 0
    if t > 0:
        ref = sched._get_variance(t, torch.tensor(v), "learned_range").numpy()
        np.testing.assert_allclose(logvar, ref, rtol=1e-4)


def test_hybrid_loss_trains_the_mean_by_mse_and_the_variance_by_vlb():
    """d L_hybrid / d eps is L_simple's alone (the mean is stop-gradded in L_vlb); d / d v is
    lambda N dL_vlb/dv, and the value is L_simple + lambda N L_t."""
    schedule = diffusion.get_schedule("discrete_squaredcos_cap_v2")
    x0 = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
    out0 = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 6)) * 0.3,
                       jnp.float32)
    rng = jax.random.key(3)

    def loss(out, weight):
        return jnp.mean(vlb.hybrid_loss(lambda x_t, t, c: out, x0, None, rng,
                                        schedule=schedule, vlb_weight=weight))

    g_hybrid = jax.grad(loss)(out0, 1e-3)
    g_simple = jax.grad(loss)(out0, 0.0)
    np.testing.assert_array_equal(g_hybrid[..., :3], g_simple[..., :3])
    assert np.all(g_simple[..., 3:] == 0) and np.any(g_hybrid[..., 3:] != 0)
    assert float(loss(out0, 1e-3)) > float(loss(out0, 0.0))


# ------------------------------------------------------------------------------- LoRA
@functools.lru_cache(maxsize=None)
def _tiny_boxed():
    """Random params of the tiny IF U-Net with their logical axis names (its shapes, filled
    by numpy: compiling its init costs more than the test)."""
    cfg = SIZES["tiny"]
    rng = np.random.default_rng(0)
    return cfg, jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32),
        param_shapes(cfg)["params"])


def test_lora_merge_mask_and_shardings():
    """Adapters on the named kernels only, with the kernels' axis names; merge = W + scale A B
    (numpy); the masked optimizer holds state for the adapters alone and moves nothing else;
    on a 2-way FSDP mesh the adapters shard along their kernel's input axis."""
    import flax.linen as nn
    import optax

    from jaxt2i.checkpoint import flatten
    from jaxt2i.parallel import make_mesh
    from jaxt2i.parallel.sharding import DEFAULT_RULES
    from jaxt2i.train_state import create_train_state, state_layout

    cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("to_q", "to_out_0", "encoder_hid_proj"))
    _, boxed = _tiny_boxed()
    adapters = jax.jit(lambda k: lora.init(boxed, cfg, k))(jax.random.key(1))
    flat_a = flatten(nn.unbox(adapters))
    assert flat_a and all(re.search(r"(to_q|to_out_0|encoder_hid_proj)/lora_[ab]$", k)
                          for k in flat_a)
    base = nn.unbox(boxed)
    q = adapters["down_blocks_1"]["attentions_0"]["to_q"]
    assert q["lora_a"].names == ("embed", None) and q["lora_b"].names == (None, "heads", "kv")
    rng = np.random.default_rng(0)
    trained = jax.tree_util.tree_map(  # B is zero at init: give it values
        lambda a: rng.standard_normal(a.shape).astype(np.float32), nn.unbox(adapters))
    merged, fb = flatten(lora.merge(base, trained, cfg.scale)), flatten(base)
    changed = 0
    for name, w in fb.items():
        module = name.rsplit("/", 1)[0]
        if f"{module}/lora_a" in flatten(trained) and name.endswith("kernel"):
            a, b = (np.asarray(flatten(trained)[f"{module}/lora_{x}"], np.float64) for x in "ab")
            n_in = a.ndim - 1
            want = np.asarray(w, np.float64) + 2.0 * (
                a.reshape(-1, cfg.rank) @ b.reshape(cfg.rank, -1)).reshape(w.shape)
            np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6)
            assert w.shape[:n_in] == a.shape[:-1]
            changed += 1
        else:
            np.testing.assert_array_equal(merged[name], w, err_msg=name)
    assert changed == len(flat_a) // 2

    params = {"base": base, "lora": trained}
    tx = lora.masked(optax.adam(0.1), params)
    state = create_train_state(params, tx)
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in jax.tree.leaves(trained))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    new = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))(
        grads, state.opt_state, params)
    for a, b in zip(jax.tree.leaves(new["base"]), jax.tree.leaves(base)):
        np.testing.assert_array_equal(a, b)
    assert all(np.any(a != b) for a, b in zip(jax.tree.leaves(new["lora"]),
                                                jax.tree.leaves(trained)))

    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
    init = lambda k: {"base": boxed, "lora": lora.init(boxed, cfg, k)}  # noqa: E731
    shardings, _, _ = state_layout(init, tx, mesh, DEFAULT_RULES)
    q_sh = shardings.params["lora"]["down_blocks_1"]["attentions_0"]["to_q"]
    kernel_sh = shardings.params["base"]["down_blocks_1"]["attentions_0"]["to_q"]["kernel"]
    assert tuple(kernel_sh.spec)[:1] == tuple(q_sh["lora_a"].spec)[:1] == ("fsdp",)
    assert not any(tuple(q_sh["lora_b"].spec))  # heads -> tensor (1 device), kv, rank: whole


def test_lora_config_errors_are_one_line():
    with pytest.raises(ValueError, match=r"train.lora.targets=.*'to_x'.*allowed"):
        lora.LoraConfig.from_config({"rank": 2, "targets": "to_q,to_x"})
    with pytest.raises(ValueError, match=r"train.lora.rank=-1"):
        lora.LoraConfig.from_config({"rank": -1})
    assert lora.LoraConfig.from_config({"rank": 0}) is None
    _, boxed = _tiny_boxed()
    with pytest.raises(ValueError, match=r"\['linear_2'\] name no dense kernel") as e:
        lora.adapted(boxed["mid_block"], lora.LoraConfig(2, targets=("to_q", "linear_2")))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------- through the CLI
def _doc_commands():
    """The shell commands of docs/deepfloyd-if.md's "Fine-tune" section."""
    return [shlex.split(ln) for ln in bash_block("deepfloyd-if.md", "## Fine-tune")]


def _cli(args, devices=1):
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    r = subprocess.run([sys.executable, "-m", *args], cwd=os.path.dirname(DOC) + "/..",
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (args, r.stderr[-3000:])
    return r


def _held_out_losses(workdir, params_dirs):
    """The run's loss (hybrid, text dropout as in training) of each of `params_dirs`' params on
    held-out shapes batches, with fixed timesteps and noise: the same draws for every model
    (one Trainer and one compiled loss for all of them)."""
    import json

    import ml_collections

    from jaxt2i.checkpoint import load_exported
    from jaxt2i.data.pipeline import to_global_array
    from jaxt2i.train import loop
    from jaxt2i.train.trainer import Trainer

    with open(os.path.join(workdir, "config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    cfg.train.lora.rank = 0  # params_dir holds a whole (merged) network
    cfg.mesh.fsdp = 1
    cfg.train.batch_size = 8
    cfg.data.split = "held_out"
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    loss = jax.jit(trainer._loss)
    with loop._pipeline(trainer, cfg) as data:
        batches = [to_global_array(loop._host_batch(trainer, next(data)), trainer.mesh)
                   for _ in range(4)]
    out = []
    for params_dir in params_dirs:
        params = jax.tree_util.tree_map(jnp.asarray, load_exported(str(params_dir))[0])
        out.append(float(np.mean([loss(params, b, trainer.text_params, jax.random.key(i))
                                  for i, b in enumerate(batches)])))
    return out


@pytest.mark.slow
def test_doc_commands_fine_tune_full_and_lora(converted, tmp_path):
    """docs' fine-tuning commands, each in a fresh process, on the tiny IF stage I converted
    from diffusers (`size=tiny`: 30 steps of batch 4; the LoRA run on a 2-device FSDP mesh):
    both lower the held-out loss; the LoRA run moves only its adapters (its merged export is
    the base + scale A B, exactly, everywhere else the base); its adapters are a file of their
    own; its diffusers export loads in UNet2DConditionModel and computes what our network
    computes on the merged weights."""
    from jaxt2i.checkpoint import flatten, load_exported

    stage_dir = converted["out"] / "stage_I"
    names = {"if-cascade/stage_I": f"{stage_dir},size=tiny", "runs/if-full": tmp_path / "full",
             "runs/if-lora": tmp_path / "lora", "if-lora-diffusers": tmp_path / "diffusers"}
    commands = _doc_commands()
    assert [c[:3] for c in commands] == [["python", "-m", "jaxt2i.train"]] * 2 + [
        ["python", "-m", "jaxt2i.convert"]], commands
    for cmd in commands:
        args = cmd[2:]
        for old, new in names.items():
            args = [a.replace(old, str(new)) for a in args]
        lora_run = any("lora=" in a for a in args)
        if lora_run:
            args.append("--config.mesh.fsdp=2")
        r = _cli(args, devices=2 if lora_run else 1)
        print(r.stdout.strip().splitlines()[-1])

    base = load_exported(str(stage_dir))[0]
    before, after_full, after_lora = _held_out_losses(
        tmp_path / "full", [stage_dir, tmp_path / "full" / "export", tmp_path / "lora" / "export"])
    print(f"held-out loss: base {before:.4f}, full {after_full:.4f}, lora {after_lora:.4f}")
    assert after_full < 0.9 * before and after_lora < before

    export = tmp_path / "lora" / "export"
    adapters, cfg = lora.load_adapters(str(export / lora.ADAPTERS_FILE))
    assert cfg.rank == 8 and os.path.getsize(export / lora.ADAPTERS_FILE) < \
        os.path.getsize(export / "params.safetensors") / 4
    merged, fb, fa = flatten(load_exported(str(export))[0]), flatten(base), flatten(adapters)
    assert merged.keys() == fb.keys()
    adapted = {k.rsplit("/", 1)[0] for k in fa}
    assert any(np.any(fa[f"{m}/lora_b"] != 0) for m in adapted)  # the adapters trained
    for name, w in fb.items():
        module = name.rsplit("/", 1)[0]
        if module in adapted and name.endswith("/kernel"):
            a, b = (np.asarray(fa[f"{module}/lora_{x}"], np.float64) for x in "ab")
            want = w + cfg.scale * (a.reshape(-1, cfg.rank) @ b.reshape(cfg.rank, -1)).reshape(
                w.shape)
            np.testing.assert_allclose(merged[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
        else:  # frozen: bit for bit
            np.testing.assert_array_equal(merged[name], w, err_msg=name)

    # the checkpoint's export (its state holds the base once, the EMA of the adapters alone)
    # is the run's own: the adapters bit for bit; the merged kernels to float32 rounding (the
    # run merged W + scale A B on its 2-device mesh, this process on its own devices, and the
    # matmul's summation order may differ: seen as 3e-8 apart)
    from jaxt2i.checkpoint import export_checkpoint

    again, _ = export_checkpoint(str(tmp_path / "lora"), out_dir=str(tmp_path / "again"))
    remerged = flatten(load_exported(again)[0])
    readapters = flatten(lora.load_adapters(os.path.join(again, lora.ADAPTERS_FILE))[0])
    assert merged.keys() == remerged.keys() and fa.keys() == readapters.keys()
    for name in fa:
        np.testing.assert_array_equal(fa[name], readapters[name], err_msg=name)
    for name in merged:
        np.testing.assert_allclose(remerged[name], merged[name], rtol=1e-6, atol=1e-7,
                                   err_msg=name)

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "diffusers" / "stage_I" / "unet")
    ours = converted["cascade"].stages[0].config.model.unet
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 16, 3)).astype(np.float32)
    text = rng.standard_normal((1, 5, ours.text_dim)).astype(np.float32)
    out = jax.jit(IFUNet(ours).apply)({"params": load_exported(str(export))[0]}, x,
                                      np.array([10.0]), text)
    with torch.no_grad():
        ref = unet(torch.tensor(x).permute(0, 3, 1, 2), 10, torch.tensor(text)).sample
    np.testing.assert_allclose(np.asarray(out), ref.permute(0, 2, 3, 1).numpy(), atol=1e-4,
                               rtol=1e-4)


def test_config_and_lora_errors_are_one_line(converted):
    """configs/if.py reads the converted stage (its model, an absolute T5 path, its schedule);
    without a stage, and LoRA without train.init_from, are one-line ConfigErrors."""
    import importlib

    from jaxt2i.config import ConfigError
    from jaxt2i.train.trainer import Trainer

    get_config = importlib.import_module("configs.if").get_config
    with pytest.raises(ConfigError, match="needs the converted IF stage"):
        get_config("lora=4")
    stage_dir = converted["out"] / "stage_I"
    cfg = get_config(f"stage={stage_dir},lora=4")
    assert cfg.model_family == "if" and cfg.train.lora.rank == 4
    assert cfg.train.init_from == str(stage_dir) and os.path.isabs(cfg.text.encoder)
    assert cfg.diffusion.schedule == "discrete_squaredcos_cap_v2"
    cfg.train.init_from = ""
    with pytest.raises(ConfigError, match=r"train.lora.rank > 0 adapts a trained stage") as e:
        Trainer(cfg)
    assert "\n" not in str(e.value)


def test_lora_step_with_grad_accumulation_trains_the_adapters_alone(converted, tmp_path):
    """A LoRA step over 2 micro-batches: the loss is the micro-batches' mean, the gradient norm
    is that of the adapters' mean gradient (the frozen base has none), the base is unchanged
    bit for bit and every adapter's B moves. The state's EMA (and optimizer moments) are
    adapter-sized: the base is held once; the EMA follows the adapters; a step from the
    state saved and restored by Orbax equals the step from the state itself, bit for bit."""
    import importlib

    import optax

    from jaxt2i.data.pipeline import to_global_array
    from jaxt2i.train import loop
    from jaxt2i.train.trainer import Trainer

    stage_dir = converted["out"] / "stage_I"
    cfg = importlib.import_module("configs.if").get_config(f"stage={stage_dir},lora=4,size=tiny")
    cfg.train.batch_size, cfg.train.grad_accum = 4, 2
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    state = trainer.init_state_from(str(stage_dir), seed=0)
    with loop._pipeline(trainer, cfg) as data:
        batch = loop._host_batch(trainer, next(data))
    rng = jax.random.fold_in(jax.random.key(3), 0)
    halves = [{k: jnp.asarray(v[i * 2:(i + 1) * 2]) for k, v in batch.items()} for i in range(2)]
    grad = jax.jit(jax.value_and_grad(
        lambda adapters, params, b, r: trainer._loss({**params, "lora": adapters}, b,
                                                     trainer.text_params, r)))
    with trainer._context():
        parts = [grad(state.params["lora"], state.params, h, jax.random.fold_in(rng, i))
                 for i, h in enumerate(halves)]
    before = jax.device_get(state.params)  # the step donates the state
    new, metrics = trainer.step(state, to_global_array(batch, trainer.mesh), jax.random.key(3), 0)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean([p[0] for p in parts]), rtol=1e-5)
    mean_grad = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(mean_grad)),
                               rtol=1e-4)
    for a, b in zip(jax.tree.leaves(new.params["base"]), jax.tree.leaves(before["base"])):
        np.testing.assert_array_equal(a, b)
    flat_new = jax.tree_util.tree_leaves_with_path(new.params["lora"])
    moved = [np.any(np.asarray(a) != np.asarray(b)) for (p, a), b in
             zip(flat_new, jax.tree.leaves(before["lora"])) if "lora_b" in str(p[-1])]
    assert moved and all(moved)

    # the EMA: the adapters' tree alone, in the state and its layout; it moved towards them
    from jaxt2i.checkpoint import Checkpointer

    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    assert jax.tree.structure(new.ema_params) == jax.tree.structure(new.params["lora"])
    assert jax.tree.structure(trainer.abstract_state.ema_params) == jax.tree.structure(
        new.ema_params)
    n_lora, n_base = size(new.params["lora"]), size(new.params["base"])
    assert size(new.ema_params) == n_lora < n_base / 10
    moments = [x for x in jax.tree.leaves(new.opt_state) if np.ndim(x) > 0]
    assert size(moments) == 2 * n_lora
    d = min(cfg.train.ema_decay, 1 / 10)  # the EMA's warm-up decay at step 0
    jax.tree.map(lambda e, p, p0: np.testing.assert_allclose(e, d * p0 + (1 - d) * p, atol=1e-7),
                 new.ema_params, new.params["lora"], before["lora"])
    merged = lora.ema_tree(new.params, new.ema_params)
    assert merged["base"] is new.params["base"] and merged["lora"] is new.ema_params

    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, new, None, cfg.to_dict(), force=True)
    ckpt.wait()
    _, restored, _, _ = ckpt.restore(trainer.abstract_state, cfg.to_dict())
    ckpt.close()
    global_batch = lambda: to_global_array(batch, trainer.mesh)  # noqa: E731  (donated)
    a, _ = trainer.step(restored, global_batch(), jax.random.key(3), 1)
    b, _ = trainer.step(new, global_batch(), jax.random.key(3), 1)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_doc_command_merges_adapters_into_a_stage(converted, tmp_path):
    """docs' `python -m jaxt2i.convert --merge_lora=...` in a fresh process: every adapted
    kernel is W + scale A B (numpy, float64), everything else the base bit for bit, the text
    encoder path absolute; adapters that do not fit the stage are one error line."""
    from jaxt2i.checkpoint import flatten, load_exported
    from jaxt2i.stage import Stage

    cmd = shlex.split(re.search(r"```bash\n\s*(python -m jaxt2i.convert --merge_lora[^\n]*)",
                                open(DOC).read()).group(1))
    stage_dir = converted["out"] / "stage_I"
    base, _, _ = load_exported(str(stage_dir))
    cfg = lora.LoraConfig(rank=2, alpha=6.0, targets=("to_q", "add_v_proj", "to_out_0"))
    rng = np.random.default_rng(0)
    adapters = {}
    for path, n_in in lora.adapted(base, cfg):
        shape = lora._get(base, path)["kernel"].shape
        lora._set(adapters, path, {
            "lora_a": rng.standard_normal((*shape[:n_in], 2)).astype(np.float32),
            "lora_b": rng.standard_normal((2, *shape[n_in:])).astype(np.float32)})
    lora.save_adapters(adapters, cfg, str(tmp_path / "lora.safetensors"))
    names = {"runs/if-lora/export/lora.safetensors": tmp_path / "lora.safetensors",
             "if-cascade/stage_I": stage_dir, "stage_I-merged": tmp_path / "merged"}
    args = cmd[2:]
    for old, new in names.items():
        args = [a.replace(old, str(new)) for a in args]
    _cli(args)

    merged, config, _ = load_exported(str(tmp_path / "merged"))
    fm, fb, fa = flatten(merged), flatten(base), flatten(adapters)
    assert fm.keys() == fb.keys() and len(fa) == 2 * len(lora.adapted(base, cfg)) > 0
    for name, w in fb.items():
        module = name.rsplit("/", 1)[0]
        if f"{module}/lora_a" in fa and name.endswith("/kernel"):
            a, b = (np.asarray(fa[f"{module}/lora_{x}"], np.float64) for x in "ab")
            want = w + 3.0 * (a.reshape(-1, 2) @ b.reshape(2, -1)).reshape(w.shape)
            np.testing.assert_allclose(fm[name], want, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(fm[name], w, err_msg=name)
    assert os.path.isabs(config["text"]["encoder"])
    Stage.read(str(tmp_path / "merged"))  # a stage export that loads

    path, _ = lora.adapted(base, cfg)[0]  # one adapter one input row too wide
    a = lora._get(adapters, path)["lora_a"]
    lora._get(adapters, path)["lora_a"] = np.concatenate([a, a[:1]])
    lora.save_adapters(adapters, cfg, str(tmp_path / "bad.safetensors"))
    swap = {str(tmp_path / "lora.safetensors"): str(tmp_path / "bad.safetensors"),
            str(tmp_path / "merged"): str(tmp_path / "bad")}
    bad = [functools.reduce(lambda x, kv: x.replace(*kv), swap.items(), a) for a in args]
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", *bad], cwd=os.path.dirname(DOC) + "/..",
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2 and "does not fit the stage" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_named_if_sizes_build_from_scratch_for_aot():
    """configs/if.py:model=IF-I-XL (no weights; what the pod compile uses) has IF-I-XL's
    published parameter count (4.3B; 4,304,695,110 is what diffusers' UNet2DConditionModel
    built from IF-I-XL's published unet/config.json holds, docs/deepfloyd-if.md), IF's text
    length and thresholding; bad variants are one line."""
    import importlib

    from jaxt2i.config import ConfigError, validate
    from jaxt2i.models.registry import get_family
    from jaxt2i.stage import StageConfig

    get_config = importlib.import_module("configs.if").get_config
    cfg = get_config("model=IF-I-XL")
    validate(cfg)
    stage = StageConfig.from_dict(cfg.to_dict(), where="configs/if.py")
    assert get_family("if").count_params(stage.model) == 4_304_695_110
    assert stage.model.learned_variance and stage.model.remat and cfg.text.max_length == 77
    assert (stage.sample.thresholding, stage.sample.threshold_percentile,
            stage.sample.threshold_max_value) == ("dynamic", 95.0, 1.5)
    with pytest.raises(ConfigError, match=r"model='IF-II-L'; allowed: IF-I-M, IF-I-L, IF-I-XL"):
        get_config("model=IF-II-L")
    with pytest.raises(ConfigError, match="takes no stage= or lora="):
        get_config("model=IF-I-XL,lora=4")
