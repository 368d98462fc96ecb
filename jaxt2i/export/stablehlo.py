"""StableHLO export: each stage's whole compiled sampler, serialised with `jax.export`.

Layout written by `export_stablehlo`:

    OUT/cascade.json                  stages, key derivation, how to call the artifacts
    OUT/text_encoder/                 Hugging Face T5 dir (tokenizer + weights) and
        encode.jax_exported           ids [B, L] int32, mask [B, L] bool -> emb [B, L, D] f32
        params.safetensors            the encoder's params ('/'-joined tree paths)
    OUT/stageK_.../sampler.jax_exported   the stage's reverse process, settings baked in
        params.safetensors            the U-Net's params ('/'-joined tree paths)
        sampler.mlir                  the StableHLO module as text (for inspection / IREE)
        config.json                   the stage config, settings, input and output shapes

A sampler takes (params, emb [B, L, D], mask [B, L], u_emb [B, L, D], u_mask [B, L] (the
empty or negative prompts), key_data uint32[2], lowres [B, h, w, C] for SR stages (an unCLIP
decoder: image_embed [B, P], the prior's unit-norm CLIP image embeddings), then the
edit inputs init [B, H, W, C] float32 in [-1, 1], inpaint_mask [B, H, W, 1] float32 (1 =
generate) and strength float32 scalar) and returns [B, H, W, C] float32 images in [-1, 1];
B is symbolic, so one artifact serves every batch size. Plain sampling passes any init, an
all-ones mask and strength 1 (`plain_edit_inputs`), which gives the plain images (exactly
in the Imagen tests; the unCLIP test's decoder differs by float32 rounding, ~1e-6). The key of
stage k is `jax.random.key_data(jax.random.fold_in(jax.random.key(seed), k))`, exactly as
`Cascade.sample` derives it, so `run_exported(OUT, prompts, seed)` reproduces the images of
`python -m jaxt2i.sample` bit for bit on the same platform. Artifacts are lowered for every
platform in `platforms` (cpu, cuda, tpu by default) and load with `jax.export.deserialize`
without jaxt2i; only tokenisation needs the tokenizer files. An unCLIP cascade adds its
prior's sampler and the CLIP towers (`unclip_export`; `run_exported` runs them too).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.export.common import ExportError, stage_dir_name, write_json

SAMPLER_FILE = "sampler.jax_exported"
ENCODER_FILE = "encode.jax_exported"
PARAMS_FILE = "params.safetensors"
PLATFORMS = ("cpu", "cuda", "tpu")


def save_params(params: Any, path: str) -> None:
    """The params as flat safetensors ('/'-joined tree paths; `load_params` reads them)."""
    from jaxt2i.checkpoint import flatten
    from jaxt2i.text.convert import write_safetensors

    flat = {k: np.asarray(v) for k, v in flatten(jax.device_get(params)).items()}
    write_safetensors(flat, path, metadata={"format": "jaxt2i-flat"})


def load_params(path: str) -> dict:
    """Reads a params.safetensors written by this module back into the nested dict."""
    from safetensors.numpy import load_file

    from jaxt2i.checkpoint import unflatten

    return unflatten(load_file(path))


def stage_sampler(cascade, k: int, settings):
    """Stage k's reverse process as a function of explicit arrays (no Python state): (params,
    emb, mask, u_emb, u_mask, key_data, [lowres (SR) | image_embed (unCLIP decoder)], init,
    inpaint_mask, strength), the edit inputs (init image, inpainting mask, strength) last."""
    from jaxt2i.stage import Edit

    s = cascade.stages[k]

    def run(params, emb, mask, u_emb, u_mask, key_data, *rest):
        *cond, init, inpaint_mask, strength = rest  # cond: [lowres] | [image_embed] | []
        x = s.sample(params, (emb, mask), (u_emb, u_mask), jax.random.wrap_key_data(key_data),
                     cond[0] if s.is_sr else None, settings=settings,
                     edit=Edit(init, inpaint_mask, strength),
                     image_embed=cond[0] if s.image_embed_dim else None)
        return jnp.clip(x, -1.0, 1.0)  # [B, H, W, C]

    return run


def plain_edit_inputs(batch: int, size: int, channels: int = 3) -> list:
    """The edit inputs of an exported sampler for plain text-to-image sampling."""
    return [jnp.zeros((batch, size, size, channels), jnp.float32),
            jnp.ones((batch, size, size, 1), jnp.float32), jnp.float32(1.0)]


def export_fn(fn, args, platforms: Sequence[str], what: str):
    """`jax.export` of jit(fn) at `args` (ShapeDtypeStructs); ExportError names `what`."""
    try:
        return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)
    except Exception as e:  # name the failing piece in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"StableHLO export of {what} for platforms {list(platforms)} failed: "
                          f"{type(e).__name__}: {first}") from e


def params_spec(params: Any) -> Any:
    """The ShapeDtypeStructs of a params tree (exported as an input, not baked in)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype), params)


def write_exported(exp, path: str) -> None:
    """One serialised `jax.export.Exported` (`jax.export.deserialize` reads it back)."""
    with open(path, "wb") as f:
        f.write(exp.serialize())


def save_sampler(sdir: str, exp, params: Any, info: dict, platforms: Sequence[str]) -> None:
    """A sampler folder: sampler.jax_exported, sampler.mlir, params.safetensors and
    config.json (`info` + the platforms and the calling convention version)."""
    os.makedirs(sdir, exist_ok=True)
    write_exported(exp, os.path.join(sdir, SAMPLER_FILE))
    with open(os.path.join(sdir, "sampler.mlir"), "w") as f:
        f.write(exp.mlir_module())
    save_params(params, os.path.join(sdir, PARAMS_FILE))
    write_json(os.path.join(sdir, "config.json"), {
        **info, "platforms": list(platforms),
        "calling_convention_version": exp.calling_convention_version})


def export_stablehlo(cascade, settings, root: str, platforms: Sequence[str] = PLATFORMS,
                     progress=None) -> dict:
    """Writes the text encoder and every stage's sampler under `root` (see module docstring).

    Args:
      cascade: a loaded `jaxt2i.cascade.Cascade`.
      settings: per-stage `StageSettings` to bake in (sampler, steps, guidance, ...).
      root: an empty directory.
      platforms: lowering platforms.
      progress: optional callable(str) for progress lines.

    Returns:
      the cascade.json record.
    """
    from jaxt2i.text.encoder import save_encoder

    say = progress or (lambda msg: None)
    enc = cascade.encoder
    L, D = enc.max_length, enc.config.d_model
    (b,) = jax.export.symbolic_shape("B")

    tdir = os.path.join(root, "text_encoder")
    save_encoder(enc, tdir)
    say("text encoder: lowering encode()")
    exp = export_fn(cascade.encode_fn, (params_spec(enc.params),
                                       jax.ShapeDtypeStruct((b, L), jnp.int32),
                                       jax.ShapeDtypeStruct((b, L), jnp.bool_)),
                  platforms, "the text encoder")
    write_exported(exp, os.path.join(tdir, ENCODER_FILE))
    save_params(enc.params, os.path.join(tdir, PARAMS_FILE))

    names = []
    prev_size = None
    for k, (stage, st) in enumerate(zip(cascade.stages, settings)):
        name = stage_dir_name(k, stage.unet_cfg)
        names.append(name)
        c = stage.unet_cfg
        args = [params_spec(stage.params), jax.ShapeDtypeStruct((b, L, D), jnp.float32),
                jax.ShapeDtypeStruct((b, L), jnp.bool_), jax.ShapeDtypeStruct((b, L, D), jnp.float32),
                jax.ShapeDtypeStruct((b, L), jnp.bool_), jax.ShapeDtypeStruct((2,), jnp.uint32)]
        inputs = ["params", "emb [B, L, D] float32", "mask [B, L] bool",
                  "u_emb [B, L, D] float32 (the empty prompt, or negative prompts)",
                  "u_mask [B, L] bool", "key_data uint32[2]"]
        if stage.is_sr:
            args.append(jax.ShapeDtypeStruct((b, prev_size, prev_size, c.channels), jnp.float32))
            inputs.append(f"lowres [B, {prev_size}, {prev_size}, {c.channels}] float32 in [-1, 1]")
        if stage.image_embed_dim:  # an unCLIP decoder
            args.append(jax.ShapeDtypeStruct((b, stage.image_embed_dim), jnp.float32))
            inputs.append(f"image_embed [B, {stage.image_embed_dim}] float32, unit-norm CLIP "
                          "image embeddings (the prior's)")
        size = c.image_size
        args += [jax.ShapeDtypeStruct((b, size, size, c.channels), jnp.float32),
                 jax.ShapeDtypeStruct((b, size, size, 1), jnp.float32),
                 jax.ShapeDtypeStruct((), jnp.float32)]
        inputs += [f"init [B, {size}, {size}, {c.channels}] float32 in [-1, 1] (any values "
                   "when strength is 1 and the mask all ones)",
                   f"inpaint_mask [B, {size}, {size}, 1] float32, 1 = generate (all ones: no "
                   "inpainting)", "strength float32 scalar in (0, 1] (1: from noise)"]
        say(f"stage {k}: lowering the {st.sampler} sampler ({st.steps} steps)")
        exp = export_fn(stage_sampler(cascade, k, st), args, platforms, f"stage {k} ({name})")
        save_sampler(os.path.join(root, name), exp, stage.params, {
            "config": stage.config.to_dict(), "step": stage.step, "settings": st.to_dict(),
            "inputs": inputs, "output": f"[B, {size}, {size}, {c.channels}] float32 in [-1, 1]"},
            platforms)
        prev_size = c.image_size
    record = {"format": "stablehlo", "stages": names, "text_encoder": "text_encoder",
              "max_length": L, "key_data": "jax.random.key_data(jax.random.fold_in("
              "jax.random.key(seed), stage_index))",
              "uncond_prompt": "the empty prompt, or a negative prompt per image",
              "images": "uint8 = clip((x + 1) * 127.5 + 0.5, 0, 255)"}
    write_json(os.path.join(root, "cascade.json"), record)
    return record


def load_exported(path: str):
    """A serialised `jax.export.Exported` (call it with `.call(*args)`)."""
    with open(path, "rb") as f:
        return jax.export.deserialize(bytearray(f.read()))


def run_exported(root: str, prompts: Sequence[str], seed: int = 0,
                 negative_prompts: Sequence[str] | None = None) -> np.ndarray:
    """Samples from a StableHLO export with `jax.export.deserialize` (no model code).

    Returns [B, H, W, 3] uint8 images, equal to `Cascade.sample(prompts, seed,
    negative_prompts=...)` with the settings baked into the export; for an unCLIP export
    (cascade.json "kind": "unclip"), to `UnCLIP.generate(prompts, seed)`: the exported CLIP
    text tower and prior sampler give the decoder's image embeddings
    (`unclip_export.run_exported_prior`).
    """
    import json

    from jaxt2i.text.tokenizer import load_tokenizer

    with open(os.path.join(root, "cascade.json")) as f:
        record = json.load(f)
    tdir = os.path.join(root, record["text_encoder"])
    tok = load_tokenizer(tdir, max_length=record["max_length"])
    encode = load_exported(os.path.join(tdir, ENCODER_FILE))
    tparams = load_params(os.path.join(tdir, PARAMS_FILE))
    ids, mask = tok(list(prompts))
    emb, mask = encode.call(tparams, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool))
    negs = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    uids, umask = tok(negs)
    u_emb, u_mask = encode.call(tparams, jnp.asarray(uids, jnp.int32), jnp.asarray(umask, bool))
    root_key = jax.random.key(seed)
    x = z = None
    if record.get("kind") == "unclip":
        from jaxt2i.export.unclip_export import run_exported_prior

        prior_key, root_key = jax.random.split(root_key)
        z = run_exported_prior(root, record, prompts, jax.random.key_data(prior_key))
    for k, name in enumerate(record["stages"]):
        sdir = os.path.join(root, name)
        sampler = load_exported(os.path.join(sdir, SAMPLER_FILE))
        params = load_params(os.path.join(sdir, PARAMS_FILE))
        key_data = jax.random.key_data(jax.random.fold_in(root_key, k))
        size = int(sampler.out_avals[0].shape[1])
        cond = [x] if x is not None else [z] if z is not None else []
        x = sampler.call(params, emb, mask, u_emb, u_mask, key_data, *cond,
                         *plain_edit_inputs(len(prompts), size))
    return np.asarray(jnp.clip((x + 1) * 127.5 + 0.5, 0, 255)).astype(np.uint8)
