"""Sampling a cascade into a directory: PNGs, a labelled grid and a JSON record.

`sample_to_dir` is what `python -m jaxt2i.sample` runs; the same images come from the same
prompts, seed and settings.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from jaxt2i.config import ConfigError

# One batch goes through every stage at once: far more images than this exhaust the memory of
# a machine (100,000 demo images had taken 26 GB when they were stopped).
MAX_BATCH = 1024


def sample_to_dir(checkpoints: Sequence[str], prompts: Sequence[str], out: str, *,
                  num_images: int = 1, seed: int = 0, stages: int | None = None,
                  dtype: str | None = None, overrides: dict | None = None, progress: bool = True,
                  text_encoder: str | None = None, negative_prompts: Sequence[str] = (),
                  init_images: Sequence[str] = (), masks: Sequence[str] = (),
                  strength: str | None = None, start_stage: int = 0,
                  lowres: Sequence[str] = ()) -> dict:
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
        thresholding, aug_level, spacing, churn: the fields of `StageSettings`).
      progress: tqdm bar over the stages.
      text_encoder: load the text encoder from here (a directory or hub id) instead.
      negative_prompts: one for all prompts or one per prompt (replaces the empty prompt of
        guidance's unconditional branch).
      init_images: image files, one for all images or one per image (prompts x num_images):
        image-to-image with `strength`, inpainting with `masks`.
      masks: image files like `init_images`; white = generate, black = keep the init image.
      strength: image-to-image strength in (0, 1], one for all stages or a comma list per
        stage ('0.6,1'); 1 = from noise.
      start_stage: the first stage to run; with k > 0 the `lowres` images stand in for stage
        k - 1's output (super-resolve, or with `init_images` edit, given low-res images).
      lowres: image files for start_stage > 0, one for all images or one per image, resized
        to stage start_stage - 1's size.

    Returns:
      the record written to out/sample.json.
    """
    from PIL import Image

    from jaxt2i.cascade import load_cascade
    from jaxt2i.cli import per_stage_floats, stage_settings
    from jaxt2i.images import labelled_grid, read_images

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
    negatives = None
    if negative_prompts:
        negative_prompts = list(negative_prompts)
        if len(negative_prompts) not in (1, len(prompts)):
            raise ConfigError(f"{len(negative_prompts)} --negative_prompt values for "
                              f"{len(prompts)} prompts; give one for all or one per prompt")
        negatives = ([n_ for n_ in negative_prompts for _ in range(num_images)]
                     if len(negative_prompts) > 1 else negative_prompts * len(batch))
    given = {}
    if start_stage or lowres:
        if not 0 < start_stage < n:
            raise ConfigError(f"--start_stage={start_stage} must be between 1 and {n - 1} (the "
                              f"{n} stage(s) run) to start at a super-resolution stage")
        if not lowres:
            raise ConfigError(f"--start_stage={start_stage} needs --lowres PATH: the images "
                              f"that stand in for stage {start_stage - 1}'s output")
        given = {"start_stage": start_stage, "lowres": read_images(
            lowres, len(batch), cascade.stages[start_stage - 1].unet_cfg.image_size,
            what="--lowres")}
    strengths = None
    if strength not in (None, ""):
        strengths = per_stage_floats("--strength", strength, n)
    edit = {}
    if init_images or masks or strengths:
        if not init_images:
            raise ConfigError("--mask and --strength need --init_image PATH")
        size = cascade.stages[n - 1].unet_cfg.image_size
        edit["init_images"] = read_images(init_images, len(batch), size, what="--init_image")
        if masks:
            edit["masks"] = read_images(masks, len(batch), size, what="--mask", mask=True)
        if strengths is None and not masks:
            raise ConfigError("--init_image needs --strength S (image-to-image) or --mask PATH "
                              "(inpainting)")
        edit["strength"] = strengths
    try:
        images = cascade.sample(batch, seed, settings=settings, num_stages=n, progress=progress,
                                negative_prompts=negatives, **edit, **given)
    except ValueError as e:  # a bad sampler / thresholding name, steps < 1
        raise ConfigError(str(e).splitlines()[0]) from None
    from jaxt2i import paths

    with paths.local_dir(out) as folder:  # a URL --out: written here, then uploaded
        os.makedirs(folder, exist_ok=True)
        files = []
        for i, (img, p) in enumerate(zip(images, batch)):
            name = f"{i:03d}.png"
            Image.fromarray(img).save(os.path.join(folder, name))
            files.append({"file": name, "prompt": p, "index_in_batch": i})
        labelled_grid(images, batch, os.path.join(folder, "grid.png"),
                      cols=num_images if num_images > 1 else None)
        record = {
            "prompts": list(prompts), "num_images": num_images, "seed": seed, "batch": batch,
            "checkpoints": [s.path for s in cascade.stages[:n]],
            "steps_trained": [s.step for s in cascade.stages[:n]], "stages": n,
            "dtype": dtype or None,
            "settings": [dict(vars(s)) for s in settings], "images": files, "grid": "grid.png",
            "negative_prompts": list(negative_prompts or []), "init_images": list(init_images),
            "masks": list(masks), "strength": strengths, "start_stage": start_stage,
            "lowres": list(lowres),
            "image_size": int(images.shape[1]),
        }
        with open(os.path.join(folder, "sample.json"), "w") as f:
            json.dump(record, f, indent=2)
    return record
