"""How well a cascade's images follow the words: `evaluate_cascade`, which
`python -m jaxt2i.eval` runs.

Draws prompts from the shapes world's `held_out` split (colour-shape pairs and stated
relations that never appear in training) and its `test` split (new scenes made only of seen
combinations), samples one image per prompt through the cascade, reads each image back with
the shapes detector (`jaxt2i.eval.detector`) and reports, per split, the fraction of images
whose colour, shape, size, count, relation, background and whole prompt are right. The same
arguments and seed give the same prompts and images. `reference` also scores the true renders
of the same scenes at the same resolution: the detector's ceiling, normally 100%.
`true_lowres` also feeds the SR stages the true renders at the base's resolution, and scores
those renders merely upsampled (bilinear), so a cascade's errors split between its base, its
SR stages and what the base's resolution can show. `aug_levels` sweeps one SR stage's
noise-conditioning augmentation level, as the Imagen paper's ablation did (it reported FID
and CLIP score per level; here the detector's scores): one row per split and level, the
stages before it sampled once. With `out`, per-image scores (what was found, in `found`) and
grids are written per split. `language` prompts the same scenes in English, Chinese or both
(rows '<split> (zh)' beside '<split>'); `renders_only` scores the true renders alone, without
sampling or a text encoder.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

import numpy as np
from PIL import Image

from jaxt2i.config import ConfigError
from jaxt2i.data import shapes
from jaxt2i.eval import detector

SPLITS = ("held_out", "test")
_SHOWN = ("colour", "shape", "size", "count", "relation", "background", "whole")
_PROMPT_SEED = 7_000_003  # prompt scenes: disjoint from the training stream's seeds


LANGUAGES = ("en", "zh", "both")  # --language


def eval_prompts(split: str, num: int, seed: int = 0,
                 language: str = "en") -> list[tuple[dict, str]]:
    """`num` (scene, caption) pairs of `split`, deterministic in (split, seed).

    `language` 'en' or 'zh' captions the same scenes in English or Chinese; the two captions
    of a scene state the same attributes (sizes, background), so their scores compare.
    """
    if split not in shapes.SPLITS:
        raise ConfigError(f"--splits: {split!r} is not one of {shapes.SPLITS}")
    if language not in shapes.LANGUAGES:
        raise ConfigError(f"--language: {language!r} is not one of {shapes.LANGUAGES}")
    out = []
    for i in range(num):
        rng = np.random.default_rng([_PROMPT_SEED, seed, shapes.SPLITS.index(split), i])
        scene = shapes.sample_scene(rng, split)
        out.append((scene, shapes.caption(scene, rng, language)))
    return out


def row_name(split: str, language: str = "en", what: str = "") -> str:
    """A results row: 'held_out', 'held_out (zh)', 'held_out (true renders)', 'held_out (zh,
    true renders)'; English rows are named as before Chinese prompts existed."""
    notes = [n for n in ("zh" if language == "zh" else "", what) if n]
    return split + (f" ({', '.join(notes)})" if notes else "")


def format_table(results: dict) -> str:
    """{row name: aggregate dict} -> a fixed-width table of percentages."""
    w = max([22] + [len(name) + 1 for name in results])
    layouts = any("layouts" in agg for agg in results.values())  # --diversity
    head = (f"{'split':<{w}}" + "".join(f"{k:>11}" for k in _SHOWN) + f"{'n':>6}"
            + (f"{'layouts':>12}{'pixel dist':>12}" if layouts else ""))
    lines = [head, "-" * len(head)]
    for name, agg in results.items():
        cells = "".join(f"{'-':>11}" if agg[k] is None else f"{100 * agg[k]:>10.1f}%"
                        for k in _SHOWN)
        div = (f"{agg['layouts']:>7.2f} of {agg['n_layouts']}"
               f"{agg['pixel_distance']:>12.3f}" if "layouts" in agg else
               f"{'-':>12}{'-':>12}") if layouts else ""
        lines.append(f"{name:<{w}}{cells}{agg['n']:>6}{div}")
    return "\n".join(lines)


def distinct_layouts(samples: Sequence[Sequence[np.ndarray]]) -> float:
    """Mean over prompts of how many distinct layouts (`detector.layout`) a prompt's samples
    have: `samples[i]` are prompt i's K images (1 = every sample alike, K = all different)."""
    return float(np.mean([len({detector.layout(im) for im in imgs}) for imgs in samples]))


def pixel_distance(samples: Sequence[Sequence[np.ndarray]]) -> float:
    """Mean over prompts of the mean absolute pixel difference between every two of a prompt's
    samples (`samples[i]` are prompt i's K images, uint8), as a fraction of full scale: 0 =
    identical samples. Finer than `distinct_layouts`, which counts any moved object as a new
    layout: this also says how far the samples are apart."""
    per_prompt = []
    for imgs in samples:
        x = np.stack([np.asarray(im, np.float32) / 255.0 for im in imgs])
        pairs = [np.abs(x[a] - x[b]).mean()
                 for a in range(len(x)) for b in range(a + 1, len(x))]
        per_prompt.append(np.mean(pairs))
    return float(np.mean(per_prompt))


def _scored(images, prompts) -> list[dict]:
    """Per-image `detector.score` dicts, each with its prompt."""
    return [dict(detector.score(im, p), prompt=p) for im, p in zip(images, prompts)]


def evaluate_cascade(cascade, *, splits: Sequence[str] = SPLITS, num_prompts: int = 100,
                     batch_size: int = 32, seed: int = 0, settings=None,
                     num_stages: int | None = None, reference: bool = False,
                     true_lowres: bool = False, aug_levels: Sequence[float] | None = None,
                     aug_stage: int = 1, out: str | None = None, progress: bool = True,
                     language: str = "en", renders_only: bool = False,
                     diversity: int = 0) -> dict:
    """Samples and scores `num_prompts` prompts of each split.

    Args:
      cascade: a loaded `jaxt2i.cascade.Cascade`.
      splits: shapes splits to draw prompts from ('held_out', 'test', 'train').
      num_prompts: prompts (= images) per split.
      batch_size: images per sampler call, at most `num_prompts` (fewer prompts than a batch
        sample no padding); the last batch is padded so nothing recompiles.
      seed: prompt and sampling seed (batch b of split s samples with seed + 1000 * s + b).
      settings: per-stage `StageSettings` (default: each stage's saved config).
      num_stages: stages to run (default: all).
      reference: also score the true renders of the same scenes (the detector's ceiling).
      true_lowres: also run the stages after the base fed the true renders at the base
        stage's resolution instead of its samples (row '<split> (SR of true N px)'): with
        `reference`, this splits a cascade's errors between its base and its SR stages. Row
        '<split> (true N px, bilinear)' scores the same renders merely upsampled: what an SR
        stage that only interpolates would score (below it, the SR stages lose information).
      aug_levels: sample stage `aug_stage` at each of these augmentation levels (rows
        '<split> (aug L)', per_image and `out` files '<split>_augL') instead of once at its
        settings' level; the stages before it run once per batch and feed every level, and
        each level's images are those a plain run at that level gives.
      aug_stage: the SR stage `aug_levels` applies to (default 1, the first).
      out: if given, write each split's images as a grid PNG plus per-image scores JSONL there
        (with `true_lowres`, also '<split>_sr_true.png' / '.jsonl').
      progress: tqdm bar over batches.
      language: prompts in 'en' (English), 'zh' (Chinese: rows '<split> (zh)', per_image and
        `out` files '<split>_zh') or 'both': the same scenes prompted in each language and
        sampled with the same seeds, side by side. Every prompt is checked against the text
        encoder before any sampling (the bundled demo's reads no Chinese: one-line error).
      renders_only: sample nothing; score only the true renders of the prompts' scenes at the
        size of the last stage to run (rows '<split> (true renders)'): the detector's ceiling
        in each language, with no text encoder involved.
      diversity: K >= 2: also sample K - 1 more images of every prompt (sampling seeds offset
        by 100000 * j, j = 1 .. K - 1) and add to each row 'layouts', the mean number of
        distinct layouts (`distinct_layouts`) among the prompt's K images (the scored one
        first), 'n_layouts' = K, and 'pixel_distance', their mean pairwise absolute pixel
        difference (`pixel_distance`). The scores stay those of the first image.

    Returns:
      {'results': {row: aggregate}, 'per_image': {split: [score dicts with 'prompt']},
       'seconds': sampling wall time, 'image_size': px}; with `true_lowres`, per_image also
      has '<split>_sr_true' (the SR stages' images of the true renders); with `aug_levels`,
      per_image has '<split>_augL' per level instead of '<split>'.
    """
    if num_prompts < 1:
        raise ConfigError(f"--num_prompts ({num_prompts}) must be at least 1")
    if language not in LANGUAGES:
        raise ConfigError(f"--language={language!r} is not one of {', '.join(LANGUAGES)}")
    languages = shapes.LANGUAGES if language == "both" else (language,)
    if renders_only and (true_lowres or aug_levels or diversity):
        raise ConfigError("--renders_only samples nothing: drop --true_lowres / --aug_levels "
                          "/ --diversity")
    if diversity and (diversity < 2 or aug_levels):
        raise ConfigError(f"--diversity={diversity}: " + (
            "measure it in a run without --aug_levels" if diversity >= 2 else
            "pass the images per prompt to compare, at least 2 (e.g. --diversity=4)"))
    if batch_size < 1:
        raise ConfigError(f"--batch_size ({batch_size}) must be at least 1")
    batch_size = min(batch_size, num_prompts)  # 4 prompts sample 4 images, not a padded 32
    n_stages = num_stages or len(cascade.stages)
    if true_lowres and n_stages < 2:
        raise ConfigError("--true_lowres needs a super-resolution stage after the base "
                          f"(stages to run: {n_stages})")
    if aug_levels:
        if not 1 <= aug_stage < n_stages:
            raise ConfigError(f"--aug_stage ({aug_stage}) must name a super-resolution stage "
                              f"that runs: 1 to {n_stages - 1} (stages to run: {n_stages})")
        if true_lowres:
            raise ConfigError("--aug_levels and --true_lowres: run them as two evaluations")
        for level in aug_levels:
            if not 0.0 <= level <= 1.0:  # NaN fails too
                raise ConfigError(f"--aug_levels: {level} is not an augmentation level in "
                                  "[0, 1]; pass e.g. --aug_levels=0,0.1,0.2,0.4")
        settings = list(settings or cascade.settings(num_stages=n_stages))
    results, per_image, seconds, size = {}, {}, 0.0, None
    bar = None
    batches = -(-num_prompts // batch_size)
    prompt_sets = [(s_idx, split, lang, eval_prompts(split, num_prompts, seed, lang))
                   for s_idx, split in enumerate(splits) for lang in languages]
    if not renders_only:  # before any sampling: a prompt the encoder cannot read stops here
        for _, _, lang, pairs in prompt_sets:
            try:
                cascade.check_prompts([c for _, c in pairs])
            except ConfigError as e:
                if lang == "en":
                    raise
                raise ConfigError(f"--language={language}: {e}; evaluate English prompts with "
                                  "--language=en, or score the true renders alone with "
                                  "--renders_only") from None
    if progress and not renders_only:
        from tqdm import tqdm

        runs = (1 + true_lowres + max(0, diversity - 1) if not aug_levels else
                1 + len(aug_levels))
        bar = tqdm(total=batches * len(splits) * len(languages) * runs, unit="batch",
                   dynamic_ncols=True)

    def run(prompts, lows, s_idx, label, start=0, stop=n_stages, run_settings=settings,
            offset=0):
        """-> one sampled image per prompt (uint8; stage stop - 1's float output if stop <
        n_stages), stages start .. stop - 1, fed `lows` when start > 0; sampling seeds
        shifted by `offset`."""
        nonlocal seconds
        images = []
        for b in range(batches):
            lo, hi = b * batch_size, (b + 1) * batch_size
            chunk = prompts[lo:hi]
            pad = batch_size - len(chunk)
            padded = chunk + [chunk[-1]] * pad
            kwargs = {}
            if lows is not None:
                low = lows[lo:hi]
                kwargs = {"start_stage": start,
                          "lowres": np.concatenate([low] + [low[-1:]] * pad)}
            if stop < n_stages:
                kwargs["return_all"] = True
            if bar is not None:
                bar.set_description(f"{label} batch {b + 1}/{batches}")
            t0 = time.perf_counter()
            imgs = cascade.sample(padded, seed + 1000 * s_idx + b + offset,
                                  settings=run_settings,
                                  num_stages=stop, **kwargs)
            seconds += time.perf_counter() - t0
            if stop < n_stages:
                imgs = imgs[1][-1]  # the float output the next stage would get
            images.extend(imgs[:len(chunk)])
            if bar is not None:
                bar.update(1)
        return images

    def sweep(prompts, s_idx, split, lang) -> dict:  # {name: (images, scores)}, per level
        key = split + ("_zh" if lang == "zh" else "")
        lows = np.stack(run(prompts, None, s_idx, f"{key} stages < {aug_stage}",
                            stop=aug_stage))
        out = {}
        for level in aug_levels:
            st = list(settings)
            st[aug_stage] = st[aug_stage].replace(aug_level=float(level))
            images = run(prompts, lows, s_idx, f"{key} aug {level:g}", start=aug_stage,
                         run_settings=st)
            scores = _scored(images, prompts)
            out[f"{key}_aug{level:g}"] = (images, scores)
            results[row_name(split, lang, f"aug {level:g}")] = detector.aggregate(scores)
        return out

    for s_idx, split, lang, pairs in prompt_sets:  # both languages: the same sampling seeds
        key = split + ("_zh" if lang == "zh" else "")  # per_image / out file names
        prompts = [c for _, c in pairs]
        if renders_only:
            size = int(cascade.stages[n_stages - 1].unet_cfg.image_size)
            renders = [shapes.render(scene, size) for scene, _ in pairs]
            scores = _scored(renders, prompts)
            per_image[key] = scores
            results[row_name(split, lang, "true renders")] = detector.aggregate(scores)
            written = {key: (renders, scores)}
        elif aug_levels:
            written = sweep(prompts, s_idx, split, lang)
            per_image.update({name: scs for name, (_, scs) in written.items()})
            images = next(iter(written.values()))[0]
            size = int(images[0].shape[0])
        else:
            images = run(prompts, None, s_idx, key)
            size = int(images[0].shape[0])
            scores = _scored(images, prompts)
            per_image[key] = scores
            results[row_name(split, lang)] = detector.aggregate(scores)
            written = {key: (images, scores)}
            if diversity:
                more = [run(prompts, None, s_idx, f"{key} diversity {j + 1}/{diversity}",
                            offset=100_000 * j) for j in range(1, diversity)]
                groups = list(zip(images, *more))
                results[row_name(split, lang)].update(
                    layouts=distinct_layouts(groups), n_layouts=diversity,
                    pixel_distance=pixel_distance(groups))
        if reference and not renders_only:
            renders = [shapes.render(scene, size) for scene, _ in pairs]
            results[row_name(split, lang, "true renders")] = detector.evaluate(renders, prompts)
        if true_lowres:
            r = cascade.stages[0].unet_cfg.image_size
            lows = np.stack([shapes.render(scene, r) for scene, _ in pairs])
            sr_images = run(prompts, lows, s_idx, f"{key} SR", start=1)
            sr_scores = _scored(sr_images, prompts)
            per_image[f"{key}_sr_true"] = sr_scores
            results[row_name(split, lang, f"SR of true {r} px")] = detector.aggregate(sr_scores)
            hw = (images[0].shape[1], images[0].shape[0])  # PIL: (width, height)
            upsampled = [np.asarray(Image.fromarray(low).resize(hw, Image.BILINEAR))
                         for low in lows]
            results[row_name(split, lang, f"true {r} px, bilinear")] = detector.evaluate(
                upsampled, prompts)
            written[f"{key}_sr_true"] = (sr_images, sr_scores)
        if out:
            from jaxt2i.images import labelled_grid

            os.makedirs(out, exist_ok=True)
            for name, (imgs, scs) in written.items():
                shown = min(len(imgs), 64)
                labelled_grid(np.stack(imgs[:shown]), prompts[:shown],
                              os.path.join(out, f"{name}.png"), cols=8)
                with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
                    for sc in scs:
                        f.write(json.dumps(sc) + "\n")
    if bar is not None:
        bar.close()
    return {"results": results, "per_image": per_image, "seconds": seconds, "image_size": size}
