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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxt2i import paths
from jaxt2i.checkpoint import host_gather
from jaxt2i.config import ConfigError
from jaxt2i.text.clip import CLIPConfig, CLIPModel, init_clip, preprocess_images
from jaxt2i.text.clip_convert import embed_pair
from jaxt2i.train.harness import ShardedTrainer, locked, run_training, shapes_pipeline
from jaxt2i.train_state import TrainState, apply_gradients

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


class ContrastiveTrainer(ShardedTrainer):
    """The mesh, the sharded state and the jitted step and encoders of one CLIP run."""

    def __init__(self, cfg: ml_collections.ConfigDict, devices=None):
        from jaxt2i.text.clip_tokenizer import shapes_clip_tokenizer
        from jaxt2i.text.tokenizer import Tokenizer

        hf_tok = shapes_clip_tokenizer()
        self.model_cfg = model_config(cfg, hf_tok)
        if self.model_cfg.text is None or self.model_cfg.vision is None:
            raise ConfigError("a contrastive run needs both towers (model.text and model.vision)")
        self.tokenizer = Tokenizer(hf_tok, self.model_cfg.text.max_length)
        self.model = CLIPModel(self.model_cfg)
        super().__init__(cfg, lambda rng: init_clip(self.model_cfg, rng), devices)
        batch_sh = {k: self.batch_sharding for k in ("image", "ids", "mask")}
        self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sh),
                             out_shardings=(self.state_shardings, self.replicated),
                             donate_argnums=0)
        self._embed = jax.jit(self._embeddings)

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

    def step(self, state: TrainState, batch: dict, iteration: int) -> tuple[TrainState, dict]:
        del iteration  # the step is deterministic
        with self.context():
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
        with self.context():
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
    return locked(cfg, workdir, lambda: _train_locked(cfg, workdir, devices))


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
    from jaxt2i.text.clip_convert import save_clip

    trainer = ContrastiveTrainer(cfg, devices)
    data = shapes_pipeline(cfg, trainer.model_cfg.vision.image_size, trainer.tokenizer, "CLIP")

    def export(params, step, results):
        clip = trainer.to_clip(params)
        if jax.process_index() == 0:
            with paths.local_dir(paths.join(workdir, "export")) as export_dir:  # URL: upload
                save_clip(clip, export_dir)
                with open(os.path.join(export_dir, "retrieval.json"), "w") as f:
                    json.dump({"step": step, "num_scenes": int(cfg.eval.num_scenes),
                               "seed": int(cfg.eval.seed), **results}, f, indent=2)

    out = run_training(cfg, workdir, trainer, data, what="CLIP", export=export,
                       evaluate=lambda p, step, w: _eval_all(trainer, p, step, w))
    return {"step": out["step"], "last_loss": out["last_loss"], "retrieval": out["results"]}
