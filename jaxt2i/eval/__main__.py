"""`python -m jaxt2i.eval` (console script `jaxt2i-eval`; `python -m jaxt2i.eval.shapes`
before): how well a cascade's images follow the words.

    python -m jaxt2i.eval                       # the bundled demo cascade
    python -m jaxt2i.eval --model=unclip        # the bundled unCLIP demo (prior -> decoder -> SR)
    python -m jaxt2i.eval --checkpoint=runs/base --checkpoint=runs/sr --num_prompts=200
    python -m jaxt2i.eval --aug_levels=0,0.1,0.2,0.4  # one row per SR augmentation level
    python -m jaxt2i.eval --checkpoint=runs/cascade --language=both  # English and Chinese
    python -m jaxt2i.eval --language=both --renders_only  # the detector alone, both languages

Draws prompts from the shapes world's `held_out` split (colour-shape pairs and stated
relations that never appear in training) and its `test` split (new scenes made only of seen
combinations), samples one image per prompt through the cascade, reads each image back with
the shapes detector and prints, per split, the fraction of images whose colour, shape, size,
count, relation, background and whole prompt are right, then the whole record as one JSON
line. The work is `jaxt2i.eval.evaluate.evaluate_cascade`; see its docstring for
`--reference`, `--true_lowres`, `--aug_levels`, `--language`, `--renders_only` and what
`--out` holds.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from jaxt2i.cli import (checkpoints_or_demo, define_model_flag, define_stage_flags,
                        define_text_encoder_flag, run_app, stage_flag_values, stage_settings)
from jaxt2i.config import ConfigError
from jaxt2i.data import shapes
from jaxt2i.eval.evaluate import SPLITS, evaluate_cascade, format_table
from jaxt2i.pipelines import unclip


def main(argv) -> None:
    from jaxt2i.cascade import load_cascade

    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    splits = [s.strip() for s in F.splits.split(",") if s.strip()]
    for s in splits:
        if s not in shapes.SPLITS:
            raise ConfigError(f"--splits: {s!r} is not one of {', '.join(shapes.SPLITS)}")
    if F.out:
        from jaxt2i.workdir import check_writable

        check_writable(F.out, "--out")  # before the sampling work, not after it
    checkpoints = checkpoints_or_demo(F.checkpoint, F.model)
    if len(checkpoints) == 1 and unclip.read_spec(checkpoints[0]) is not None:
        cascade = _load_unclip(checkpoints[0])
        settings = cascade.settings()
    else:
        cascade = load_cascade(checkpoints, dtype=F.dtype or None, text_encoder=F.text_encoder)
        settings = stage_settings(cascade, F.stages, stage_flag_values())
    n = len(settings)
    aug_levels = []
    for v in F.aug_levels or []:
        try:
            aug_levels.append(float(v))
        except ValueError:
            raise ConfigError(f"--aug_levels: {v!r} is not a number; pass e.g. "
                              "--aug_levels=0,0.1,0.2,0.4") from None
    try:
        res = evaluate_cascade(cascade, splits=splits, num_prompts=F.num_prompts,
                               batch_size=F.batch_size, seed=F.seed, settings=settings,
                               num_stages=n, reference=F.reference,
                               true_lowres=F.true_lowres, aug_levels=aug_levels,
                               aug_stage=F.aug_stage, out=F.out,
                               progress=sys.stderr.isatty() or F.progress,
                               language=F.language, renders_only=F.renders_only,
                               diversity=F.diversity)
    except ValueError as e:  # a bad sampler / thresholding name, steps < 1
        raise ConfigError(str(e).splitlines()[0]) from None
    languages = {"en": "", "zh": " (Chinese)", "both": " (English and Chinese)"}[F.language]
    prior = getattr(cascade, "prior", None)  # an unCLIP cascade's
    print(f"{F.num_prompts} prompts per split{languages}, {res['image_size']} px, "
          + ("true renders only (nothing sampled)" if F.renders_only else
             f"stages {n}, sampling {res['seconds']:.1f} s; settings: "
             + (f"prior {prior.settings.sampler} {prior.settings.steps} steps guidance "
                f"{prior.settings.guidance:g} candidates {prior.settings.num_candidates}; "
                if prior is not None else "")
             + "; ".join(f"{s.sampler} {s.steps} steps guidance {s.guidance:g}"
                         for s in settings)
             + (f"; stage {F.aug_stage} at aug levels {', '.join(f'{v:g}' for v in aug_levels)}"
                if aug_levels else "")))
    print(format_table(res["results"]))
    record = {"checkpoints": [s.path for s in cascade.stages[:n]],
              "steps_trained": [s.step for s in cascade.stages[:n]],
              "num_prompts": F.num_prompts, "seed": F.seed, "language": F.language,
              "renders_only": F.renders_only, "diversity": F.diversity,
              "image_size": res["image_size"],
              "settings": [dict(vars(s)) for s in settings], "results": res["results"],
              "sampling_seconds": round(res["seconds"], 2)}
    if prior is not None:
        record.update(kind="unclip", prior={"checkpoint": prior.path, "step": prior.step,
                                            "settings": dict(vars(prior.settings))})
    if aug_levels:  # settings[aug_stage].aug_level is replaced by each of these
        record.update(aug_stage=F.aug_stage, aug_levels=aug_levels)
    print(json.dumps(record), flush=True)
    if F.out:
        with open(os.path.join(F.out, "eval.json"), "w") as f:
            json.dump(record, f, indent=2)


def _load_unclip(path: str):
    """An unCLIP cascade directory, with the flags it does not take refused in one line."""
    F = flags.FLAGS
    given = sorted(k for k, v in stage_flag_values().items() if v is not None) + [
        f for f in ("stages", "dtype", "text_encoder", "true_lowres", "aug_levels")
        if getattr(F, f)]
    if given:
        raise ConfigError(f"an unCLIP cascade is evaluated whole with its saved settings so "
                          f"far; drop --{given[0]}")
    return unclip.load_unclip(path)


def _define_flags() -> None:
    flags.DEFINE_multi_string("checkpoint", None, "A cascade directory (cascade.json) or one "
                              "stage export directory per stage, base first (repeatable; "
                              "default: the bundled demo cascade).")
    flags.DEFINE_string("splits", ",".join(SPLITS), "Comma list of shapes splits to draw "
                        "prompts from: held_out (unseen combinations), test (seen ones), train.")
    flags.DEFINE_integer("num_prompts", 100, "Prompts (one image each) per split.")
    flags.DEFINE_integer("batch_size", 32, "Images per sampler call (at most --num_prompts).")
    flags.DEFINE_integer("seed", 0, "Seed of the prompts and of sampling.")
    flags.DEFINE_integer("stages", None, "Stages to run (1 = score the base stage's images).")
    flags.DEFINE_string("dtype", None, "Compute dtype: float32 | bfloat16.")
    flags.DEFINE_boolean("reference", False, "Also score the true renders of the same scenes.")
    flags.DEFINE_boolean("true_lowres", False, "Also score the SR stages fed the true renders "
                         "at the base stage's resolution, and those renders bilinear-upsampled "
                         "(with --reference: is the base or an SR stage at fault?).")
    flags.DEFINE_list("aug_levels", None, "Comma list of augmentation levels in [0, 1]: "
                      "sample the SR stage --aug_stage at each (its --aug_level replaced), one "
                      "table row per split and level; the stages before it sample once.")
    flags.DEFINE_integer("aug_stage", 1, "The SR stage --aug_levels sweeps (1 = the first).")
    flags.DEFINE_string("out", None, "Directory for per-split image grids, per-image scores "
                        "(JSONL) and eval.json.")
    flags.DEFINE_enum("language", "en", ["en", "zh", "both"], "Prompt language: en, zh "
                      "(Chinese: rows '<split> (zh)') or both (the same scenes in each, side by "
                      "side). The bundled demo reads both (its Chinese words: docs/demo.md).")
    flags.DEFINE_boolean("renders_only", False, "Sample nothing: score the true renders of the "
                         "prompts' scenes (the detector's ceiling; no text encoder involved).")
    flags.DEFINE_integer("diversity", 0, "K >= 2: also sample K - 1 more images of each "
                         "prompt and report the mean number of distinct layouts (objects and "
                         "their cells on a 3 x 3 grid, as the detector reads them) per prompt, "
                         "and the mean absolute pixel difference between a prompt's samples "
                         "(0-1).")
    flags.DEFINE_boolean("progress", False, "Show the progress bar even when not on a terminal.")
    define_stage_flags()
    define_text_encoder_flag()
    define_model_flag()


def cli() -> None:
    """Console-script entry point (`jaxt2i-eval`)."""
    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
