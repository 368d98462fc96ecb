"""`python -m jaxt2i.sample` (console script `jaxt2i-sample`): text -> images through a
trained cascade.

    python -m jaxt2i.sample --prompt "a red circle above a blue square" --num_images=4 \
        --checkpoint=runs/base/export --checkpoint=runs/sr/export --steps=25,10 --out=samples

Writes `out/NNN.png` per image, a labelled `out/grid.png` and `out/sample.json` (prompts, seed,
every stage's settings), from which the same images can be made again. A cascade directory
whose cascade.json says `"kind": "unclip"` runs the unCLIP pipeline
(`jaxt2i.pipelines.unclip`: prior -> decoder -> SR stages); with such a directory,
--variations_of IMAGE, --interpolate A.png,B.png and --text_diff IMAGE decode images' CLIP
embeddings instead of the prior's (docs/unclip.md). Per-stage flags take one
value for all stages or a comma list, one per stage. Without --checkpoint the bundled demo
cascade (jaxt2i/assets/demo_cascade) is used; --model=unclip picks the bundled unCLIP demo
(jaxt2i/assets/demo_unclip) instead. The work is `jaxt2i.sampling.sample_to_dir`.
"""

from __future__ import annotations

import sys

from absl import flags

from jaxt2i.cli import (check_stage_flags, checkpoints_or_demo, define_model_flag,
                        define_stage_flags, define_text_encoder_flag, read_prompts, run_app,
                        stage_flag_values)
from jaxt2i.config import ConfigError
from jaxt2i.pipelines import unclip
from jaxt2i.sampling import sample_to_dir
from jaxt2i.workdir import check_writable


def main(argv) -> None:
    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    checkpoints = checkpoints_or_demo(F.checkpoint, F.model)
    mode = _image_mode(checkpoints)
    prompts = None if mode else read_prompts(F.prompt, F.prompts_file)
    overrides = stage_flag_values()
    check_stage_flags(overrides)  # a NaN guidance is refused before the cascade is loaded
    check_writable(F.out, "--out", urls=True)  # before the sampling work, not after it
    if len(checkpoints) == 1 and unclip.read_spec(checkpoints[0]) is not None:
        _sample_unclip(checkpoints[0], prompts, overrides, mode)
        return
    record = sample_to_dir(checkpoints, prompts, F.out, num_images=F.num_images, seed=F.seed,
                           stages=F.stages, dtype=F.dtype, overrides=overrides,
                           progress=sys.stderr.isatty() or F.progress,
                           text_encoder=F.text_encoder, negative_prompts=F.negative_prompt or (),
                           init_images=F.init_image or (), masks=F.mask or (),
                           strength=F.strength, start_stage=F.start_stage,
                           lowres=F.lowres or ())
    print(f"wrote {len(record['images'])} images, grid.png and sample.json to {F.out}", flush=True)


# The flags of the unCLIP image modes beyond the image itself (None = not given).
MODE_FLAGS = {"variations": ("eta",), "interpolate": ("frames", "eta"),
              "text_diff": ("from_caption", "to_caption", "frames", "max_theta", "eta")}


def _image_mode(checkpoints: list[str]) -> tuple[str, list[str]] | None:
    """(mode, image files) of --variations_of / --interpolate / --text_diff, or None; the
    flag combinations that do not fit are refused in one line before anything is loaded."""
    F = flags.FLAGS
    given = [m for m, (flag, _) in unclip.MODES.items() if getattr(F, flag[2:])]
    extra = sorted({f for fs in MODE_FLAGS.values() for f in fs if getattr(F, f) is not None})
    if not given:
        if extra:
            raise ConfigError(f"--{extra[0]} applies only with --variations_of, --interpolate "
                              "or --text_diff (an unCLIP cascade)")
        return None
    flag = unclip.MODES[given[0]][0]
    if len(given) > 1:
        raise ConfigError(f"{flag} and {unclip.MODES[given[1]][0]} are separate modes; give one")
    mode = given[0]
    if len(checkpoints) != 1 or unclip.read_spec(checkpoints[0]) is None:
        got = ", ".join(F.checkpoint or []) or "none (the bundled Imagen demo)"
        raise ConfigError(f"{flag} needs an unCLIP cascade: --model=unclip (the bundled one) "
                          f"or --checkpoint=DIR whose cascade.json says \"kind\": \"unclip\" "
                          f"(got {got}); only unCLIP decodes CLIP image embeddings")
    misfit = [f for f in extra if f not in MODE_FLAGS[mode]]
    if misfit:
        raise ConfigError(f"--{misfit[0]} does not apply to {flag} (it takes "
                          f"{', '.join('--' + f for f in MODE_FLAGS[mode])})")
    if mode == "text_diff" and (F.from_caption is None or F.to_caption is None):
        raise ConfigError("--text_diff needs --from_caption (what the image shows) and "
                          "--to_caption (what it should become)")
    if mode != "variations" and F.num_images != 1:
        raise ConfigError(f"{flag} makes --frames images; drop --num_images={F.num_images}")
    if F.prompts_file or len(F.prompt or []) > 1:
        raise ConfigError(f"{flag} takes at most one --prompt (the decoder's caption; default "
                          "none) and no --prompts_file")
    value = getattr(F, flag[2:])
    return mode, (value.split(",") if mode == "interpolate" else [value])


def _sample_unclip(path: str, prompts: list[str] | None, overrides: dict,
                   mode: tuple[str, list[str]] | None) -> None:
    """An unCLIP cascade directory (cascade.json "kind": "unclip"): prior -> decoder -> SR,
    or an image mode (`_image_mode`)."""
    F = flags.FLAGS
    given = sorted(k for k, v in overrides.items() if v is not None) + [
        f for f in ("stages", "dtype", "negative_prompt", "init_image", "mask", "strength",
                    "lowres", "text_encoder") if getattr(F, f, None)] + (
        ["start_stage"] if F.start_stage else [])
    if given:
        raise ConfigError(f"an unCLIP cascade takes --prompt(s_file), --num_images, --seed, "
                          f"--out and the image modes' flags only so far; drop --{given[0]}")
    if mode is None:
        record = unclip.sample_to_dir(path, prompts, F.out, num_images=F.num_images,
                                      seed=F.seed)
    else:
        name, images = mode
        options = {f: getattr(F, f) for f in MODE_FLAGS[name]}
        if name == "variations":
            options["num_images"] = F.num_images
        record = unclip.edit_to_dir(path, name, images, F.out, seed=F.seed,
                                    prompt=(F.prompt or [""])[0], **options)
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
    flags.DEFINE_multi_string("negative_prompt", None, "What guidance steers away from: one "
                              "for all prompts or one per prompt (repeatable; default: the "
                              "empty prompt).")
    flags.DEFINE_multi_string("init_image", None, "Image-to-image / inpainting: an image file, "
                              "one for all images or one per image (repeatable).")
    flags.DEFINE_multi_string("mask", None, "Inpainting: a mask image per --init_image (white "
                              "= generate, black = keep); see --inpaint_resample.")
    flags.DEFINE_string("strength", None, "Image-to-image: how much of the reverse process "
                        "runs from the noised --init_image, in (0, 1] (1 = from noise); one "
                        "value for all stages or a comma list.")
    flags.DEFINE_integer("start_stage", 0, "Start at this super-resolution stage (1 = the "
                         "first SR stage) from --lowres images instead of the stages before.")
    flags.DEFINE_multi_string("lowres", None, "With --start_stage=K: low-res image files that "
                              "stand in for stage K-1's output, one for all images or one per "
                              "image (resized to that stage's size).")
    flags.DEFINE_string("variations_of", None, "unCLIP: variations of this image file (its "
                        "CLIP embedding decoded with DDIM at --eta), --num_images of them.")
    flags.DEFINE_string("interpolate", None, "unCLIP: A.png,B.png: --frames images from A's "
                        "CLIP embedding to B's (slerp), one noise for all.")
    flags.DEFINE_string("text_diff", None, "unCLIP: this image file moved along the change "
                        "from --from_caption to --to_caption in CLIP space, --frames images.")
    flags.DEFINE_string("from_caption", None, "--text_diff: a caption of the image as it is.")
    flags.DEFINE_string("to_caption", None, "--text_diff: the caption it should move toward.")
    flags.DEFINE_integer("frames", None, "--interpolate / --text_diff: how many images, >= 2 "
                         "(default 5; the sampler's steps are --steps).")
    flags.DEFINE_float("max_theta", None, "--text_diff: the last frame's slerp fraction toward "
                       "the text diff, in (0, 1] (default 0.5; the paper: 0.25 to 0.5).")
    flags.DEFINE_float("eta", None, "unCLIP image modes: the decoder's DDIM eta (default 1 for "
                       "--variations_of, 0 for --interpolate / --text_diff).")
    define_stage_flags()
    define_text_encoder_flag()
    define_model_flag()


def cli() -> None:
    """Console-script entry point (`jaxt2i-sample`)."""
    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
