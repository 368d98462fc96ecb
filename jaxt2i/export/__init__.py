"""Export trained checkpoints to other frameworks: PyTorch (safetensors), ONNX, StableHLO.

`export_cascade` is what `python -m jaxt2i.export` runs; the formats are in `torch_export`,
`onnx_export` and `stablehlo`, the shared manifest and staging directory in `common`.
"""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


def export_cascade(checkpoints, fmt: str, out: str, *, overwrite: bool = False,
                   dtype: str = "float32", overrides: dict | None = None, platforms=None,
                   opset: int | None = None, stages: int | None = None, log=print,
                   text_encoder: str | None = None) -> dict:
    """Exports a cascade (or its first `stages` stages) to `out`; returns the manifest record.

    Args:
      checkpoints: a cascade directory, or one stage export / training workdir per stage;
        an unCLIP directory (cascade.json kind 'unclip') also writes its prior and CLIP
        (`jaxt2i.export.unclip_export`).
      fmt: 'torch', 'onnx' or 'stablehlo' (`FORMATS`).
      out: output directory (empty or absent; with `overwrite`, an earlier export).
      overwrite: replace an earlier export at `out` once the new one is complete.
      dtype: torch only: weight dtype ('float32', 'bfloat16', 'float16').
      overrides: {setting: '25,10' | '25'} per-stage sampler settings (baked into stablehlo).
      platforms: stablehlo only: lowering platforms (default cpu, cuda, tpu).
      opset: onnx only: the ONNX opset (default `onnx_export.OPSET`).
      stages: export only the first N stages.
      log: progress messages go here.
      text_encoder: load the text encoder from here instead of the stages' configs.

    Raises ConfigError (one line) for a bad format, dtype or setting.
    """
    from jaxt2i.cascade import load_cascade
    from jaxt2i.cli import stage_settings
    from jaxt2i.config import ConfigError
    from jaxt2i.export.common import FORMATS, staging_dir, write_manifest
    from jaxt2i.pipelines.unclip import read_spec

    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r}; allowed: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    if fmt != "torch" and dtype != "float32":
        raise ConfigError(f"--dtype={dtype} applies to --format=torch only; {fmt} exports float32")
    checkpoints = list(checkpoints)
    prior = clip = None
    if len(checkpoints) == 1 and read_spec(checkpoints[0]) is not None:  # unCLIP
        if text_encoder:
            raise ConfigError("--text_encoder does not apply to an unCLIP cascade (its stages "
                              "load their own); leave it out")
        from jaxt2i.export.unclip_export import load_parts

        cascade, prior, clip = load_parts(checkpoints[0])
    else:
        cascade = load_cascade(checkpoints, dtype="float32", text_encoder=text_encoder)
    if fmt == "torch" and any(s.config.model_family != "efficient_unet" for s in cascade.stages):
        raise ConfigError("--format=torch writes Efficient U-Nets (TorchUNet); write DeepFloyd IF "
                          "stages as diffusers pipelines with `python -m jaxt2i.convert "
                          "--to=diffusers CASCADE --out=DIR`")
    settings = stage_settings(cascade, stages, overrides)
    n = len(settings)
    cascade = cascade.head(n)
    with staging_dir(out, overwrite, log=log) as root:
        if fmt == "torch":
            from jaxt2i.export.torch_export import export_torch

            record = export_torch(cascade, settings, root, dtype=dtype, progress=log)
            packages = ("torch", "transformers")
        elif fmt == "onnx":
            from jaxt2i.export.onnx_export import OPSET, export_onnx

            record = export_onnx(cascade, root, opset=opset or OPSET, progress=log)
            packages = ("jax2onnx", "onnx", "onnxruntime")
        else:
            from jaxt2i.export.stablehlo import PLATFORMS, export_stablehlo

            record = export_stablehlo(cascade, settings, root, platforms=platforms or PLATFORMS,
                                      progress=log)
            packages = ()
        sources = []
        if prior is not None:
            from jaxt2i.export.unclip_export import export_parts, prior_source

            record = export_parts(fmt, prior, clip, root, record, dtype=dtype, opset=opset,
                                  platforms=platforms, progress=log)
            sources.append(prior_source(prior))
        manifest = write_manifest(root, fmt=fmt, stages=cascade.stages,
                                  settings=settings if fmt == "stablehlo" else None,
                                  packages=packages, extra={"cascade": record, "dtype": dtype},
                                  sources=sources)
    return manifest


__all__ = ["DTYPES", "export_cascade"]
