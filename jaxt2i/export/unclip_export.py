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
    stablehlo (`jax.export`, B symbolic, params an input, as the stages' samplers):
    OUT/prior/sampler.jax_exported, sampler.mlir, params.safetensors, config.json
                                the prior's whole reverse process, its saved settings baked in:
                                (params, text_tokens [B, L, Dt], text_mask [B, L] bool,
                                text_embed [B, P], key_data uint32[2]) -> z [B, P] unit-norm
    OUT/clip/text.jax_exported  (params, input_ids [B, L] int32, attention_mask [B, L] bool)
                                -> (text_states [B, L, Dt], text_embeds [B, P])
    OUT/clip/vision.jax_exported  (params, pixel_values [B, S, S, 3]) -> image_embeds [B, P]
    OUT/clip/params.safetensors both towers' params ('/'-joined tree paths)

The CLIP embeddings are unnormalised, as CLIP gives them; the prior normalises its text
embedding input itself and the pipeline feeds the decoder unit-norm image embeddings.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp

from jaxt2i.export.common import config_hash, write_json

PRIOR_DIR = "prior"
CLIP_DIR = "clip"
EXPORTED = ".jax_exported"


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
                 opset: int | None = None, platforms=None, progress=None) -> dict:
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
    elif fmt == "onnx":
        parts = _export_onnx(prior, clip, root, pdir, meta, opset, say)
    else:
        parts = _export_stablehlo(prior, clip, root, pdir, meta, platforms, say)
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

    cparams, towers = clip_towers(clip)
    for name, (fn, specs, inputs, outputs) in towers.items():
        say(f"CLIP: converting the {name} tower to ONNX")
        _save(convert(functools.partial(fn, cparams), specs, inputs, outputs,
                      f"the CLIP {name} tower", opset),
              os.path.join(root, CLIP_DIR, f"{name}.onnx"))
    return {"clip_text": f"{CLIP_DIR}/text.onnx", "clip_vision": f"{CLIP_DIR}/vision.onnx",
            "clip_image_size": clip.config.vision.image_size}


def clip_towers(clip):
    """(float32 params, {'text' | 'vision': (fn(params, *inputs), input ShapeDtypeStructs with
    symbolic batch B, input names, output names)}): the CLIP towers as the exports write them."""
    f32 = jnp.float32
    L, size = text_length(clip), clip.config.vision.image_size
    (b,) = jax.export.symbolic_shape("B")

    def text(params, ids, mask):  # [B, L] -> (states [B, L, Dt], embeds [B, P])
        states, _, embeds = clip.text_features(params, ids, mask)
        return states.astype(f32), embeds.astype(f32)

    def vision(params, pixels):  # [B, S, S, 3] preprocessed -> [B, P]
        return clip.pixel_embeds(params, pixels).astype(f32)

    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, f32), clip.params)
    return params, {
        "text": (text, [jax.ShapeDtypeStruct((b, L), jnp.int32),
                        jax.ShapeDtypeStruct((b, L), jnp.bool_)],
                 ["input_ids", "attention_mask"], ["text_states", "text_embeds"]),
        "vision": (vision, [jax.ShapeDtypeStruct((b, size, size, 3), f32)], ["pixel_values"],
                   ["image_embeds"])}


def _export_stablehlo(prior, clip, root: str, pdir: str, meta: dict, platforms, say) -> dict:
    """The prior's whole sampler and the CLIP towers with `jax.export` (`stablehlo`'s
    conventions: symbolic batch B, the params an input, saved beside)."""
    from jaxt2i.export import stablehlo as hlo

    platforms = tuple(platforms or hlo.PLATFORMS)
    L, P, s = text_length(clip), prior.config.clip_dim, prior.settings
    say(f"prior: lowering the {s.sampler} sampler ({s.steps} steps, {s.num_candidates} "
        "candidates)")

    def sample(params, text_tokens, text_mask, text_embed, key_data):
        return prior.sample(params, text_tokens, text_mask, text_embed,
                            jax.random.wrap_key_data(key_data))  # [B, P]

    _, specs = prior_inputs(prior.config, L)
    exp = hlo.export_fn(sample, [hlo.params_spec(prior.params), *specs[2:5],
                                 jax.ShapeDtypeStruct((2,), jnp.uint32)], platforms, "the prior")
    hlo.save_sampler(pdir, exp, prior.params, {
        **meta, "prior": prior.config.to_dict(), "settings": vars(s),
        "inputs": ["params", f"text_tokens [B, {L}, {prior.config.text_dim}] float32 (CLIP "
                   "text_states)", f"text_mask [B, {L}] bool", f"text_embed [B, {P}] float32 "
                   "(CLIP text_embeds)", "key_data uint32[2]"],
        "output": f"[B, {P}] float32 unit-norm CLIP image embeddings (the decoder's "
        "image_embed)"}, platforms)

    cdir = os.path.join(root, CLIP_DIR)
    say("CLIP: lowering the text and vision towers")
    cparams, towers = clip_towers(clip)
    for name, (fn, specs, _, _) in towers.items():
        exp = hlo.export_fn(fn, [hlo.params_spec(cparams), *specs], platforms,
                            f"the CLIP {name} tower")
        hlo.write_exported(exp, os.path.join(cdir, f"{name}{EXPORTED}"))
    hlo.save_params(cparams, os.path.join(cdir, hlo.PARAMS_FILE))
    return {"prior_sampler": f"{PRIOR_DIR}/{hlo.SAMPLER_FILE}",
            "clip_text": f"{CLIP_DIR}/text{EXPORTED}",
            "clip_vision": f"{CLIP_DIR}/vision{EXPORTED}",
            "clip_params": f"{CLIP_DIR}/{hlo.PARAMS_FILE}",
            "clip_image_size": clip.config.vision.image_size,
            "prior_key_data": "jax.random.key_data(jax.random.split(jax.random.key(seed))[0])",
            "key_data": "jax.random.key_data(jax.random.fold_in(jax.random.split("
            "jax.random.key(seed))[1], stage_index))"}


def run_exported_prior(root: str, record: dict, prompts, key_data):
    """The decoder's image embeddings [B, P] of `prompts` from a StableHLO unCLIP export: the
    CLIP tokenizer, the exported text tower and prior sampler (`UnCLIP.generate`'s prior half)."""
    from jaxt2i.export.stablehlo import PARAMS_FILE, load_exported, load_params
    from jaxt2i.text.tokenizer import load_tokenizer

    cdir = os.path.join(root, record["clip"])
    ids, mask = load_tokenizer(cdir, max_length=record["clip_text_length"])(list(prompts))
    mask = jnp.asarray(mask, bool)
    states, embeds = load_exported(os.path.join(root, record["clip_text"])).call(
        load_params(os.path.join(cdir, PARAMS_FILE)), jnp.asarray(ids, jnp.int32), mask)
    pdir = os.path.join(root, record["prior"])
    return load_exported(os.path.join(root, record["prior_sampler"])).call(
        load_params(os.path.join(pdir, PARAMS_FILE)), states, mask, embeds, key_data)
