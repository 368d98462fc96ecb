"""`python -m jaxt2i.export` (console script `jaxt2i-export`): a trained stage or cascade ->
PyTorch, ONNX or StableHLO files (`jaxt2i.export.export_cascade`).

    python -m jaxt2i.export --checkpoint=runs/base --checkpoint=runs/sr --format=torch --out=export_pt
    python -m jaxt2i.export --format=onnx --out=export_onnx          # the bundled demo cascade
    python -m jaxt2i.export --format=stablehlo --steps=25,25 --out=export_hlo

`--checkpoint` is a cascade directory (cascade.json), a stage export or a training workdir
(repeatable, base first; default: the bundled demo cascade); an unCLIP cascade directory
also writes its prior (prior/) and its CLIP (clip/, a Hugging Face CLIPModel directory, plus
the towers as ONNX or StableHLO; docs/export.md). The output has one folder per
stage, the text encoder (a Hugging Face T5 directory with its tokenizer), a top-level
cascade.json and manifest.json (source checkpoints, steps, config hashes, library versions,
file hashes). A non-empty --out is refused unless --overwrite, which replaces only an earlier
export (a directory with manifest.json); a failed export leaves --out as it was, and the
partial directory of a killed one is removed by the next export to the same --out.
"""

from __future__ import annotations

import sys

from absl import flags

from jaxt2i.assets import demo_cascade_dir
from jaxt2i.cli import (check_stage_flags, define_stage_flags, define_text_encoder_flag, run_app,
                        stage_flag_values)
from jaxt2i import paths
from jaxt2i.config import ConfigError
from jaxt2i.export import export_cascade
from jaxt2i.export.common import FORMATS


def main(argv) -> None:
    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    checkpoints = F.checkpoint or [demo_cascade_dir()]
    platforms = [p.strip() for p in F.platforms.split(",") if p.strip()] if F.platforms else None
    for p in platforms or []:
        if p not in ("cpu", "cuda", "rocm", "tpu"):
            raise ConfigError(f"--platforms: {p!r} is not one of cpu, cuda, rocm, tpu")
    overrides = stage_flag_values()
    check_stage_flags(overrides)  # before the cascade is loaded
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    manifest = export_cascade(checkpoints, F.format, F.out, overwrite=F.overwrite,
                              dtype=F.dtype, overrides=overrides, platforms=platforms,
                              opset=F.opset, stages=F.stages, log=log,
                              text_encoder=F.text_encoder)
    size = sum(f["bytes"] for f in manifest["files"])
    stages = sum(s["stage"] != "prior" for s in manifest["sources"])
    what = (f"the prior, the CLIP and {stages}" if manifest["cascade"].get("kind") == "unclip"
            else stages)
    print(f"exported {what} stage(s) as {F.format} to {paths.abspath(F.out)}"
          f" ({len(manifest['files'])} files, {size / 1e6:.1f} MB); see manifest.json", flush=True)


def _define_flags() -> None:
    flags.DEFINE_multi_string("checkpoint", None, "A cascade directory, a stage export or a "
                              "training workdir (repeatable, base first; default: the bundled "
                              "demo cascade).")
    flags.DEFINE_enum("format", None, list(FORMATS), "Target: torch (safetensors + a PyTorch "
                      "U-Net), onnx (denoisers + text encoder), stablehlo (whole samplers).")
    flags.DEFINE_string("out", None, "Output directory (must be empty or absent).")
    flags.DEFINE_boolean("overwrite", False, "Replace an earlier export at --out (only a "
                         "directory with manifest.json; only once the new export is complete).")
    flags.DEFINE_string("dtype", "float32", "torch only: weight dtype float32 | bfloat16 | "
                        "float16.")
    flags.DEFINE_integer("stages", None, "Export only the first N stages.")
    flags.DEFINE_string("platforms", None, "stablehlo only: comma list of lowering platforms "
                        "(default cpu,cuda,tpu).")
    flags.DEFINE_integer("opset", None, "onnx only: ONNX opset (default 23).")
    define_stage_flags("stablehlo: baked-in per-stage")
    define_text_encoder_flag()
    flags.mark_flags_as_required(["format", "out"])


def cli() -> None:
    """Console-script entry point (`jaxt2i-export`)."""
    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
