"""`python -m jaxt2i.train.align_text`: teach a trained cascade a second language through its
text encoder, with the cascade frozen.

    python -m jaxt2i.assets --out=runs/zh_encoder             # the encoder with Chinese words
    python -m jaxt2i.train.align_text --text_encoder=runs/zh_encoder --out=runs/zh_aligned

The encoder's new words (the rows of its token embedding from config.json's
`jaxt2i_learned_rows_from` on: the shapes world's Chinese words in the bundled encoder) are
the only thing trained. For a scene of the shapes world captioned in English and in Chinese
(the same scene and the same stated attributes, `shapes.caption`), each stage of the cascade
denoises the same noisy image twice: conditioned on the English caption (the teacher: what the
cascade was trained on, held fixed) and on the Chinese one (the student); the loss is the mean
squared difference of the two predictions. The U-Nets, the encoder's layers and every English
row stay as they are, so English prompts are encoded, and sampled, bit for bit as before.

`--layers_lr=LR` (> 0) also trains the encoder's layers (attention, feed-forward, norms;
the English rows stay frozen), at that peak learning rate: word order and function words that
new rows alone cannot absorb. English prompts then no longer encode bit for bit; a second term,
`--keep_english` times the mean squared change of the English captions' encodings (relative to
their mean square under the starting encoder), holds them where they were.

`--out` is a Hugging Face encoder directory (`--text_encoder=` of `jaxt2i.sample` and
`jaxt2i.eval`), rewritten every `--save_every` steps with `align_state.npz` (the rows, the
optimizer's state and the step): running the same command again resumes from it. Its
config.json records the run (`jaxt2i_learned_rows`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxt2i.config import ConfigError

STATE_FILE = "align_state.npz"


def caption_pairs(rng: np.random.Generator, n: int, kinds=None, split: str = "train"):
    """`n` shapes-world scenes, each with its English and its Chinese caption (the two drawn
    from the same generator state, so they state the same attributes)."""
    from jaxt2i.data import shapes

    scenes, en, zh = [], [], []
    for _ in range(n):
        scene = shapes.sample_scene(rng, split, kinds)
        state = rng.bit_generator.state
        en.append(shapes.caption(scene, rng, "en"))
        rng.bit_generator.state = state
        zh.append(shapes.caption(scene, rng, "zh"))
        scenes.append(scene)
    return scenes, en, zh


def _trained_with(stage) -> tuple[dict, float]:
    """The scene kinds (data.shapes_kinds) and largest augmentation level
    (diffusion.aug_max_level) the stage was last trained with, from its export's config."""
    from jaxt2i.checkpoint import read_export_config
    from jaxt2i.data import shapes

    raw, _ = read_export_config(stage.path)
    return (shapes.parse_kinds(raw.get("data", {}).get("shapes_kinds") or None),
            float(raw.get("diffusion", {}).get("aug_max_level", 0.5)))


class Aligner:
    """The alignment loss and step over a cascade's stages (see the module docstring)."""

    def __init__(self, cascade, first_row: int, lr: float, steps: int, warmup: int = 50,
                 stages: tuple[int, ...] = (0,), layers_lr: float = 0.0,
                 keep_english: float = 1.0, reference_layers: dict | None = None):
        self.cascade, self.encoder = cascade, cascade.encoder
        self.stages = [cascade.stages[k] for k in stages]
        table = np.asarray(jax.device_get(self.encoder.params["token_embedding"]))
        used = len(self.encoder.tokenizer.hf)
        if not 0 < first_row < used:
            raise ConfigError(f"--first_row={first_row}: the encoder's tokenizer has {used} "
                              "tokens; name the first id of the new language's words")
        self.first, self.used = int(first_row), used
        self.frozen_text = {k: v for k, v in self.encoder.params.items()
                            if k != "token_embedding"}
        self.head, self.tail = table[:first_row], table[used:]
        self.rows0 = table[first_row:used]
        self.aug_max = {id(s): _trained_with(s)[1] for s in self.stages}
        self.layers_lr, self.keep_english = float(layers_lr), float(keep_english)
        # the English encodings' reference: the layers the run started from
        self.reference_layers = reference_layers or self.frozen_text

        def adam(peak):
            return optax.adam(optax.warmup_cosine_decay_schedule(
                0.0, peak, min(warmup, max(steps // 10, 1)), max(steps, 2), peak * 0.05))

        self.tx = adam(lr)
        if self.layers_lr > 0:
            self.tx = optax.multi_transform(
                {"rows": adam(lr), "layers": adam(self.layers_lr)},
                {"rows": "rows", "layers": jax.tree_util.tree_map(lambda _: "layers",
                                                                  self.frozen_text)})
        self.step_fn = jax.jit(self._step)

    def initial(self) -> dict:
        """The trained parameters at the start: the new rows (and the layers)."""
        out = {"rows": jnp.asarray(self.rows0)}
        if self.layers_lr > 0:
            out["layers"] = jax.tree_util.tree_map(jnp.asarray, self.frozen_text)
        return out

    def text_params(self, trained):
        return {**trained.get("layers", self.frozen_text), "token_embedding": jnp.concatenate(
            [self.head, trained["rows"], self.tail]).astype(self.head.dtype)}

    def _keep_english_loss(self, text, ids, mask):
        """Mean squared change of the English encodings, relative to their mean square."""
        stage = self.stages[0]
        reference = {**self.reference_layers, "token_embedding": text["token_embedding"]}
        ref, m = stage.encode_text(jax.lax.stop_gradient(reference), ids, mask)
        new, _ = stage.encode_text(text, ids, mask)
        w = m[..., None].astype(jnp.float32)
        return (jnp.sum(w * jnp.square(new - jax.lax.stop_gradient(ref)))
                / jnp.sum(w * jnp.square(jax.lax.stop_gradient(ref))))

    def _stage_loss(self, stage, params, text, images, lowres, ids_en, ids_zh, rng):
        emb_en, mask_en = stage.encode_text(text, *ids_en)
        emb_zh, mask_zh = stage.encode_text(text, *ids_zh)
        t_rng, n_rng, a_rng = jax.random.split(rng, 3)
        schedule = stage.schedule
        t = schedule.sample_t(t_rng, (images.shape[0],))
        alpha, sigma, _ = schedule.point(t)
        from jaxt2i.diffusion import noising

        x_t = noising.add_noise(images, jax.random.normal(n_rng, images.shape), alpha, sigma)
        extra = {}
        if stage.is_sr:
            low, level = stage.augment(a_rng, lowres, max_level=self.aug_max[id(stage)])
            extra = {"lowres": low, "aug_level": level}
        model_t = schedule.model_t(t)
        teacher = stage.denoise(params, x_t, model_t, {"text_emb": jax.lax.stop_gradient(
            emb_en), "text_mask": mask_en, **extra})
        student = stage.denoise(params, x_t, model_t,
                                {"text_emb": emb_zh, "text_mask": mask_zh, **extra})
        return jnp.mean(jnp.square(student - jax.lax.stop_gradient(teacher)))

    def _loss(self, trained, stage_params, batch, rng):
        text = self.text_params(trained)
        losses = []
        for k, stage in enumerate(self.stages):
            losses.append(self._stage_loss(
                stage, stage_params[k], text, batch["images"][k], batch["lowres"][k],
                (batch["ids_en"], batch["mask_en"]), (batch["ids_zh"], batch["mask_zh"]),
                jax.random.fold_in(rng, k)))
        total = jnp.sum(jnp.stack(losses))
        if self.layers_lr > 0:
            keep = self._keep_english_loss(text, batch["ids_en"], batch["mask_en"])
            total = total + self.keep_english * keep
            losses.append(keep)
        return total, jnp.stack(losses)

    def _step(self, trained, opt_state, stage_params, batch, rng):
        (_, losses), grad = jax.value_and_grad(self._loss, has_aux=True)(
            trained, stage_params, batch, rng)
        updates, opt_state = self.tx.update(grad, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, losses

    def batch(self, rng: np.random.Generator, size: int, kinds) -> dict:
        from jaxt2i.data import shapes

        scenes, en, zh = caption_pairs(rng, size, kinds)
        tok = self.encoder.tokenizer
        (ids_en, mask_en), (ids_zh, mask_zh) = tok(en), tok(zh)
        images, lowres = [], []
        for stage in self.stages:
            m = stage.config.model
            images.append(np.stack([shapes.render(s, m.image_size) for s in scenes])
                          .astype(np.float32) / 127.5 - 1)
            lowres.append(np.stack([shapes.render(s, m.lowres_size) for s in scenes])
                          .astype(np.float32) / 127.5 - 1 if m.is_sr else np.zeros((size,)))
        return {"images": images, "lowres": lowres, "ids_en": ids_en, "mask_en": mask_en,
                "ids_zh": ids_zh, "mask_zh": mask_zh}


def _save(out: str, encoder, trained, opt_state, step: int, first: int, record: dict) -> None:
    """Writes the encoder with the learned rows (and layers) and the resumable state
    (atomically)."""
    from jaxt2i.assets import mark_learned_rows
    from jaxt2i.text import TextEncoder, save_encoder

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rows = np.asarray(trained["rows"])
    table = np.asarray(jax.device_get(encoder.params["token_embedding"])).copy()
    table[first:first + rows.shape[0]] = rows
    layers = jax.device_get(trained.get("layers", {}))
    save_encoder(TextEncoder(encoder.config, {**encoder.params, **layers,
                                              "token_embedding": table}, encoder.tokenizer), tmp)
    mark_learned_rows(tmp, first, record)
    leaves = jax.tree_util.tree_leaves(opt_state)
    np.savez(os.path.join(tmp, STATE_FILE), rows=rows, step=step,
             **{f"opt_{i}": np.asarray(x) for i, x in enumerate(leaves)})
    old = out.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def align(*, out: str, checkpoint: list[str] | None, text_encoder: str | None, steps: int,
          batch_size: int, lr: float, seed: int, first_row: int | None, log_every: int,
          save_every: int, stages: tuple[int, ...] = (1,), layers_lr: float = 0.0,
          keep_english: float = 1.0) -> dict:
    """Runs the alignment (see the module docstring); returns the run's record."""
    from jaxt2i.assets import LEARNED_ROWS_KEY, demo_cascade_dir
    from jaxt2i.cascade import load_cascade
    from jaxt2i.text import load_encoder

    if steps < 1 or batch_size < 1:
        raise ConfigError(f"--steps={steps} and --batch_size={batch_size} must be at least 1")
    if not lr > 0:
        raise ConfigError(f"--lr={lr} must be positive, e.g. --lr=0.02")
    if layers_lr < 0 or keep_english < 0:
        raise ConfigError(f"--layers_lr={layers_lr} and --keep_english={keep_english} must not "
                          "be negative (--layers_lr=0 trains the rows alone)")
    resume = os.path.exists(os.path.join(out, STATE_FILE))
    if not resume and os.path.exists(out) and os.listdir(out):
        raise ConfigError(f"--out={out} exists and holds no {STATE_FILE} to resume from; "
                          "choose a new directory")
    if not resume and text_encoder is None:
        raise ConfigError("--text_encoder is required: the encoder with the new words' rows, "
                          "e.g. one written by `python -m jaxt2i.assets --out=DIR`")
    src = out if resume else text_encoder
    try:
        encoder = load_encoder(src)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"text encoder {src!r}: {e}") from None
    with open(os.path.join(src, "config.json")) as f:
        hf_cfg = json.load(f)
    if first_row is None:
        first_row = hf_cfg.get(LEARNED_ROWS_KEY)
        if first_row is None:
            raise ConfigError(f"{src}/config.json names no {LEARNED_ROWS_KEY}; pass --first_row"
                              "=ID, the first token id of the new language's words")
    paths = checkpoint or [demo_cascade_dir()]
    cascade = load_cascade(paths if len(paths) > 1 else paths[0], encoder=encoder)
    n = len(cascade.stages)
    bad = [k for k in stages if not 1 <= k <= n]
    if bad or not stages:
        raise ConfigError(f"--stages={','.join(map(str, stages))}: the cascade has stages 1..{n}")
    stages = tuple(sorted(set(k - 1 for k in stages)))
    reference = None
    if resume:
        before = hf_cfg.get("jaxt2i_learned_rows", {})
        if float(before.get("layers_lr", 0.0)) != layers_lr:
            raise ConfigError(f"--layers_lr={layers_lr}: {out} was started with --layers_lr="
                              f"{before.get('layers_lr', 0.0)}; resume it with that value")
        if layers_lr > 0:  # the English encodings' reference: the encoder the run started from
            try:
                start_encoder = load_encoder(before["text_encoder"])
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"{out} resumes against the encoder it started from, "
                                  f"{before['text_encoder']!r}, which cannot be read ({e}); "
                                  "restore it there") from None
            reference = {k: v for k, v in start_encoder.params.items() if k != "token_embedding"}
    aligner = Aligner(cascade, first_row, lr, steps, stages=stages, layers_lr=layers_lr,
                      keep_english=keep_english, reference_layers=reference)
    trained = aligner.initial()
    opt_state, start = aligner.tx.init(trained), 0
    if resume:
        saved = np.load(os.path.join(out, STATE_FILE))
        start = int(saved["step"])
        trained["rows"] = jnp.asarray(saved["rows"])  # the layers: the saved encoder's
        treedef = jax.tree_util.tree_structure(opt_state)
        opt_state = jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(saved[f"opt_{i}"]) for i in range(treedef.num_leaves)])
        print(f"resuming {out} at step {start} of {steps}", flush=True)
    stage_params = [s.params for s in aligner.stages]
    kinds = _trained_with(cascade.stages[0])[0]
    record = {"command": "python -m jaxt2i.train.align_text " + " ".join(sys.argv[1:]),
              "cascade": [os.path.abspath(p) for p in paths], "first_row": int(first_row),
              "rows": int(aligner.used - first_row), "batch_size": batch_size, "lr": lr,
              "seed": seed, "steps": steps, "stages": [k + 1 for k in stages],
              "layers_lr": layers_lr, "keep_english": keep_english,
              "text_encoder": os.path.abspath(text_encoder) if text_encoder else None,
              "losses": []}
    if resume:
        record["text_encoder"] = hf_cfg.get("jaxt2i_learned_rows", {}).get("text_encoder")
    if resume and "jaxt2i_learned_rows" in hf_cfg:
        record["losses"] = hf_cfg["jaxt2i_learned_rows"].get("losses", [])
    what = " and the encoder's layers" if layers_lr > 0 else ""
    print(f"aligning {record['rows']} token rows (ids {first_row}..{aligner.used - 1}){what} "
          f"through {len(aligner.stages)} frozen stage(s), batch {batch_size}, {steps} steps",
          flush=True)
    t0, done, run = time.time(), start, []
    for step in range(start, steps):
        batch = aligner.batch(np.random.default_rng([seed, step]), batch_size, kinds)
        trained, opt_state, losses = aligner.step_fn(
            trained, opt_state, stage_params, batch, jax.random.fold_in(jax.random.key(seed), step))
        run.append(np.asarray(losses))
        done = step + 1
        if done % log_every == 0 or done == steps:
            mean = np.mean(run, axis=0)
            run = []
            rate = (done - start) / (time.time() - t0)
            record["losses"].append([done] + [round(float(x), 6) for x in mean])
            names = [f"stage{k + 1}" for k in stages] + ["keep_english"] * (layers_lr > 0)
            print(f"step {done}/{steps}: loss " + " ".join(
                f"{name}={x:.5f}" for name, x in zip(names, mean))
                + f"; {rate:.2f} steps/s, ETA {(steps - done) / rate / 60:.1f} min", flush=True)
            if not np.all(np.isfinite(mean)):
                raise ConfigError(f"the loss is not finite at step {done}; lower --lr={lr}")
        if done % save_every == 0 or done == steps:
            record["step"] = done
            _save(out, encoder, trained, opt_state, done, first_row, record)
    record["seconds"] = round(time.time() - t0, 1)
    print(f"wrote {out} (step {done}): --text_encoder={out} samples and evaluates with it",
          flush=True)
    return record


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("out", None, "Directory of the aligned encoder (resumed if it holds "
                        f"{STATE_FILE}).")
    flags.DEFINE_multi_string("checkpoint", None, "The frozen cascade: a cascade directory or "
                              "one export per stage (default: the bundled demo cascade).")
    flags.DEFINE_string("text_encoder", None, "The encoder whose new rows are learned (an "
                        "encoder directory, e.g. from `python -m jaxt2i.assets --out=DIR`).")
    flags.DEFINE_integer("first_row", None, "First token id of the new words (default: "
                         "config.json's jaxt2i_learned_rows_from).")
    flags.DEFINE_list("stages", ["1"], "Stages (1 = the base) whose predictions are matched; "
                      "the SR stages lean little on the text and cost most per step.")
    flags.DEFINE_integer("steps", 1500, "Optimizer steps.")
    flags.DEFINE_integer("batch_size", 32, "Caption pairs per step.")
    flags.DEFINE_float("lr", 0.02, "Adam's peak learning rate (warmup, then cosine to 5%).")
    flags.DEFINE_float("layers_lr", 0.0, "Also train the encoder's layers at this peak "
                       "learning rate (0: the new rows alone; English then encodes bit for bit).")
    flags.DEFINE_float("keep_english", 1.0, "With --layers_lr: weight of the English captions' "
                       "relative encoding change in the loss.")
    flags.DEFINE_integer("seed", 0, "Seed of the scenes and the noise.")
    flags.DEFINE_integer("log_every", 50, "Steps per progress line.")
    flags.DEFINE_integer("save_every", 250, "Steps per save of --out.")
    flags.mark_flag_as_required("out")


def main(argv) -> None:
    from absl import flags

    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    align(out=F.out, checkpoint=F.checkpoint, text_encoder=F.text_encoder, steps=F.steps,
          batch_size=F.batch_size, lr=F.lr, seed=F.seed, first_row=F.first_row,
          log_every=max(F.log_every, 1), save_every=max(F.save_every, 1),
          stages=tuple(_stage_numbers(F.stages)), layers_lr=F.layers_lr,
          keep_english=F.keep_english)


def _stage_numbers(values) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ConfigError(f"--stages={','.join(values)}: give stage numbers, e.g. --stages=1 "
                          "or --stages=1,2") from None


def cli() -> None:
    from jaxt2i.cli import run_app

    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
