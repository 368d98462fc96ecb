"""Training one stage: sharded steps equal the single-device step, exact resume, preemption."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.config import ConfigError, load_config_file
from jaxt2i.train import loop as train_module
from jaxt2i.train import Trainer, TrainingStopped, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(spec="configs/base.py:tiny", **train_overrides):
    cfg = load_config_file(os.path.join(ROOT, spec))
    for k, v in train_overrides.items():
        cfg.train[k] = v
    cfg.data.num_examples = 256
    return cfg


def _batch(trainer, seed=0):
    c = trainer.unet_cfg
    rng = np.random.default_rng(seed)
    b = trainer.cfg.train.batch_size
    batch = {"image": rng.uniform(-1, 1, (b, c.image_size, c.image_size, 3)).astype(np.float32)}
    if trainer.is_sr:
        batch["lowres"] = rng.uniform(-1, 1, (b, c.lowres_size, c.lowres_size, 3)).astype(np.float32)
    ids, mask = trainer.encoder.tokenizer(
        ["a red circle above a blue square", "two green stars", "", "a large purple cross"][:b])
    batch["ids"], batch["mask"] = ids, mask
    return batch


def _one_step(spec, mesh, devices, encoder=None, initial=None, aug_order=None):
    """One step on `mesh`; the state is created sharded by the jitted init, or, to save
    compile time, `initial` (a host copy of the reference initial state) is placed."""
    cfg = _cfg(spec)
    if aug_order:
        cfg.diffusion.aug_order = aug_order
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    trainer = Trainer(cfg, encoder, devices=devices)
    if initial is None:
        state = trainer.init_state(0)
    else:
        state = jax.device_put(initial, trainer.state_shardings)
    params0 = jax.device_get(state.params)
    batch = _batch(trainer)
    from jaxt2i.data.pipeline import to_global_array
    state, metrics = trainer.step(state, to_global_array(batch, trainer.mesh), jax.random.key(1), 0)
    return trainer, state, jax.device_get(metrics), params0


@pytest.mark.parametrize("spec,meshes,aug_order", [
    ("configs/base.py:tiny", [(1, 4, 1), (4, 1, 1), (2, 1, 2)], None),  # FSDP, data, data+tensor
    ("configs/sr.py:tiny_sr", [(1, 2, 2)], "resize_first"),  # FSDP + tensor; the default
    ("configs/sr.py:tiny_sr", [(1, 2, 2)], "augment_first"),  # as stages before the field
])
def test_sharded_steps_equal_single_device(spec, meshes, aug_order):
    ref_trainer, ref_state, ref_m, ref_p0 = _one_step(spec, (1, 1, 1), jax.devices()[:1],
                                                      aug_order=aug_order)
    assert aug_order is None or ref_trainer.stage.config.diffusion.aug_order == aug_order
    ref_params = jax.device_get(ref_state.params)
    enc = ref_trainer.encoder
    initial = jax.device_get(ref_trainer.init_state(0))
    for n, mesh in enumerate(meshes):
        # The first mesh also checks that the sharded jitted init creates the same params.
        trainer, state, m, p0 = _one_step(spec, mesh, jax.devices(), enc,
                                          None if n == 0 else initial, aug_order)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), p0, ref_p0)
        np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5, atol=1e-6)
        got = jax.device_get(state.params)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, ref_params)
        if mesh[1] > 1:  # parameters really are split along 'fsdp' where the rules say
            sharded = [leaf for leaf in jax.tree_util.tree_leaves(state.params)
                       if "fsdp" in str(leaf.sharding.spec)]
            assert sharded, "no parameter is sharded over fsdp"
            for leaf in sharded:
                dim = [i for i, a in enumerate(leaf.sharding.spec) if a == "fsdp" or
                       (isinstance(a, tuple) and "fsdp" in a)][0]
                assert leaf.addressable_shards[0].data.shape[dim] == leaf.shape[dim] // mesh[1]
            opt_leaves = [x for x in jax.tree_util.tree_leaves(state.opt_state)
                          if getattr(x, "ndim", 0) >= 2]
            assert any("fsdp" in str(x.sharding.spec) for x in opt_leaves)
        if mesh[2] > 1:
            assert any("tensor" in str(leaf.sharding.spec)
                       for leaf in jax.tree_util.tree_leaves(state.params))


def test_config_mistakes_are_clear():
    cfg = _cfg()
    cfg.train.batch_size = 6
    cfg.mesh.data = 4
    with pytest.raises(ConfigError, match=r"micro-batch size \(6 = batch_size 6 / grad_accum 1\) "
                       r"must be divisible by the data-parallel devices \(data 4 x fsdp 1 = 4\)"):
        Trainer(cfg)
    cfg = _cfg()
    cfg.model.text_dim = 64
    with pytest.raises(ConfigError, match=r"text encoder's width \(128\) differs from "
                       r"model.text_dim \(64\)"):
        Trainer(cfg, devices=jax.devices()[:1])
    cfg = _cfg()  # integer timesteps times the continuous-t scale 1000: refused
    cfg.diffusion.schedule = "discrete_linear"
    with pytest.raises(ConfigError, match=r"model.noise_scale=1000 is for continuous t.*"
                       r"--config.model.noise_scale=1"):
        Trainer(cfg, devices=jax.devices()[:1])
    cfg.model.noise_scale = 1.0
    Trainer(cfg, devices=jax.devices()[:1])


def test_grad_accumulation_matches_full_batch():
    cfg = _cfg()
    full = Trainer(cfg, devices=jax.devices()[:1])
    cfg2 = _cfg(grad_accum=2)
    acc = Trainer(cfg2, full.encoder, devices=jax.devices()[:1])
    # Same per-example noise is not drawn (micro-batches fold in their index), so compare
    # the mechanics: the accumulated loss is the mean of the two micro-batch losses.
    batch = _batch(full)
    from jaxt2i.data.pipeline import to_global_array
    s_acc, m_acc = acc.step(acc.init_state(0), to_global_array(batch, acc.mesh), jax.random.key(1), 0)
    rng = jax.random.fold_in(jax.random.key(1), 0)
    state = acc.init_state(0)
    halves = [{k: v[i * 2:(i + 1) * 2] for k, v in batch.items()} for i in range(2)]
    with acc._context():
        losses = [float(acc._loss(state.params, {k: jnp.asarray(v) for k, v in h.items()},
                                  acc.text_params, jax.random.fold_in(rng, i)))
                  for i, h in enumerate(halves)]
    np.testing.assert_allclose(float(m_acc["loss"]), np.mean(losses), rtol=1e-5)


def test_nonfinite_loss_stops_run_and_keeps_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg(num_steps=6, save_every=2, log_every=1, max_skipped=2)
    out = train(cfg, str(tmp_path / "ok"), devices=jax.devices()[:1], progress=False)
    assert out["step"] == 6
    # A NaN learning rate is refused up front (config ranges); NaN data is caught per step.
    cfg = _cfg(num_steps=12, save_every=2, log_every=1, max_skipped=2, lr=float("nan"))
    with pytest.raises(ConfigError, match=r"train.lr=nan is out of range"):
        train(cfg, str(tmp_path / "nan"), devices=jax.devices()[:1], progress=False)
    assert not (tmp_path / "nan").exists()
    cfg = _cfg(num_steps=12, save_every=2, log_every=1, max_skipped=2)
    real = train_module._host_batch

    def poisoned(trainer, local):
        out = real(trainer, local)
        return {**out, "image": np.full_like(out["image"], np.nan)}

    monkeypatch.setattr(train_module, "_host_batch", poisoned)
    with pytest.raises(TrainingStopped, match=r"2 non-finite updates in a row.*intact"):
        train(cfg, str(tmp_path / "nan"), devices=jax.devices()[:1], progress=False)


def _train_cmd(workdir, *extra):
    return [sys.executable, "-m", "jaxt2i.train", "--config=configs/base.py:tiny",
            f"--workdir={workdir}", "--config.train.num_steps=8", "--config.train.log_every=1",
            "--config.train.save_every=2", "--config.data.num_examples=256",
            "--config.mesh.data=1", *extra]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row["loss"]  # a resumed run rewrites later steps: keep the last
    return out


@pytest.mark.slow
def test_sigkill_resume_is_exact_and_sigterm_saves(tmp_path):
    ref = tmp_path / "ref"
    r = subprocess.run(_train_cmd(ref), cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    want = _losses(ref)
    assert sorted(want) == list(range(1, 9))

    # SIGKILL once the step-4 checkpoint is on disk, then resume.
    run = tmp_path / "killed"
    p = subprocess.Popen(_train_cmd(run), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    ck = run / "checkpoints" / "4" / "commit_success.txt"
    deadline = time.time() + 300
    while not ck.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.kill()
    p.wait()
    r = subprocess.run(_train_cmd(run), cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    got = _losses(run)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                               rtol=1e-6)

    # SIGTERM: checkpoint at the next step boundary, exit code 0.
    run = tmp_path / "term"
    p = subprocess.Popen(_train_cmd(run, "--config.train.num_steps=400",
                                    "--config.train.save_every=0"),
                         cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"  # created before the SIGTERM handler; its first row after
    while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    steps = [int(d) for d in os.listdir(run / "checkpoints") if d.isdigit()]
    assert steps and max(steps) < 400
    assert "stopped by SIGTERM" in out


def test_trains_from_text_cache_and_built_tfds_dataset(tmp_path):
    """The two non-default inputs: cached T5 embeddings and a built TFDS dataset."""
    from jaxt2i.data import builders, shapes
    from jaxt2i.data.text_cache import build_text_cache

    cfg = _cfg(num_steps=2, log_every=1, save_every=0)
    trainer_encoder = Trainer(cfg, devices=jax.devices()[:1]).encoder
    src = shapes.ShapesSource(cfg.model.image_size, 32, "train", seed=0)
    build_text_cache(trainer_encoder, src, str(tmp_path / "cache"))
    cfg.data.num_examples = 32
    cfg.text.cache = str(tmp_path / "cache")
    out = train(cfg, str(tmp_path / "cached"), encoder=trainer_encoder,
                devices=jax.devices()[:1], progress=False)
    assert out["step"] == 2 and np.isfinite(out["last_loss"])

    builder = builders.shapes_builder(str(tmp_path / "tfds"), cfg.model.image_size, 16, seed=3)
    builders.build(builder)
    cfg = _cfg(num_steps=2, log_every=1, save_every=0)
    cfg.data.source = str(builder.data_path)
    out = train(cfg, str(tmp_path / "tfds_run"), encoder=trainer_encoder,
                devices=jax.devices()[:1], progress=False)
    assert out["step"] == 2 and np.isfinite(out["last_loss"])


def test_cli_user_mistakes_are_one_line(tmp_path):
    for extra, expected in [
        (["--config.data.source=/no/such/dataset"], "data: source '/no/such/dataset'"),
        (["--config.text.encoder=/no/such/t5"], "text.encoder='/no/such/t5'"),
        (["--config.train.optimiser=adamw"], "unknown config field 'train.optimiser'"),
        (["--config.diffusion.schedule=cosin"], "did you mean 'cosine'"),
        (["--config.data.shapes_kinds=single=1,pair=2"], "data: scene kinds 'single=1,pair=2': "
                                                         "unknown kind 'pair'"),
        (["--config.train.keep_checkpoints=0"], "train.keep_checkpoints=0 is out of range"),
        (["--config.train.lr=nan"], "train.lr=nan is out of range"),
        (["--config.train.lr=1e30"], "train.lr=1e+30 is out of range"),
        (["--config.train.ema_decay=1.5"], "train.ema_decay=1.5 is out of range"),
    ]:
        r = subprocess.run(_train_cmd(tmp_path / "w", *extra), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
        lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith(("W", "I"))]
        assert r.returncode == 2, (extra, r.stderr[-1500:])
        assert len(lines) == 1 and expected in lines[0], (extra, r.stderr[-1500:])


def test_scene_kind_mix_is_refused_where_it_cannot_apply(tmp_path):
    """data.shapes_kinds shapes only the on-the-fly shapes world: with another source, or with
    a text cache (whose captions come from the default mix), the run stops before any data is
    read, naming the value and the fix."""
    from types import SimpleNamespace

    from jaxt2i.train.loop import _pipeline

    trainer = SimpleNamespace(unet_cfg=SimpleNamespace(image_size=16, lowres_size=0))
    cfg = _cfg()
    cfg.data.shapes_kinds = "relation=1"
    cfg.data.source = str(tmp_path)
    with pytest.raises(ConfigError, match=r"data.shapes_kinds='relation=1' applies only to "
                                          r"data.source='shapes' .*unset it"):
        _pipeline(trainer, cfg)
    cfg.data.source = "shapes"
    cfg.text.cache = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"cannot serve them; unset text.cache"):
        _pipeline(trainer, cfg)


def test_caption_language_reaches_the_shapes_source_and_is_refused_elsewhere(tmp_path):
    """data.caption_language (issue #28): the on-the-fly shapes world captions in English,
    Chinese or both; another source or a text cache (English captions) is refused in one line
    naming the value and the fix, and an unknown language by the config check."""
    from types import SimpleNamespace

    from jaxt2i.config import validate
    from jaxt2i.train.loop import _pipeline, _source

    trainer = SimpleNamespace(unet_cfg=SimpleNamespace(image_size=16, lowres_size=0))
    cfg = _cfg()
    assert cfg.data.caption_language == "en" and _source(trainer, cfg).language == "en"
    cfg.data.caption_language = "both"
    src = _source(trainer, cfg)
    assert src.language == "both" and {src.language_at(i) for i in range(20)} == {"en", "zh"}
    cfg.data.source = str(tmp_path)
    with pytest.raises(ConfigError, match=r"data.caption_language='both' applies only to "
                                          r"data.source='shapes' .*unset it$"):
        _pipeline(trainer, cfg)
    cfg.data.source = "shapes"
    cfg.text.cache = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"built from English captions.*unset text.cache$"):
        _pipeline(trainer, cfg)
    cfg.data.caption_language = "fr"
    with pytest.raises(ConfigError, match=r"data.caption_language='fr' is not allowed.*en, zh, "
                                          r"both"):
        validate(cfg)


def test_adafactor_state_shards_on_fsdp_mesh():
    """Adafactor's factored statistics have other shapes than their params: they replicate,
    moments shaped like params follow the params' sharding, and a step runs."""
    cfg = _cfg()
    cfg.train.optimizer = "adafactor"
    cfg.mesh.data, cfg.mesh.fsdp = 1, 4
    trainer = Trainer(cfg)
    state = trainer.init_state(0)
    from jaxt2i.data.pipeline import to_global_array
    state, m = trainer.step(state, to_global_array(_batch(trainer), trainer.mesh),
                            jax.random.key(1), 0)
    assert np.isfinite(float(m["loss"])) and int(state.step) == 1
    for leaf in jax.tree_util.tree_leaves(state.opt_state):
        assert len(leaf.sharding.spec) <= leaf.ndim


def test_init_from_export_fine_tunes_with_another_objective(tmp_path):
    """train.init_from: params and EMA start at an export's values, placed with this run's
    (FSDP) sharding; the optimizer starts afresh; a later resume ignores init_from; a model
    of another shape is refused in one line."""
    from jaxt2i.checkpoint import flatten, load_exported, unflatten

    src = tmp_path / "src"
    train(_cfg(num_steps=2, save_every=2, log_every=1), str(src), devices=jax.devices()[:1],
          progress=False)
    loaded, _, step = load_exported(str(src / "export"))
    assert step == 2

    cfg = _cfg(num_steps=1, save_every=1, log_every=1, init_from=str(src))
    cfg.model.objective = "v"  # e.g. fine-tune an eps model into a v-prediction model
    cfg.mesh.data, cfg.mesh.fsdp = 1, 2
    trainer = Trainer(cfg, devices=jax.devices()[:2])
    state = trainer.init_state_from(str(src), seed=5)
    want = flatten(loaded)
    for tree in (state.params, state.ema_params):
        got = flatten(jax.device_get(tree))
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    sharded = [a for a in jax.tree_util.tree_leaves(state.params)
               if not a.sharding.is_fully_replicated]
    assert sharded, "no parameter is FSDP-sharded"
    assert int(state.step) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(state.opt_state)
               if hasattr(x, "shape") and x.shape != ())  # fresh Adam moments

    run = tmp_path / "ft"
    out = train(cfg, str(run), devices=jax.devices()[:2], progress=False)
    assert out["step"] == 1 and np.isfinite(out["last_loss"])
    cfg.train.num_steps = 2
    cfg.train.init_from = str(tmp_path / "does-not-exist")  # resuming: not read
    assert train(cfg, str(run), devices=jax.devices()[:2], progress=False)["step"] == 2

    with pytest.raises(ConfigError, match=r"train.init_from: checkpoint .*missing"):
        trainer.init_state_from(str(tmp_path / "missing"), seed=0)

    wide = _cfg(num_steps=1, init_from=str(src))
    wide.model.base_channels *= 2
    with pytest.raises(ConfigError, match=r"init_from=.*shape .* but this model's is"):
        Trainer(wide, devices=jax.devices()[:1]).init_state_from(str(src), seed=0)

    # A layer added since the export (the zero-initialised text_conv): refused unless allowed,
    # then the export's params are kept and only the new ones start at their initialisation.
    grown = _cfg(num_steps=1, init_from=str(src))
    grown.model.text_conv = 3
    with pytest.raises(ConfigError, match=r"2 params missing \(first: \['text_conv/bias'\]\)"
                                          r".*init_from_allow_new=True"):
        Trainer(grown, devices=jax.devices()[:1]).init_state_from(str(src), seed=0)
    grown.train.init_from_allow_new = True
    state = Trainer(grown, devices=jax.devices()[:1]).init_state_from(str(src), seed=0)
    for tree in (state.params, state.ema_params):
        got = flatten(jax.device_get(tree))
        assert set(got) - set(want) == {"text_conv/kernel", "text_conv/bias"}
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
        assert not np.any(got["text_conv/kernel"]) and not np.any(got["text_conv/bias"])

    # A narrower text_conv kernel (3 -> 5): refused unless allowed, then centred with zero
    # outer taps, so the wider model denoises exactly as the export does.
    from jaxt2i.checkpoint import export_params

    rng = np.random.default_rng(0)
    # Every param jittered: a 2-step model's zero-initialised output layers would hide the text.
    narrow = jax.tree_util.tree_map(lambda a: np.asarray(a + rng.normal(0, 0.1, a.shape),
                                                         np.float32), jax.device_get(state.params))
    export_params(narrow, grown.to_dict(), str(tmp_path / "tc3"), step=7)
    five = _cfg(num_steps=1)
    five.model.text_conv = 5
    with pytest.raises(ConfigError, match=r"text_conv/kernel has shape \(3, .* is \(5, .*"
                                          r"init_from_allow_new=True to widen it"):
        Trainer(five, devices=jax.devices()[:1]).init_state_from(str(tmp_path / "tc3"), seed=0)
    five.train.init_from_allow_new = True
    trainer5 = Trainer(five, devices=jax.devices()[:1])
    state5 = trainer5.init_state_from(str(tmp_path / "tc3"), seed=0)
    got = flatten(jax.device_get(state5.ema_params))
    kernel = got["text_conv/kernel"]
    assert kernel.shape[0] == 5 and not np.any(kernel[[0, 4]])
    np.testing.assert_array_equal(kernel[1:4], flatten(narrow)["text_conv/kernel"])
    S = five.model.image_size
    x = rng.normal(size=(2, S, S, 3)).astype(np.float32)
    t = np.array([0.3, 0.8], np.float32)
    emb = rng.normal(size=(2, 6, 128)).astype(np.float32)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2], bool)
    model3 = Trainer(grown, devices=jax.devices()[:1]).stage.model
    want_out = model3.apply({"params": narrow}, x, t, emb, mask)
    got_out = trainer5.stage.model.apply({"params": jax.device_get(state5.params)}, x, t, emb, mask)
    tol = 1e-5 * float(np.abs(want_out).max())
    np.testing.assert_allclose(got_out, want_out, rtol=0, atol=tol)
    # Not a no-op check: without the export's kernel the output moves by more than that.
    zeroed = {**flatten(narrow), "text_conv/kernel": np.zeros_like(kernel)}
    moved = trainer5.stage.model.apply({"params": unflatten(zeroed)}, x, t, emb, mask) - want_out
    assert float(np.abs(moved).max()) > 100 * tol


def test_captions_the_bundled_encoder_cannot_read_stop_training_in_one_line(tmp_path):
    from PIL import Image

    from jaxt2i.data import builders

    root = tmp_path / "imgs"
    root.mkdir()
    for i, cap in enumerate(["一只可爱的猫", "一只可爱的狗"]):
        Image.new("RGB", (32, 32), (200, 40 * i, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(cap, encoding="utf-8")
    b = builders.image_text_builder(str(tmp_path / "tfds"), str(root))
    builders.build(b)
    cfg = _cfg(num_steps=2, log_every=1, save_every=0, batch_size=2)
    cfg.data.source = str(b.data_path)
    with pytest.raises(ConfigError, match=r"^data: .*一只可爱的.*use a real T5") as e:
        train(cfg, str(tmp_path / "run"), devices=jax.devices()[:1], progress=False)
    assert "\n" not in str(e.value)


def test_chinese_shapes_captions_train_with_the_bundled_encoder_not_an_english_only_one(
        tmp_path):
    """data.caption_language=zh: the bundled encoder reads the shapes world's Chinese (issue
    #28), so training runs; an encoder that knows only the English shapes words (the bundled
    one as it was, which older exports carry) stops at the first batch, in one line naming a
    caption and the fix."""
    from bilingual_helpers import english_only_encoder

    cfg = _cfg(num_steps=1, log_every=1, save_every=0, batch_size=2)
    cfg.data.caption_language = "zh"
    train(cfg, str(tmp_path / "run"), devices=jax.devices()[:1], progress=False)
    english_only_encoder(tmp_path / "english_only")
    cfg.text.encoder = str(tmp_path / "english_only")
    with pytest.raises(ConfigError, match=r"^data: prompt '.*' has text the tokenizer does not "
                                          r"know: .*cannot read Chinese yet.*use a real T5") as e:
        train(cfg, str(tmp_path / "run2"), devices=jax.devices()[:1], progress=False)
    assert "\n" not in str(e.value)


def test_cadence_decides_log_save_sample_and_the_end_alone():
    """The loop's schedule is data: which actions follow each step, without a model."""
    from jaxt2i.train import Cadence

    c = Cadence(num_steps=10, log_every=3, save_every=4, sample_every=5)
    due = {s: c.after_step(s) for s in range(1, 11)}
    assert [s for s, a in due.items() if "log" in a] == [3, 6, 9, 10]  # and always the last
    assert [s for s, a in due.items() if "save" in a] == [4, 8]
    assert [s for s, a in due.items() if "sample" in a] == [5, 10]
    assert c.after_step(7, stopping=True) == ("log", "stop")  # a signal: log, save, leave
    assert c.at_end(10, saved_at=8, stopped=False) == ("save", "sample", "export")
    assert c.at_end(10, saved_at=10, stopped=False) == ("sample", "export")
    assert c.at_end(7, saved_at=7, stopped=True) == ()
    assert Cadence(num_steps=10, log_every=3).after_step(4) == ()  # 0: only at the end


def test_sr_sample_grids_come_from_the_runs_own_data(tmp_path):
    """Issue #24: an SR run's sample grids upsampled shapes-world renders whatever
    data.source said; now they show the first examples of the run's own data."""
    from jaxt2i.data import builders, pipeline
    from jaxt2i.train.loop import _preview_inputs

    cfg = _cfg("configs/sr.py:tiny_sr")
    c = cfg.model
    builder = builders.shapes_builder(str(tmp_path / "tfds"), c.image_size, 8, seed=11)
    builders.build(builder)
    cfg.data.source = str(builder.data_path)
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    prompts, conditions = _preview_inputs(trainer, cfg)
    lowres = conditions["lowres"]
    src = builders.load_source(str(builder.data_path))
    n = len(cfg.train.sample_prompts)
    want = [src[i] for i in range(n)]
    assert prompts == [w["caption"].decode() if isinstance(w["caption"], bytes) else
                       str(w["caption"]) for w in want]
    assert prompts != list(cfg.train.sample_prompts)
    img = [pipeline.decode_image(w["image"]) for w in want]
    low = np.stack([pipeline.to_float(pipeline.downsample(
        pipeline.resize_crop(i, c.image_size), c.lowres_size)) for i in img])
    np.testing.assert_allclose(np.asarray(lowres), low, atol=1e-6)


@pytest.mark.parametrize("aug_order", ["resize_first", "augment_first"])
def test_crop_trained_sr_stage_gets_the_crop_of_its_upsampled_lowres(aug_order):
    """Crop training (the 1024 stage) with resize first: the host hands the step the crop of
    the whole low-res image upsampled by the U-Net's resize (what sampling's full-size
    upsample holds there, borders included); augment first keeps the low-res crop. The
    step trains on either (a couple of steps)."""
    from jaxt2i.data.pipeline import to_global_array
    from jaxt2i.models.unet import resize_lowres

    cfg = _cfg("configs/sr.py:tiny_sr", batch_size=2)
    cfg.model.crop_size = 8  # of 16 px images; low-res 8 px
    cfg.diffusion.aug_order = aug_order
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    c = trainer.unet_cfg
    batch = _batch(trainer)
    local = dict(batch, index=np.array([3, 11]))
    host = train_module._host_batch(trainer, local)
    assert host["image"].shape == (2, 8, 8, 3)
    want = trainer.abstract_batch()["lowres"].shape
    assert host["lowres"].shape == want == ((2, 8, 8, 3) if aug_order == "resize_first"
                                            else (2, 4, 4, 3))
    if aug_order == "resize_first":
        full = np.asarray(resize_lowres(jnp.asarray(batch["lowres"]), (16, 16), c.lowres_resize))
        for n, i in enumerate(local["index"]):
            y, x = np.random.default_rng([cfg.data.seed, int(i)]).integers(0, 5, 2)
            np.testing.assert_allclose(host["lowres"][n], full[n, 2 * y:2 * y + 8,
                                                               2 * x:2 * x + 8], atol=1e-6)
            np.testing.assert_array_equal(host["image"][n], batch["image"][n, 2 * y:2 * y + 8,
                                                                          2 * x:2 * x + 8])
    state = trainer.init_state(0)
    for step in range(2):
        state, metrics = trainer.step(state, to_global_array(host, trainer.mesh),
                                      jax.random.key(1), step)
        assert np.isfinite(float(jax.device_get(metrics)["loss"]))
