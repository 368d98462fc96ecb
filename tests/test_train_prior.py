"""Training unCLIP's diffusion prior (`configs/prior.py`, `jaxt2i.train.prior`) and loading its
export (`jaxt2i.prior_stage.load_prior`).

One tiny run of the documented command in a fresh process on 4 simulated devices (mesh
data 2 x fsdp 2) is shared: a run resumed from its mid-run checkpoint must retrace its losses
and export exactly; the loaded export must sample what the checkpoint's EMA params sample and
reproduce the run's reported quality; the step must feed the prior the frozen CLIP's outputs
and drop the configured fraction of captions.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.config import ConfigError, load_config_file
from jaxt2i.train.prior import prior_quality

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The command of docs/unclip.md ("Training the prior"), at tiny size.
COMMAND = ["-m", "jaxt2i.train", "--config=configs/prior.py:size=tiny"]
TINY = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.train.num_steps=6",
        "--config.train.save_every=3", "--config.eval.num_scenes=8"]


def _run(workdir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, *COMMAND, f"--workdir={workdir}", *TINY, *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prior") / "run"
    return workdir, _run(workdir)


def _tiny_config(**train):
    cfg = load_config_file(os.path.join(ROOT, "configs", "prior.py") + ":size=tiny")
    cfg.train.update(train)
    return cfg


def test_docs_show_the_command():
    with open(os.path.join(ROOT, "docs", "unclip.md")) as f:
        docs = f.read()
    assert "python -m jaxt2i.train --config=configs/prior.py:size=demo --workdir=" in docs


def test_train_writes_checkpoints_export_and_quality(run):
    workdir, out = run
    assert "finished at step 6" in out and "prior held_out (N=8): cosine" in out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    for name in ("config.json", "params.safetensors", "quality.json"):
        assert (workdir / "export" / name).exists(), name
    with open(workdir / "export" / "quality.json") as f:
        q = json.load(f)
    assert q["step"] == 6 and set(q) >= {"held_out", "test"}
    assert -1 <= q["held_out"]["prior_cosine"] <= 1 and q["held_out"]["chance_top1"] == 1 / 8
    with open(workdir / "export" / "config.json") as f:
        model = json.load(f)["config"]["model"]
    assert (model["clip_dim"], model["text_dim"], model["max_text_len"]) == (128, 128, 32)


def test_resume_is_exact(run, tmp_path):
    """Restarted from the step-3 checkpoint, the run computes the losses of steps 4-6 exactly
    as the uninterrupted one did (same batches, same noise) and exports the same weights."""
    workdir, _ = run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir / "checkpoints" / "3", resumed / "checkpoints" / "3")
    _run(resumed)
    want, got = _losses(workdir), _losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == want[step], (step, got[step], want[step])
    a = (workdir / "export" / "params.safetensors").read_bytes()
    assert a == (resumed / "export" / "params.safetensors").read_bytes()


def test_export_reloads_to_the_checkpoints_samples_and_quality(run):
    """load_prior(export) samples exactly what the step-6 checkpoint's EMA params sample, as
    one compiled reverse process, and reproduces the quality the run reported."""
    from jaxt2i.checkpoint import Checkpointer, host_gather
    from jaxt2i.prior_stage import load_prior
    from jaxt2i.train.prior import PriorTrainer, evaluate_prior

    workdir, _ = run
    prior = load_prior(str(workdir))
    assert prior.step == 6 and prior.clip_path == "bundled"
    clip = prior.load_clip()
    text = clip.encode_text(["a red circle above a blue square", "two green triangles"])
    trainer = PriorTrainer(_tiny_config())
    step, state, _, _ = Checkpointer(str(workdir)).restore(trainer.abstract_state)
    assert step == 6
    key = jax.random.key(3)
    got = prior.generate(text.states, text.mask, text.embeds, key)
    want = prior.generate(text.states, text.mask, text.embeds, key,
                          params={"params": host_gather(state.ema_params)})
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(got), axis=-1), 1.0, atol=1e-5)
    # The docs' one-liner: prompts -> CLIP text -> the same samples.
    np.testing.assert_array_equal(np.asarray(prior.embed_prompts(
        clip, ["a red circle above a blue square", "two green triangles"], key)), np.asarray(got))

    # One lax.scan holds every network evaluation: outside it, no attention runs.
    jaxpr = jax.make_jaxpr(lambda p, k: prior.sample(p, text.states, text.mask, text.embeds,
                                                     k))(prior.params, key).jaxpr
    names = [str(e.primitive) for e in jaxpr.eqns]
    assert names.count("scan") == 1, names
    assert "dot_product_attention" not in str([e for e in jaxpr.eqns if e.primitive.name !=
                                               "scan"])

    with open(workdir / "export" / "quality.json") as f:
        reported = json.load(f)["held_out"]
    again = evaluate_prior(prior, prior.params, clip, "held_out", 8, 1)
    for k, v in reported.items():
        assert again[k] == pytest.approx(v, abs=1e-5), k


def test_step_feeds_clip_outputs_and_drops_the_configured_captions(monkeypatch):
    """Inside the jitted step the prior gets the CLIP object's own token states, text and
    image embeddings of the batch, and `keep` is False for text_drop_prob of the captions."""
    from jaxt2i import diffusion
    from jaxt2i.data.shapes import ShapesSource
    from jaxt2i.train.prior import PriorTrainer

    seen = []

    def spy(denoise, x0, cond, rng, **kw):
        jax.debug.callback(lambda *a: seen.append([np.asarray(x) for x in a]), x0,
                           cond["text_tokens"], cond["text_embed"], cond["keep"])
        return jnp.zeros(x0.shape[:1])

    monkeypatch.setattr(diffusion, "diffusion_loss", spy)
    cfg = _tiny_config(batch_size=128)
    cfg.diffusion.text_drop_prob = 0.3
    trainer = PriorTrainer(cfg)
    src = ShapesSource(32, 128, "train", 0)
    items = [src[i] for i in range(128)]
    captions = [it["caption"] for it in items]
    images = np.stack([it["image"] for it in items])
    ids, mask = trainer.tokenizer(captions)
    batch = {"image": jnp.asarray(images, jnp.float32) / 127.5 - 1.0, "ids": jnp.asarray(ids),
             "mask": jnp.asarray(mask)}
    state = trainer.init_state(0)
    for it in range(2):
        state, _ = trainer.step(state, batch, it)
    jax.effects_barrier()
    assert len(seen) == 2
    x0, tokens, text_embed, keep = seen[0]
    text = trainer.clip.encode_text(captions)
    want_image = np.asarray(trainer.clip.encode_image(images).embeds)
    unit = want_image / np.linalg.norm(want_image, axis=-1, keepdims=True)
    np.testing.assert_allclose(x0, unit * np.sqrt(128), atol=2e-3)  # the prior's space
    np.testing.assert_allclose(tokens, np.asarray(text.states), atol=1e-4)
    np.testing.assert_allclose(text_embed, np.asarray(text.embeds), atol=1e-4)
    dropped = [1 - k.mean() for k in (seen[0][3], seen[1][3])]
    for d in dropped:  # 128 draws of p = 0.3: sd 0.04 (the keys are fixed: deterministic)
        assert abs(d - 0.3) < 0.12, dropped
    assert not np.array_equal(seen[0][3], seen[1][3])  # fresh draws each step


def test_prior_quality_against_hand_computed_values():
    image = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    sampled = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    text = np.array([[2.0, 0.0], [1.0, 0.0], [-1.0, 1.0]])
    q = prior_quality(sampled, image, text)
    s2 = 1 / np.sqrt(2)
    assert q["prior_cosine"] == pytest.approx((s2 + 1 - 1) / 3)
    assert q["text_cosine"] == pytest.approx((1 + 0 + s2) / 3)
    assert q["other_image_cosine"] == pytest.approx((0 + -1 + 0) * 2 / 6)
    # nearest scene: sampled -> (0: image 0 or 1 tie at s2 -> 0), (1: 1), (2: 0): 2 of 3 right
    assert q["prior_top1"] == pytest.approx(2 / 3)
    # text -> (0: 0), (1: 0), (2: image 1 or 2 tie -> 1): 1 of 3 right
    assert q["text_top1"] == pytest.approx(1 / 3) and q["chance_top1"] == pytest.approx(1 / 3)


def test_bad_config_is_one_line(tmp_path):
    from jaxt2i.prior_stage import load_prior
    from jaxt2i.train import train

    cfg = _tiny_config()
    cfg.model.clip_dim = 64
    with pytest.raises(ConfigError, match=r"model.clip_dim=64 does not fit the CLIP"):
        train(cfg, str(tmp_path / "w"))
    cfg = _tiny_config()
    cfg.kind = "gan"
    with pytest.raises(ConfigError, match="kind='gan'"):
        train(cfg, str(tmp_path / "w"))
    with pytest.raises(ConfigError, match="is not a prior export"):
        load_prior(str(tmp_path))
