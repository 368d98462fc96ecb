"""Training unCLIP's diffusion prior on the shapes world: `train_prior(cfg, workdir)`.

`python -m jaxt2i.train --config=configs/prior.py:size=demo --workdir=DIR` comes here
(`cfg.kind == 'prior'`). Inside the one jitted step, the frozen CLIP (`clip.path`) encodes each
caption (token states and text embedding: the prior's inputs) and its scene (image embedding:
the target); `prior_loss` drops the caption of `diffusion.text_drop_prob` of the examples and
regresses the clean embedding (Ramesh et al. 2022, sec. 2.1). Encoding in the step costs one
CLIP forward pass per example (small beside the prior's backward pass) and keeps the scenes'
rendering, the data order and resume exactly as in every other run; a cache would have to hold
the embeddings of every scene the run draws.

The state, mesh, checkpoints and loop are the shared ones (`jaxt2i.train.harness`). At the end
(and every `train.eval_every` steps) the run samples embeddings for the captions of
`eval.num_scenes` held-out and test scenes and reports `prior_quality`; a finished run writes
WORKDIR/export, which `jaxt2i.prior_stage.load_prior` reads.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxt2i import paths
from jaxt2i.checkpoint import host_gather
from jaxt2i.config import ConfigError
from jaxt2i.models import prior as prior_lib
from jaxt2i.prior_stage import PriorStage, export_prior, load_frozen_clip
from jaxt2i.text.clip import init_clip
from jaxt2i.train.harness import ShardedTrainer, locked, run_training, shapes_pipeline
from jaxt2i.train_state import TrainState, apply_gradients

log = logging.getLogger("jaxt2i")
EVAL_SPLITS = ("held_out", "test")


def prior_quality(sampled: np.ndarray, image: np.ndarray, text: np.ndarray) -> dict[str, float]:
    """How near sampled image embeddings are to the true ones, against two baselines.

    Args:
      sampled: [N, P] the prior's embeddings for N captions.
      image: [N, P] the CLIP image embeddings of the captions' own scenes.
      text: [N, P] the captions' CLIP text embeddings.

    Returns:
      prior_cosine: mean cos(sampled_i, image_i); text_cosine: mean cos(text_i, image_i) (the
      caption's embedding used as the image's); other_image_cosine: mean cos(image_j, image_i)
      over pairs j != i (a random other scene's embedding); prior_top1 / text_top1: how often
      image_i is the nearest of the N scene embeddings to sampled_i / text_i (chance 1 / N).
    """
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    s, i, t = (unit(np.asarray(x, np.float64)) for x in (sampled, image, text))
    n = len(i)
    pairs = i @ i.T
    diag = np.arange(n)
    return {"prior_cosine": float(np.mean(np.sum(s * i, -1))),
            "text_cosine": float(np.mean(np.sum(t * i, -1))),
            "other_image_cosine": float((pairs.sum() - np.trace(pairs)) / (n * (n - 1))),
            "prior_top1": float(np.mean(np.argmax(s @ i.T, 1) == diag)),
            "text_top1": float(np.mean(np.argmax(t @ i.T, 1) == diag)),
            "chance_top1": 1.0 / n}


class PriorTrainer(ShardedTrainer):
    """The frozen CLIP, the prior, the sharded state and the jitted step of one prior run."""

    def __init__(self, cfg: ml_collections.ConfigDict, devices=None):
        self.clip = load_frozen_clip(cfg.clip.path)
        if self.clip.tokenizer is None:
            raise ConfigError(f"clip.path={cfg.clip.path!r} has no tokenizer files; a prior "
                              "run tokenizes its captions with the CLIP's own tokenizer")
        self.prior = PriorStage.from_config(cfg.to_dict(), self.clip)
        self.tokenizer = self.clip.tokenizer
        model = self.prior.model
        super().__init__(cfg, lambda rng: model.init(
            rng, **prior_lib.example_inputs(model.config, 1, 1))["params"], devices)
        clip_shapes = jax.eval_shape(lambda: init_clip(self.clip.config, jax.random.key(0)))
        self.clip_params, clip_sh = self.place_frozen(self.clip.params, clip_shapes)
        self.root_rng = jax.random.key(cfg.train.seed + 1)
        batch_sh = {k: self.batch_sharding for k in ("image", "ids", "mask")}
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, batch_sh, clip_sh, self.replicated,
                          self.replicated),
            out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)

    def clip_inputs(self, clip_params, ids, mask, images):
        """The frozen CLIP on a batch: the prior's inputs and target (no gradient).

        Args: ids, mask [B, L]; images [B, S, S, 3] in [-1, 1].
        Returns: {'text_tokens' [B, L, Dt], 'text_mask', 'text_embed' [B, P], 'image_embed'}.
        """
        states, _, text = self.clip.text_features(clip_params, ids, mask)
        image = self.clip.image_embeds(clip_params, (images + 1.0) / 2.0)
        return jax.lax.stop_gradient({"text_tokens": states.astype(jnp.float32),
                                      "text_mask": mask.astype(bool),
                                      "text_embed": text.astype(jnp.float32),
                                      "image_embed": image.astype(jnp.float32)})

    def _train_step(self, state: TrainState, batch, clip_params, root_rng, iteration):
        rng = jax.random.fold_in(root_rng, iteration)
        inputs = self.clip_inputs(clip_params, batch["ids"], batch["mask"], batch["image"])

        def loss_fn(params):
            return prior_lib.prior_loss(
                self.prior.model, {"params": params}, inputs, rng, schedule=self.prior.schedule,
                text_drop=self.cfg.diffusion.text_drop_prob,
                weighting=self.cfg.diffusion.loss_weighting)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        new, gnorm = apply_gradients(state, grads, loss, self.tx, self.cfg.train.ema_decay)
        return new, {"loss": loss, "grad_norm": gnorm, "skipped": new.skipped,
                     "total_skipped": new.total_skipped}

    def step(self, state: TrainState, batch: dict, iteration: int) -> tuple[TrainState, dict]:
        with self.context():
            return self._step(state, {k: batch[k] for k in ("image", "ids", "mask")},
                              self.clip_params, self.root_rng, jnp.asarray(iteration, jnp.int32))

    def evaluate(self, params, split: str) -> dict[str, float]:
        """`prior_quality` on the captions of `eval.num_scenes` scenes of `split`."""
        return evaluate_prior(self.prior, {"params": host_gather(params)}, self.clip, split,
                              int(self.cfg.eval.num_scenes), int(self.cfg.eval.seed))


def evaluate_prior(prior: PriorStage, params, clip, split: str, num_scenes: int,
                   seed: int = 1) -> dict[str, float]:
    """Samples the prior (its settings; key `seed`) for the captions of `num_scenes` shapes
    scenes of `split` and scores the embeddings against the scenes' own (`prior_quality`)."""
    from jaxt2i.data.shapes import ShapesSource

    src = ShapesSource(clip.config.vision.image_size, num_scenes, split, seed)
    items = [src[i] for i in range(num_scenes)]
    text = clip.encode_text([it["caption"] for it in items])
    image = clip.encode_image(np.stack([it["image"] for it in items])).embeds
    sampled = prior.generate(text.states, text.mask, text.embeds, jax.random.key(seed),
                             params=params)
    return prior_quality(*(np.asarray(x) for x in (sampled, image, text.embeds)))


def train_prior(cfg: ml_collections.ConfigDict, workdir: str, *, devices=None,
                progress: bool | None = None) -> dict:
    """Trains the prior until `cfg.train.num_steps` updates, resuming from `workdir`.

    Args:
      cfg: a configs/prior.py config.
      workdir: run directory: checkpoints/, metrics.jsonl, tensorboard/, export/.
      devices: devices of the mesh (default: all).
      progress: unused (progress is printed as lines); kept for `train`'s signature.

    Returns:
      {'step', 'last_loss', 'quality': {split: prior_quality}}.
    """
    del progress
    return locked(cfg, workdir, lambda: _train_locked(cfg, workdir, devices))


def _train_locked(cfg, workdir: str, devices) -> dict:
    trainer = PriorTrainer(cfg, devices)
    data = shapes_pipeline(cfg, trainer.clip.config.vision.image_size, trainer.tokenizer,
                           "prior")

    def evaluate(params, step, writer):
        out = {}
        for split in EVAL_SPLITS:
            m = out[split] = trainer.evaluate(params, split)
            writer.scalars(step, {f"{split}/{k}": v for k, v in m.items()})
            if jax.process_index() == 0:
                print(f"step {step} prior {split} (N={cfg.eval.num_scenes}): cosine to the "
                      f"scene's image embedding {m['prior_cosine']:.3f} (text embedding "
                      f"{m['text_cosine']:.3f}, other scene {m['other_image_cosine']:.3f}); "
                      f"top-1 {m['prior_top1']:.3f} (text {m['text_top1']:.3f}, chance "
                      f"{m['chance_top1']:.3f})", flush=True)
        return out

    def export(params, step, results):
        out = paths.join(workdir, "export")
        export_prior({"params": params}, cfg.to_dict(), trainer.prior, out, step)
        if jax.process_index() == 0:
            paths.write_text(paths.join(out, "quality.json"), json.dumps(
                {"step": step, "num_scenes": int(cfg.eval.num_scenes),
                 "seed": int(cfg.eval.seed), **results}, indent=2))

    out = run_training(cfg, workdir, trainer, data, what="diffusion prior", evaluate=evaluate,
                       export=export)
    return {"step": out["step"], "last_loss": out["last_loss"], "quality": out["results"]}
