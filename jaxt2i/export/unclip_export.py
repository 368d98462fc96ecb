"""Export of an unCLIP cascade (a directory whose cascade.json says ``"kind": "unclip"``).

The decoder and the SR stages are written as every cascade's stages (`torch_export`,
`onnx_export`; the decoder's folder is ``stage0_decoder_<size>px`` and it takes the CLIP image
embedding as one more input); this module adds the diffusion prior and the CLIP both read:

    OUT/clip/                   the CLIP as a Hugging Face CLIPModel directory (config.json,
                                model.safetensors, tokenizer files; float32): transformers'
                                `CLIPModel.from_pretrained` and `CLIPTokenizer` load it
    torch:
    OUT/prior/model.safetensors, config.json
                                `jaxt2i.export.torch_prior.TorchPrior.from_pretrained`
                                (config.json: {"prior": PriorConfig, "config": the training
                                config, "step", "schedule", "sample_defaults"})
    onnx:
    OUT/prior/denoiser.onnx     x_t [B, P], noise_level [B], text_tokens [B, L, Dt],
                                text_mask [B, L] bool, text_embed [B, P], keep [B] bool
                                -> prediction [B, P] (the objective, in the prior's space)
    OUT/clip/text.onnx          input_ids [B, L] int32, attention_mask [B, L] bool
                                -> text_states [B, L, Dt], text_embeds [B, P]
    OUT/clip/vision.onnx        pixel_values [B, S, S, 3] float32, preprocessed (NHWC; see
                                `jaxt2i.text.clip.preprocess_images`) -> image_embeds [B, P]

The CLIP embeddings are unnormalised, as CLIP gives them; the prior normalises its text
embedding input itself and the pipeline feeds the decoder unit-norm image embeddings.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from jaxt2i.export.common import config_hash, write_json

PRIOR_DIR = "prior"
CLIP_DIR = "clip"


def load_parts(path: str):
    """(Cascade of the decoder and SR stages, PriorStage, CLIP with both towers) of an unCLIP
    directory; ConfigError (one line) when its parts do not fit together."""
    from jaxt2i.cascade import Cascade
    from jaxt2i.pipelines.unclip import load_unclip
    from jaxt2i.prior_stage import load_frozen_clip

    pipe = load_unclip(path)
    cascade = Cascade(pipe.stages, pipe.encoder, unclip=True)
    return cascade, pipe.prior, load_frozen_clip(pipe.prior.clip_path)


def _prior_config(prior) -> dict:
    """The training config the prior was exported with (its config.json's 'config')."""
    from jaxt2i.checkpoint import EXPORT_CONFIG

    with open(os.path.join(prior.path, EXPORT_CONFIG)) as f:
        return json.load(f)["config"]


def prior_source(prior) -> dict:
    """The prior's record in manifest.json's 'sources' (as the stages' records)."""
    config = _prior_config(prior)
    return {"path": os.path.abspath(prior.path), "step": prior.step,
            "config_sha256": config_hash(config), "model_size": config.get("model_size"),
            "stage": "prior"}


def text_length(clip) -> int:
    """The fixed token length the CLIP text tower is run at (its tokenizer's)."""
    return clip.tokenizer.max_length if clip.tokenizer is not None else clip.config.text.max_length


def export_parts(fmt: str, prior, clip, root: str, record: dict, *, dtype: str = "float32",
                 opset: int | None = None, progress=None) -> dict:
    """Writes the prior and the CLIP under `root` (beside the stages) and returns `record`
    (the stages' cascade.json record) extended with them; rewrites cascade.json."""
    from jaxt2i.text.clip_convert import save_clip

    say = progress or (lambda msg: None)
    say("CLIP: writing the Hugging Face CLIPModel directory")
    save_clip(clip, os.path.join(root, CLIP_DIR))
    pdir = os.path.join(root, PRIOR_DIR)
    meta = {"config": _prior_config(prior), "step": prior.step, "schedule": prior.schedule,
            "sample_defaults": vars(prior.settings)}
    if fmt == "torch":
        from jaxt2i.export.torch_convert import save_prior_pretrained

        say("prior: writing prior/model.safetensors")
        save_prior_pretrained(pdir, prior.params, prior.config, dtype=dtype, extra=meta)
        parts = {"prior_module": "jaxt2i.export.torch_prior.TorchPrior",
                 "clip_module": "transformers.CLIPModel"}
    else:
        parts = _export_onnx(prior, clip, root, pdir, meta, opset, say)
    record = {**record, "kind": "unclip", "prior": PRIOR_DIR, "clip": CLIP_DIR,
              "clip_text_length": text_length(clip), **parts}
    write_json(os.path.join(root, "cascade.json"), record)
    return record


def prior_inputs(config, text_len: int):
    """(names, ShapeDtypeStructs with symbolic batch B) of the prior's denoiser."""
    (b,) = jax.export.symbolic_shape("B")
    f32 = jnp.float32
    return (["x_t", "noise_level", "text_tokens", "text_mask", "text_embed", "keep"],
            [jax.ShapeDtypeStruct((b, config.clip_dim), f32), jax.ShapeDtypeStruct((b,), f32),
             jax.ShapeDtypeStruct((b, text_len, config.text_dim), f32),
             jax.ShapeDtypeStruct((b, text_len), jnp.bool_),
             jax.ShapeDtypeStruct((b, config.clip_dim), f32),
             jax.ShapeDtypeStruct((b,), jnp.bool_)])


def _export_onnx(prior, clip, root: str, pdir: str, meta: dict, opset: int | None, say) -> dict:
    """The prior's denoiser and the CLIP towers as ONNX graphs."""
    from jaxt2i.export.onnx_export import OPSET, _save, convert

    opset = opset or OPSET
    L = text_length(clip)
    (b,) = jax.export.symbolic_shape("B")
    os.makedirs(pdir, exist_ok=True)
    say("prior: converting the denoiser to ONNX")
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), prior.params)
    names, specs = prior_inputs(prior.config, L)
    model = convert(lambda *args: prior.model.apply(params, *args[:5], keep=args[5]),
                    specs, names, ["prediction"], "the unCLIP prior", opset)
    _save(model, os.path.join(pdir, "denoiser.onnx"))
    write_json(os.path.join(pdir, "config.json"), {
        **meta, "prior": prior.config.to_dict(), "inputs": names, "opset": opset,
        "output": f"prediction ({prior.config.objective}) [B, {prior.config.clip_dim}]",
        "noise_level": "jaxt2i.diffusion.get_schedule(schedule).model_t(t)"})

    cparams = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), clip.params)
    cdir = os.path.join(root, CLIP_DIR)
    say("CLIP: converting the text tower to ONNX")

    def text(ids, mask):
        states, _, embeds = clip.text_features(cparams, ids, mask)
        return states.astype(jnp.float32), embeds.astype(jnp.float32)

    _save(convert(text, [jax.ShapeDtypeStruct((b, L), jnp.int32),
                         jax.ShapeDtypeStruct((b, L), jnp.bool_)],
                  ["input_ids", "attention_mask"], ["text_states", "text_embeds"],
                  "the CLIP text tower", opset), os.path.join(cdir, "text.onnx"))
    size = clip.config.vision.image_size
    say("CLIP: converting the vision tower to ONNX")
    _save(convert(lambda px: clip.pixel_embeds(cparams, px).astype(jnp.float32),
                  [jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)], ["pixel_values"],
                  ["image_embeds"], "the CLIP vision tower", opset),
          os.path.join(cdir, "vision.onnx"))
    return {"clip_text": f"{CLIP_DIR}/text.onnx", "clip_vision": f"{CLIP_DIR}/vision.onnx",
            "clip_image_size": size}
