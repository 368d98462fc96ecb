"""Contrastive training of a CLIP on the shapes world: `train_clip(cfg, workdir)`.

`python -m jaxt2i.train --config=configs/clip.py:size=demo --workdir=DIR` comes here
(`cfg.kind == 'clip'`). The loss is CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3):
cross-entropy of the image->text and text->image similarity logits against the diagonal,
averaged, with the learnable temperature exp(logit_scale) clipped at 100. Like the diffusion
trainer, the state is built sharded by the logical-axis rules (`jax.eval_shape`, then a jitted
init with out_shardings), the batch is split over data x fsdp, one pure step is jitted once
with donated state, checkpoints are Orbax's (exact resume: the input pipeline's position is
saved too), and non-finite updates are skipped. Every `eval_every` steps and at the end it
reports zero-shot retrieval on held-out and test scenes (`jaxt2i.eval.retrieval`); a finished
run writes a Hugging Face CLIP directory to WORKDIR/export (`save_clip`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxt2i import paths
from jaxt2i.checkpoint import Checkpointer, host_gather
from jaxt2i.config import ConfigError, to_json, validate
from jaxt2i.monitor import MetricWriter, StopSignal
from jaxt2i.parallel import make_mesh
from jaxt2i.parallel.sharding import rules_from_config
from jaxt2i.text.clip import CLIPConfig, CLIPModel, init_clip, preprocess_images
from jaxt2i.text.clip_convert import embed_pair
from jaxt2i.train_state import (TrainState, apply_gradients, create_train_state, make_optimizer,
                                 state_layout)
from jaxt2i.workdir import WorkdirLock, check_writable

log = logging.getLogger("jaxt2i")
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the temperature exp(logit_scale) at 100
EVAL_SPLITS = ("held_out", "test")


def clip_loss(text_embeds: jax.Array, image_embeds: jax.Array,
              logit_scale: jax.Array) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE of a batch of matching (text i, image i) pairs.

    Args:
      text_embeds, image_embeds: [B, P] projected embeddings (normalised here).
      logit_scale: the log temperature; exp(logit_scale) is clipped at 100.

    Returns:
      (loss, metrics: in-batch image->text top-1 accuracy, the temperature used).
    """
    t = text_embeds.astype(jnp.float32)
    i = image_embeds.astype(jnp.float32)
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    i = i / jnp.linalg.norm(i, axis=-1, keepdims=True)
    scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))
    logits = scale * i @ t.T  # [B images, B texts]
    labels = jnp.arange(logits.shape[0])
    loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
    acc = (jnp.argmax(logits, axis=1) == labels).mean()
    return loss, {"batch_accuracy": acc, "temperature": scale}


def model_config(cfg: ml_collections.ConfigDict, tokenizer) -> CLIPConfig:
    """The CLIPConfig of `cfg.model`; text vocab_size 0 / eos_token_id -1 take the tokenizer's."""
    d = cfg.model.to_dict()
    text = dict(d["text"])
    if text.get("vocab_size", 0) <= 0:
        text["vocab_size"] = len(tokenizer)
    if text.get("eos_token_id", -1) < 0:
        text["eos_token_id"] = tokenizer.eos_token_id
    if text["vocab_size"] < len(tokenizer):
        raise ConfigError(f"model.text.vocab_size ({text['vocab_size']}) is smaller than the "
                          f"tokenizer's {len(tokenizer)} tokens; set it to 0 (the tokenizer's)")
    try:
        return CLIPConfig.from_dict({**d, "text": text})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


class ContrastiveTrainer:
    """The mesh, the sharded state and the jitted step and encoders of one CLIP run."""

    def __init__(self, cfg: ml_collections.ConfigDict, devices=None):
        from jaxt2i.text.clip_tokenizer import shapes_clip_tokenizer
        from jaxt2i.text.tokenizer import Tokenizer

        self.cfg = cfg
        hf_tok = shapes_clip_tokenizer()
        self.model_cfg = model_config(cfg, hf_tok)
        if self.model_cfg.text is None or self.model_cfg.vision is None:
            raise ConfigError("a contrastive run needs both towers (model.text and model.vision)")
        self.tokenizer = Tokenizer(hf_tok, self.model_cfg.text.max_length)
        self.model = CLIPModel(self.model_cfg)
        try:
            self.mesh = make_mesh(dict(cfg.mesh), devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if cfg.train.batch_size % ways:
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by "
                              f"the data-parallel devices (data {self.mesh.shape['data']} x "
                              f"fsdp {self.mesh.shape['fsdp']} = {ways})")
        self.rules = rules_from_config(cfg.sharding_rules)
        self.tx = make_optimizer(cfg.train)
        self.replicated = NamedSharding(self.mesh, P())
        self._build_state_shardings()
        axes = tuple(a for a in ("data", "fsdp") if self.mesh.shape[a] > 1) or None
        self.batch_sharding = NamedSharding(self.mesh, P(axes))
        batch_sh = {k: self.batch_sharding for k in ("image", "ids", "mask")}
        self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sh),
                             out_shardings=(self.state_shardings, self.replicated),
                             donate_argnums=0)
        self._embed = jax.jit(self._embeddings)

    def _init_params(self, rng):
        return init_clip(self.model_cfg, rng)

    def _build_state_shardings(self) -> None:
        self.state_shardings, self.abstract_state, self.num_params = state_layout(
            self._init_params, self.tx, self.mesh, self.rules)

    def init_state(self, seed: int) -> TrainState:
        """A fresh state, created sharded (never whole on one device)."""
        init = jax.jit(lambda k: create_train_state(nn.unbox(self._init_params(k)), self.tx),
                       out_shardings=self.state_shardings)
        with nn.logical_axis_rules(self.rules), self.mesh:
            return init(jax.random.key(seed))

    def _pixels(self, images):  # [B, S, S, 3] in [-1, 1] -> CLIP-normalised
        return preprocess_images((images + 1.0) / 2.0, self.model_cfg.vision.image_size)

    def _embeddings(self, params, ids, mask, images):
        """(text [B, P], image [B, P]) projected embeddings."""
        return embed_pair(self.model, params, ids, mask, self._pixels(images))

    def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One update. No randomness (CLIP has no dropout), so the step takes no RNG."""
        def loss_fn(params):
            text, image = self._embeddings(params, batch["ids"], batch["mask"], batch["image"])
            return clip_loss(text, image, params["logit_scale"])

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new, gnorm = apply_gradients(state, grads, loss, self.tx, self.cfg.train.ema_decay)
        clamp = lambda p: {**p, "logit_scale": jnp.clip(p["logit_scale"], 0.0, MAX_LOGIT_SCALE)}
        new = new.replace(params=clamp(new.params), ema_params=clamp(new.ema_params))
        return new, {"loss": loss, "grad_norm": gnorm, "skipped": new.skipped,
                     "total_skipped": new.total_skipped, **aux}

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with nn.logical_axis_rules(self.rules), self.mesh:
            return self._step(state, {k: batch[k] for k in ("image", "ids", "mask")})

    def evaluate(self, params, split: str) -> dict[str, float]:
        """Zero-shot retrieval among `eval.num_scenes` scenes of `split` and their captions."""
        from jaxt2i.data.shapes import ShapesSource
        from jaxt2i.eval.retrieval import retrieval_accuracy

        n = int(self.cfg.eval.num_scenes)
        src = ShapesSource(self.model_cfg.vision.image_size, n, split, self.cfg.eval.seed)
        items = [src[i] for i in range(n)]
        captions = [it["caption"] for it in items]
        images = np.stack([it["image"] for it in items]).astype(np.float32) / 127.5 - 1.0
        ids, mask = self.tokenizer(captions)
        with nn.logical_axis_rules(self.rules), self.mesh:
            text, image = self._embed(params, ids, mask, images)
        text, image = (np.asarray(host_gather(x), np.float64) for x in (text, image))
        text /= np.linalg.norm(text, axis=-1, keepdims=True)
        image /= np.linalg.norm(image, axis=-1, keepdims=True)
        return retrieval_accuracy(image @ text.T, captions)

    def to_clip(self, params):
        """The trained model as a `CLIP` (host params + the tokenizer), for `save_clip`."""
        from jaxt2i.text.clip_convert import CLIP

        return CLIP(self.model_cfg, host_gather(params), self.tokenizer)


def train_clip(cfg: ml_collections.ConfigDict, workdir: str, *, devices=None,
               progress: bool | None = None) -> dict:
    """Trains a CLIP until `cfg.train.num_steps` updates, resuming from `workdir`.

    Args:
      cfg: a configs/clip.py config.
      workdir: run directory: checkpoints/, metrics.jsonl, tensorboard/, export/.
      devices: devices of the mesh (default: all).
      progress: unused (progress is printed as lines); kept for `train`'s signature.

    Returns:
      Summary dict: final step, last loss, the final retrieval metrics per split.
    """
    del progress
    validate(cfg)
    lock = None
    if jax.process_index() == 0:
        check_writable(workdir, "--workdir", urls=True)
        lock = WorkdirLock(workdir, log=log.warning).acquire()
    try:
        return _train_locked(cfg, workdir, devices)
    finally:
        if lock is not None:
            lock.release()


def _pipeline(trainer: ContrastiveTrainer, cfg):
    from jaxt2i.data import pipeline as data_pipeline
    from jaxt2i.data.shapes import ShapesSource

    if cfg.data.source != "shapes":
        raise ConfigError(f"data.source={cfg.data.source!r}: a CLIP run trains on the shapes "
                          "world only so far; set data.source='shapes'")
    size = trainer.model_cfg.vision.image_size
    return data_pipeline.make_pipeline(
        ShapesSource(size, cfg.data.num_examples, "train", cfg.data.seed), resolution=size,
        batch_size=cfg.train.batch_size, seed=cfg.data.seed, tokenizer=trainer.tokenizer,
        worker_count=cfg.data.worker_count)


def _eval_all(trainer, params, step, writer) -> dict:
    out = {}
    for split in EVAL_SPLITS:
        m = trainer.evaluate(params, split)
        out[split] = m
        writer.scalars(step, {f"{split}/{k}": v for k, v in m.items()})
        if jax.process_index() == 0:
            print(f"step {step} retrieval {split} (N={trainer.cfg.eval.num_scenes}): "
                  f"image->text {m['image_to_text']:.3f} text->image {m['text_to_image']:.3f} "
                  f"attribute {m['attribute']:.3f} (chance {m['chance']:.3f}, attribute "
                  f"{m['attribute_chance']:.3f})", flush=True)
    return out


def _train_locked(cfg, workdir: str, devices) -> dict:
    from jaxt2i.data.pipeline import to_global_array
    from jaxt2i.text.clip_convert import save_clip
    from jaxt2i.train.loop import Cadence

    trainer = ContrastiveTrainer(cfg, devices)
    tc = cfg.train
    ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints)
    config_dict = json.loads(to_json(cfg))
    restored = ckpt.restore(trainer.abstract_state, config_dict)
    if jax.process_index() == 0:
        paths.write_text(paths.join(workdir, "config.json"), to_json(cfg))
    data = _pipeline(trainer, cfg)
    if restored is not None:
        it, state, data_state, _ = restored
        if data_state:
            data.set_state(data_state)
        log.warning("resumed from %s at step %d", ckpt.directory, it)
    else:
        it, state = 0, trainer.init_state(tc.seed)
    writer = MetricWriter(workdir)
    log.warning("training CLIP (%s): %.2fM params, mesh %s, batch %d, steps %d..%d",
                cfg.model_size, trainer.num_params / 1e6, dict(trainer.mesh.shape),
                tc.batch_size, it, tc.num_steps)
    cadence = Cadence(int(tc.num_steps), int(tc.log_every), int(tc.save_every),
                      int(tc.eval_every))
    t_last, n_since, metrics, saved_at, failed = time.perf_counter(), 0, None, None, None
    with StopSignal() as stop:
        while it < tc.num_steps:
            batch = to_global_array(next(data), trainer.mesh)
            state, metrics = trainer.step(state, batch)
            it += 1
            n_since += 1
            actions = cadence.after_step(it, stopping=bool(stop.requested))
            if "log" in actions:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if m["skipped"] >= tc.max_skipped:
                    failed = (f"stopped: {int(m['skipped'])} non-finite updates in a row "
                              f"(train.max_skipped={tc.max_skipped}); lower train.lr")
                    break
                dt = time.perf_counter() - t_last
                row = {"loss": m["loss"], "grad_norm": m["grad_norm"],
                       "batch_accuracy": m["batch_accuracy"], "temperature": m["temperature"],
                       "images_per_s": n_since * tc.batch_size / dt}
                writer.scalars(it, row)
                if jax.process_index() == 0:
                    print(f"step {it}/{tc.num_steps} loss {row['loss']:.4f} batch acc "
                          f"{row['batch_accuracy']:.3f} temperature {row['temperature']:.1f} "
                          f"{row['images_per_s']:.1f} img/s", flush=True)
                t_last, n_since = time.perf_counter(), 0
            if "stop" in actions or "save" in actions:
                ckpt.save(it, state, data.get_state(), config_dict, force="stop" in actions)
                saved_at = it
            if "stop" in actions:
                break
            if "sample" in actions and it < tc.num_steps:  # eval_every (the end evals below)
                _eval_all(trainer, state.ema_params, it, writer)
        if not failed and saved_at != it and it not in ckpt.all_steps():
            ckpt.save(it, state, data.get_state(), config_dict, force=True)
        ckpt.wait()
    results = {}
    if not failed and not stop.requested:
        results = _eval_all(trainer, state.ema_params, it, writer)
        clip = trainer.to_clip(state.ema_params)
        if jax.process_index() == 0:
            with paths.local_dir(paths.join(workdir, "export")) as export_dir:
                save_clip(clip, export_dir)
                with open(os.path.join(export_dir, "retrieval.json"), "w") as f:
                    json.dump({"step": it, "num_scenes": int(cfg.eval.num_scenes),
                               "seed": int(cfg.eval.seed), **results}, f, indent=2)
    writer.close()
    ckpt.close()
    data.close()
    if failed:
        from jaxt2i.train.loop import TrainingStopped

        raise TrainingStopped(failed)
    if jax.process_index() == 0:
        print(f"stopped by {stop.requested} at step {it}" if stop.requested
              else f"finished at step {it}: {workdir}", flush=True)
    last = float(jax.device_get(metrics)["loss"]) if metrics is not None else None
    return {"step": it, "last_loss": last, "retrieval": results}
