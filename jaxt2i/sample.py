"""`python -m jaxt2i.sample`: text -> images through a trained cascade.

    python -m jaxt2i.sample --prompt "a red circle above a blue square" --num_images=4 \
        --checkpoint=runs/base/export --checkpoint=runs/sr/export --steps=25,10 --out=samples

Writes `out/NNN.png` per image, a labelled `out/grid.png` and `out/sample.json` (prompts, seed,
every stage's settings), from which the same images can be made again. Per-stage flags take one
value for all stages or a comma list, one per stage. Without --checkpoint the bundled demo
cascade (jaxt2i/assets/demo_cascade) is used.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import numpy as np
from absl import flags

from jaxt2i.config import RANGES, ConfigError, check_range
from jaxt2i.workdir import check_writable

# One batch goes through every stage at once: far more images than this exhaust the memory of
# a machine (100,000 demo images had taken 26 GB when they were stopped).
MAX_BATCH = 1024
_STAGE_FLAGS = {"sampler": str, "steps": int, "guidance": float, "thresholding": str,
                "aug_level": float}


def demo_cascade_dir() -> str:
    """The bundled demo cascade directory; ConfigError if it is not installed."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_cascade")
    if not os.path.exists(os.path.join(path, "cascade.json")):
        raise ConfigError("the bundled demo cascade is not installed yet (no "
                          f"{os.path.join(path, 'cascade.json')}); pass --checkpoint=DIR")
    return path


def per_stage(name: str, value: str | None, num_stages: int) -> list:
    """'25,10' -> [25, 10]; '25' -> [25] * num_stages; None -> [None] * num_stages."""
    if value is None or value == "":
        return [None] * num_stages
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) not in (1, num_stages):
        raise ConfigError(f"--{name}={value} has {len(parts)} values; give one for all stages or "
                          f"one per stage ({num_stages})")
    try:
        vals = [_STAGE_FLAGS[name](p) for p in parts]
    except ValueError:
        raise ConfigError(f"--{name}={value}: values must be {_STAGE_FLAGS[name].__name__}") from None
    if f"sample.{name}" in RANGES:  # NaN, infinities, out-of-range levels
        for v in vals:
            check_range(f"sample.{name}", v, f"--{name}")
    return vals * num_stages if len(vals) == 1 else vals


def stage_settings(cascade, stages: int | None, overrides: dict | None) -> list:
    """Validated `--stages` + per-stage flag strings -> one `StageSettings` per stage run.

    Args:
      cascade: the loaded `Cascade`.
      stages: how many stages to run (None = all).
      overrides: {setting name: '25,10' | '25' | None}.

    Raises ConfigError (one line) for a bad stage count or value.
    """
    from jaxt2i.cascade import SETTING_NAMES

    n = len(cascade.stages) if stages is None else stages
    if not 1 <= n <= len(cascade.stages):
        raise ConfigError(f"--stages ({n}) must be between 1 and {len(cascade.stages)} (the "
                          "cascade's stages)")
    columns = {k: per_stage(k, (overrides or {}).get(k), n) for k in SETTING_NAMES}
    try:
        return cascade.settings([{k: columns[k][i] for k in SETTING_NAMES} for i in range(n)],
                                num_stages=n)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def define_text_encoder_flag() -> None:
    """Defines --text_encoder: where to load the stages' text encoder from instead."""
    flags.DEFINE_string("text_encoder", None, "Load the text encoder from this Hugging Face "
                        "directory or hub id instead of the stages' text.encoder (a checkpoint "
                        "never makes jaxt2i download; naming a hub id here does).")


def define_stage_flags(what: str = "Per-stage") -> None:
    """Defines --sampler --steps --guidance --thresholding --aug_level (comma lists per stage)."""
    for name, kind in _STAGE_FLAGS.items():
        flags.DEFINE_string(name, None, f"{what} {name} ({kind.__name__}): one value for all "
                            "stages or a comma list (default: each stage's saved config).")


def stage_flag_values() -> dict:
    """The per-stage flags' raw values, for `stage_settings`."""
    return {k: getattr(flags.FLAGS, k) for k in _STAGE_FLAGS}


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from --prompt flags and / or a file (one prompt a line, blank lines skipped)."""
    out = list(prompts or [])
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise ConfigError(f"--prompts_file {prompts_file!r} does not exist")
        try:
            with open(prompts_file, encoding="utf-8") as f:
                out += [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompts_file {prompts_file!r} is not UTF-8 text (byte "
                              f"{e.object[e.start:e.start + 1]!r} at offset {e.start}); save it "
                              "as UTF-8") from None
    if not out:
        raise ConfigError("no prompts given: pass --prompt TEXT (repeatable) or --prompts_file")
    return out


def labelled_grid(images: np.ndarray, labels: Sequence[str], path: str, cols: int | None = None,
                  min_cell: int = 128) -> None:
    """Writes [N, H, W, 3] uint8 images as a PNG grid with each label under its image."""
    from PIL import Image, ImageDraw, ImageFont

    n, h, w, _ = images.shape
    scale = max(1, -(-min_cell // w))  # nearest-neighbour upscaling of tiny images
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    chars = max(4, cw // 6)
    wrapped = ["\n".join(lab[i:i + chars] for i in range(0, max(len(lab), 1), chars))
               for lab in labels]
    text_h = 12 * max(t.count("\n") + 1 for t in wrapped) + 4
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    pad = 4
    grid = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, text) in enumerate(zip(images, wrapped)):
        r, q = divmod(i, cols)
        x0, y0 = pad + q * (cw + pad), pad + r * (ch + text_h + pad)
        grid.paste(Image.fromarray(img).resize((cw, ch), Image.NEAREST), (x0, y0))
        draw.multiline_text((x0, y0 + ch + 2), text, fill="black", font=font, spacing=2)
    grid.save(path)


def run(checkpoints: Sequence[str], prompts: Sequence[str], out: str, *, num_images: int = 1,
        seed: int = 0, stages: int | None = None, dtype: str | None = None,
        overrides: dict | None = None, progress: bool = True,
        text_encoder: str | None = None) -> dict:
    """Loads the cascade, samples `num_images` per prompt and writes PNGs, grid and JSON.

    Args:
      checkpoints: a cascade directory or one export directory per stage.
      prompts: the prompts; each is sampled `num_images` times (batch = prompts x num_images).
      out: output directory.
      num_images: images per prompt.
      seed: PRNG seed (the whole batch: same seed, prompts and settings -> same images).
      stages: how many stages to run (default: all).
      dtype: compute dtype override ('float32' | 'bfloat16').
      overrides: {setting: '25,10' or '25'} per-stage overrides (sampler, steps, guidance,
        thresholding, aug_level).
      progress: tqdm bar over the stages.
      text_encoder: load the text encoder from here (a directory or hub id) instead.

    Returns:
      the record written to out/sample.json.
    """
    from PIL import Image

    from jaxt2i.cascade import load_cascade

    if num_images < 1:
        raise ConfigError(f"--num_images ({num_images}) must be at least 1")
    if len(prompts) * num_images > MAX_BATCH:
        raise ConfigError(f"{len(prompts)} prompt(s) x --num_images={num_images} = "
                          f"{len(prompts) * num_images} images in one batch; at most {MAX_BATCH}"
                          " per run: run again with another --seed for more")
    if not 0 <= seed < 2 ** 63:
        raise ConfigError(f"--seed={seed} must be in [0, 2**63)")
    if dtype not in (None, "", "float32", "bfloat16"):
        raise ConfigError(f"--dtype={dtype!r}; allowed: float32, bfloat16")
    cascade = load_cascade(list(checkpoints), dtype=dtype or None, text_encoder=text_encoder)
    settings = stage_settings(cascade, stages, overrides)
    n = len(settings)
    cascade.check_prompts(list(prompts))
    batch = [p for p in prompts for _ in range(num_images)]
    try:
        images = cascade.sample(batch, seed, settings=settings, num_stages=n, progress=progress)
    except ValueError as e:  # a bad sampler / thresholding name, steps < 1
        raise ConfigError(str(e).splitlines()[0]) from None
    os.makedirs(out, exist_ok=True)
    files = []
    for i, (img, p) in enumerate(zip(images, batch)):
        name = f"{i:03d}.png"
        Image.fromarray(img).save(os.path.join(out, name))
        files.append({"file": name, "prompt": p, "index_in_batch": i})
    labelled_grid(images, batch, os.path.join(out, "grid.png"), cols=num_images if num_images > 1 else None)
    record = {
        "prompts": list(prompts), "num_images": num_images, "seed": seed, "batch": batch,
        "checkpoints": [s.path for s in cascade.stages[:n]],
        "steps_trained": [s.step for s in cascade.stages[:n]], "stages": n, "dtype": dtype or None,
        "settings": [dict(vars(s)) for s in settings], "images": files, "grid": "grid.png",
        "image_size": int(images.shape[1]),
    }
    with open(os.path.join(out, "sample.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record


def main(argv) -> None:
    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    prompts = read_prompts(F.prompt, F.prompts_file)
    checkpoints = F.checkpoint or [demo_cascade_dir()]
    overrides = stage_flag_values()
    check_writable(F.out, "--out")  # before the sampling work, not after it
    record = run(checkpoints, prompts, F.out, num_images=F.num_images, seed=F.seed,
                 stages=F.stages, dtype=F.dtype, overrides=overrides,
                 progress=sys.stderr.isatty() or F.progress, text_encoder=F.text_encoder)
    print(f"wrote {len(record['images'])} images, grid.png and sample.json to {F.out}", flush=True)


def _define_flags() -> None:
    flags.DEFINE_multi_string("prompt", None, "A prompt (repeatable).")
    flags.DEFINE_string("prompts_file", None, "Text file with one prompt a line.")
    flags.DEFINE_integer("num_images", 1, "Images per prompt.")
    flags.DEFINE_integer("seed", 0, "PRNG seed; same seed and settings give the same images.")
    flags.DEFINE_multi_string("checkpoint", None, "A cascade directory (cascade.json) or one "
                              "stage export directory per stage, base first (repeatable).")
    flags.DEFINE_string("out", "samples", "Output directory.")
    flags.DEFINE_integer("stages", None, "How many stages to run (1 = base only; default all).")
    flags.DEFINE_string("dtype", None, "Compute dtype of U-Nets and T5: float32 | bfloat16.")
    flags.DEFINE_boolean("progress", False, "Show the progress bar even when not on a terminal.")
    define_stage_flags()
    define_text_encoder_flag()


def cli() -> None:
    """Console-script entry point."""
    from jaxt2i.config import run_app

    _define_flags()
    run_app(main)


if __name__ == "__main__":
    cli()
