"""ONNX export (jax2onnx): each stage's denoiser and the T5 text encoder.

Layout written by `export_onnx`:

    OUT/cascade.json                    stages and how their inputs fit together
    OUT/text_encoder/encoder.onnx       input_ids [B, L] int32, attention_mask [B, L] bool
                                        -> text_emb [B, L, D] float32 (+ HF tokenizer files)
    OUT/stageK_.../denoiser.onnx        x_t [B, H, W, C], noise_level [B], text_emb [B, L, D],
                                        text_mask [B, L] bool (+ lowres [B, h, w, C] and
                                        aug_level [B] for SR stages, image_embed [B, P] for
                                        an unCLIP decoder) -> prediction [B, H, W, C]
                                        (lowres [B, H, W, C] for a stage whose
                                        diffusion.aug_order is 'resize_first': the consumer
                                        upsamples, then augments, as Stage.augment does)
    OUT/stageK_.../config.json          the stage config (objective, schedule, sampler defaults)

Images are NHWC float32 as in JAX; B is dynamic; weights are stored as initializers, in
float32. A denoiser is one network evaluation: the sampling loop (schedule, guidance,
thresholding) runs in the consumer, as with other ONNX diffusion pipelines. The default
opset is 23. Ops that needed care: the SR stage's low-res resize is written as two
interpolation-matrix einsums (the resize primitive needs a static batch), and the boolean
text mask stays a bool input (jax2onnx lowers the masked softmax to Where).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.export.common import ExportError, stage_dir_name, write_json

OPSET = 23
DENOISER_FILE = "denoiser.onnx"
ENCODER_FILE = "encoder.onnx"


def _require():
    try:
        import jax2onnx  # noqa: F401
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs jax2onnx and onnx: pip install 'jaxt2i[onnx]'") from None


def convert(fn, specs: Sequence[jax.ShapeDtypeStruct], input_names: Sequence[str],
            output_names: Sequence[str], what: str, opset: int = OPSET):
    """jax2onnx conversion with a one-line error naming the op it cannot convert.

    Returns:
      the checked `onnx.ModelProto`.
    """
    import onnx
    from jax2onnx import to_onnx

    try:
        model = to_onnx(fn, list(specs), input_names=list(input_names),
                        output_names=list(output_names), opset=opset, model_name=what)
    except NotImplementedError as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        op = re.search(r"primitive '([^']+)'", msg)
        name = op.group(1) if op else msg
        raise ExportError(f"ONNX export of {what} failed: jax2onnx cannot convert the op "
                          f"{name!r} ({msg}); export to stablehlo instead or change the model "
                          "so it avoids that op") from e
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"ONNX export of {what}: the converted model is invalid: "
                          f"{str(e).splitlines()[0]}") from e
    return model


def _save(model, path: str) -> None:
    data = model.SerializeToString()
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def denoiser_inputs(unet_cfg, text_len: int, lowres_size: int | None):
    """(names, ShapeDtypeStructs with symbolic batch B) of a stage's denoiser."""
    (b,) = jax.export.symbolic_shape("B")
    c, size = unet_cfg, unet_cfg.image_size
    names = ["x_t", "noise_level", "text_emb", "text_mask"]
    specs = [jax.ShapeDtypeStruct((b, size, size, c.channels), jnp.float32),
             jax.ShapeDtypeStruct((b,), jnp.float32),
             jax.ShapeDtypeStruct((b, text_len, c.text_dim), jnp.float32),
             jax.ShapeDtypeStruct((b, text_len), jnp.bool_)]
    if c.is_sr:
        names += ["lowres", "aug_level"]
        specs += [jax.ShapeDtypeStruct((b, lowres_size, lowres_size, c.channels), jnp.float32),
                  jax.ShapeDtypeStruct((b,), jnp.float32)]
    if getattr(c, "image_embed_dim", 0):  # an unCLIP decoder
        names.append("image_embed")
        specs.append(jax.ShapeDtypeStruct((b, c.image_embed_dim), jnp.float32))
    return names, specs


def denoiser_fn(stage):
    """`stage.denoise` with its params closed over (they become ONNX initializers)."""
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), stage.params)

    c = stage.unet_cfg
    extra = (["lowres", "aug_level"] if c.is_sr else []) + (
        ["image_embed"] if getattr(c, "image_embed_dim", 0) else [])  # as denoiser_inputs

    def fn(x_t, noise_level, text_emb, text_mask, *rest):
        return stage.denoise(params, x_t, noise_level, {
            "text_emb": text_emb, "text_mask": text_mask, "lowres": None, "aug_level": None,
            **dict(zip(extra, rest))})
    return fn


def export_onnx(cascade, root: str, opset: int = OPSET, progress=None) -> dict:
    """Writes the text encoder and every stage's denoiser as ONNX under `root`.

    Args:
      cascade: a loaded `jaxt2i.cascade.Cascade` (float32).
      root: an empty directory.
      opset: ONNX opset.
      progress: optional callable(str) for progress lines.

    Returns:
      the cascade.json record.
    """
    from jaxt2i.text.encoder import save_encoder

    _require()
    say = progress or (lambda msg: None)
    enc = cascade.encoder
    L = enc.max_length
    (b,) = jax.export.symbolic_shape("B")
    tdir = os.path.join(root, "text_encoder")
    save_encoder(enc, tdir)  # tokenizer files (and HF weights) beside the ONNX graph
    say("text encoder: converting to ONNX")
    tparams = jax.tree_util.tree_map(jnp.asarray, enc.params)
    model = convert(lambda ids, mask: cascade.encode_fn(tparams, ids, mask)[0],
                    [jax.ShapeDtypeStruct((b, L), jnp.int32), jax.ShapeDtypeStruct((b, L), jnp.bool_)],
                    ["input_ids", "attention_mask"], ["text_emb"], "the text encoder", opset)
    _save(model, os.path.join(tdir, ENCODER_FILE))

    names = []
    for k, stage in enumerate(cascade.stages):
        name = stage_dir_name(k, stage.unet_cfg)
        names.append(name)
        sdir = os.path.join(root, name)
        os.makedirs(sdir)
        # A stage that resizes first takes its augmented low-res input at its own size.
        in_names, specs = denoiser_inputs(stage.unet_cfg, L, stage.lowres_input_size)
        say(f"stage {k}: converting the denoiser to ONNX")
        model = convert(denoiser_fn(stage), specs, in_names,
                        ["prediction"], f"stage {k} ({name})", opset)
        _save(model, os.path.join(sdir, DENOISER_FILE))
        write_json(os.path.join(sdir, "config.json"), {
            "config": stage.config.to_dict(), "step": stage.step, "inputs": in_names,
            "output": f"prediction ({stage.unet_cfg.objective}) [B, {stage.unet_cfg.image_size}, "
            f"{stage.unet_cfg.image_size}, {stage.unet_cfg.channels}]",
            "noise_level": "jaxt2i.diffusion.get_schedule(config['diffusion']['schedule'])"
            ".model_t(t)", "opset": opset})
    record = {"format": "onnx", "stages": names, "text_encoder": "text_encoder",
              "max_length": L, "opset": opset, "layout": "NHWC"}
    write_json(os.path.join(root, "cascade.json"), record)
    return record


def run_denoiser(path: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Runs an exported denoiser (or encoder) with onnxruntime on CPU; returns output 0."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]
