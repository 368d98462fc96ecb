"""The sampling cascade: prompts -> tokenizer -> frozen T5 -> stage 0 -> stage 1 (-> 2) -> images.

    cascade = load_cascade(["runs/base/export", "runs/sr/export"])   # or a cascade directory
    images = cascade.sample(["a red circle above a blue square"], seed=0)  # [B, H, W, 3] uint8

Each stage is an exported U-Net (`params.safetensors` + `config.json`, see
`jaxt2i.checkpoint.export_params`). A cascade directory holds `cascade.json`
({"stages": ["base", "sr"]}) naming one export sub-directory per stage. Every stage's whole
reverse process (noise -> lax.scan of sampler steps -> x0, with classifier-free guidance against
the empty prompt and, for SR stages, noise-conditioning augmentation of the previous stage's
output at a fixed level) is ONE jitted function; a second call with the same shapes and
settings does not recompile.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i import paths as fspaths
from jaxt2i.config import ConfigError
from jaxt2i.stage import (SETTING_NAMES, Edit, Stage, StageSettings, load_text_encoder,
                          resolve_export_dir)

log = logging.getLogger("jaxt2i")

CASCADE_FILE = "cascade.json"


def resolve_stage_dirs(paths: Sequence[str]) -> list[str]:
    """Per-stage export directories from one cascade directory or a list of stage exports."""
    paths = list(paths)
    if not paths:
        raise ConfigError("no checkpoint given: pass a cascade directory or one export per stage")
    for p in paths:
        if not fspaths.exists(p):
            raise ConfigError(f"checkpoint {p!r} does not exist")
    cascade_file = fspaths.join(paths[0], CASCADE_FILE)
    if len(paths) == 1 and fspaths.exists(cascade_file):
        try:
            names = json.loads(fspaths.read_text(cascade_file))["stages"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{cascade_file} must be JSON with a 'stages' list of "
                              "sub-directories") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{cascade_file} must be JSON with a 'stages' list of "
                              "sub-directories")
        root = paths[0] if fspaths.is_url(paths[0]) else os.path.realpath(paths[0])
        paths = [fspaths.join(paths[0], n) for n in names]
        for p in paths:
            if not fspaths.exists(p):
                raise ConfigError(f"cascade stage directory {p!r} does not exist")
            if not fspaths.is_url(p) and not os.path.realpath(p).startswith(root + os.sep):
                log.warning("%s names stage %s, outside the cascade directory %s: loading it "
                            "from there", CASCADE_FILE, os.path.realpath(p), root)
    return [resolve_export_dir(p) for p in paths]


def check_compatible(stages: Sequence[Stage], text_width: int | None = None, *,
                     unclip: bool = False) -> None:
    """Raises ConfigError (one line) unless the stages chain into one cascade.

    Stage 0 must be a base stage; stage k+1 an SR stage whose lowres_size equals stage k's
    image_size; all stages share the text encoder and max_length, and their text_dim equals the
    encoder width (`text_width`, when known). Only an unCLIP cascade's (`unclip`) stage 0 may
    be an unCLIP decoder (`jaxt2i.pipelines.unclip`).
    """
    for k, s in enumerate(stages):
        c = s.unet_cfg
        if s.image_embed_dim and not (unclip and k == 0):
            raise ConfigError(f"stage {k} ({s.path}) is an unCLIP decoder (model.image_embed_dim="
                              f"{s.image_embed_dim}): it decodes CLIP image embeddings from a "
                              "prior, which the Imagen cascade has not; put it first in an "
                              "unCLIP cascade directory (docs/unclip.md)")
        if k == 0 and c.is_sr:
            raise ConfigError(f"stage 0 ({s.path}) is a super-resolution stage (lowres_size "
                              f"{c.lowres_size}); the first stage must be a base stage")
        if k > 0:
            prev = stages[k - 1].unet_cfg
            if not c.is_sr:
                raise ConfigError(f"stage {k} ({s.path}) is a base stage; every stage after the "
                                  "first must be super-resolution")
            if c.lowres_size != prev.image_size:
                raise ConfigError(f"stage {k} ({s.path}) expects {c.lowres_size} px inputs but "
                                  f"stage {k - 1} makes {prev.image_size} px images")
        t0, t = stages[0].config.text, s.config.text
        for key in ("encoder", "max_length"):
            if getattr(t, key) != getattr(t0, key):
                raise ConfigError(f"stage {k} uses text.{key}={getattr(t, key)!r} but stage 0 "
                                  f"uses {getattr(t0, key)!r}; all stages must share one text "
                                  "encoder")
        if text_width is not None and c.text_dim != text_width:
            raise ConfigError(f"stage {k} ({s.path}) has text_dim {c.text_dim} but the text "
                              f"encoder's width is {text_width}")


class Cascade:
    """A loaded cascade: text encoder + stages, with one jitted sampler per stage.

    Attributes:
      stages: the `Stage`s, base first (each with the shared encoder attached).
      encoder: the frozen text encoder (`jaxt2i.text.TextEncoder`).
      traces: per stage, how many times its sampler was traced (compiled).
      uncond: (emb [1, L, D] float32, mask [1, L] bool) of the empty prompt.
    """

    def __init__(self, stages: Sequence[Stage], encoder, *, unclip: bool = False):
        check_compatible(stages, encoder.config.d_model, unclip=unclip)
        self.unclip = unclip  # stage 0 is an unCLIP decoder (the export of an unCLIP cascade)
        self.stages = list(stages)
        self.encoder = encoder
        for s in self.stages:
            s.encoder = encoder
        self.traces = [0] * len(self.stages)
        self._encode = jax.jit(self.encode_fn)
        self._samplers = [jax.jit(self._sampler(k), static_argnames=("settings",))
                          for k in range(len(self.stages))]
        self.uncond = self.encode_ids(*encoder.tokenizer([""]))  # [1, L, D], [1, L]

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    def head(self, n: int) -> "Cascade":
        """A cascade of the first `n` stages (sharing this one's encoder and params)."""
        if not 1 <= n <= len(self.stages):
            raise ConfigError(f"stages ({n}) must be between 1 and {len(self.stages)}")
        return self if n == len(self.stages) else Cascade(self.stages[:n], self.encoder,
                                                          unclip=self.unclip)

    def encode_fn(self, text_params, ids, mask):
        """Traceable text encoding: [B, L] ids, mask -> (emb [B, L, D] float32, mask bool)."""
        return self.stages[0].encode_text(text_params, ids, mask)

    def encode_ids(self, ids, mask):
        """Jitted `encode_fn` with the encoder's params: -> (emb, mask) on the device."""
        return self._encode(self.encoder.params, jnp.asarray(ids), jnp.asarray(mask))

    def _sampler(self, k: int):
        stage = self.stages[k]

        def fn(params, emb, mask, u_emb, u_mask, rng, lowres, settings, edit=None):
            self.traces[k] += 1  # Python side effect: runs only while tracing
            return stage.sample(params, (emb, mask), (u_emb, u_mask), rng, lowres,
                                settings=settings, edit=edit)
        return fn

    def stage_fn(self, k: int):
        """Stage k's jitted reverse process: (params, emb, mask, u_emb, u_mask, rng, lowres,
        settings=StageSettings, edit=None | Edit) -> [B, H, W, C] float32 (one compilation per
        shapes, settings and kind of edit; `.lower(...)` works on it)."""
        return self._samplers[k]

    def settings(self, overrides: Sequence[dict] | None = None,
                 num_stages: int | None = None) -> list[StageSettings]:
        """Per-stage settings: each stage's saved defaults with `overrides[k]` applied."""
        n = num_stages or len(self.stages)
        overrides = list(overrides or [{}] * n)
        return [self.stages[k].config.sample.replace(**overrides[k]) for k in range(n)]

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raises ConfigError naming the first prompt longer than the text length (no truncation)
        or with text a closed-vocabulary tokenizer (the bundled encoder's) does not know."""
        if not prompts:
            raise ConfigError("no prompts given: pass --prompt TEXT (repeatable) or --prompts_file")
        check_encoder_prompts(self.encoder, self.max_length, prompts)

    def _given_lowres(self, lowres, batch: int, start_stage: int) -> jax.Array:
        """Checks images standing in for stage start_stage - 1's output; -> [B, h, w, C] float32."""
        want = self.stages[start_stage - 1].unet_cfg
        shape = (batch, want.image_size, want.image_size, want.channels)
        if lowres is None:
            raise ConfigError(f"start_stage {start_stage} needs lowres images of shape {shape}")
        if tuple(np.shape(lowres)) != shape:
            raise ConfigError(f"lowres images have shape {tuple(np.shape(lowres))} but stage "
                              f"{start_stage} takes stage {start_stage - 1}'s output {shape}")
        return jnp.asarray(_as_model_images(lowres))

    def sample(self, prompts: Sequence[str], seed: int = 0, *,
               settings: Sequence[StageSettings] | None = None, num_stages: int | None = None,
               start_stage: int = 0, lowres=None, progress: bool = False,
               return_all: bool = False, negative_prompts: Sequence[str] | str | None = None,
               init_images=None, masks=None, strength: Sequence[float] | float | None = None):
        """Generates one image per prompt through stages `start_stage` .. `num_stages` - 1.

        Args:
          prompts: B prompts (repeat a prompt for several images of it).
          seed: stage k uses the key fold_in(key(seed), k); same seed + settings -> same images.
          settings: per-stage `StageSettings` for all `num_stages` stages (default: each
            stage's saved config; entries before `start_stage` are not used).
          num_stages: how many stages to run (default: all).
          start_stage: the first stage to run; with k > 0, `lowres` stands in for the output of
            stage k - 1 (an SR stage fed given images, e.g. true renders: which stage is wrong?).
          lowres: [B, h, w, 3] images at stage `start_stage` - 1's resolution, uint8 or float
            in [-1, 1]; required exactly when start_stage > 0.
          progress: show a tqdm bar over the stages.
          return_all: also return every run stage's float output.
          negative_prompts: one per prompt, or one for all: guidance steers away from them
            (they replace the empty prompt in the unconditional branch).
          init_images: [B, H, W, 3] (uint8, or float in [-1, 1]), any size, for
            image-to-image (with `strength`) and inpainting (with `masks`); resized per stage.
          masks: [B, H, W] or [B, H, W, 1] in [0, 1] (bool, float; uint8 / 255): 1 (white)
            where the image is generated, 0 where `init_images` is kept; resized per stage.
          strength: image-to-image: per stage (a list) or for all stages, in (0, 1]; 1 (the
            default) starts a stage from noise. A stage with strength 1 and no mask runs as
            without an init image.

        Returns:
          [B, H, W, 3] uint8 images of the last stage run (and, with return_all, the list of
          per-stage [B, H_k, W_k, C] float32 numpy arrays of the stages run).
        """
        from jaxt2i.images import to_uint8

        prompts = list(prompts)
        self.check_prompts(prompts)
        n = num_stages or len(self.stages)
        if not 1 <= n <= len(self.stages):
            raise ConfigError(f"stages ({n}) must be between 1 and {len(self.stages)}")
        if not 0 <= start_stage < n:
            raise ConfigError(f"start_stage ({start_stage}) must be between 0 and {n - 1}")
        x = None
        if start_stage > 0:
            x = self._given_lowres(lowres, len(prompts), start_stage)
        elif lowres is not None:
            raise ConfigError("lowres images are only used with start_stage > 0 (an SR stage)")
        settings = list(settings) if settings is not None else self.settings(num_stages=n)
        edits = self._edits(len(prompts), n, init_images, masks, strength)
        emb, mask = self.encode_ids(*self.encoder.tokenizer(prompts))
        uncond = self.uncond
        if negative_prompts is not None:
            negs = ([negative_prompts] * len(prompts) if isinstance(negative_prompts, str)
                    else list(negative_prompts))
            if len(negs) == 1:
                negs = negs * len(prompts)
            if len(negs) != len(prompts):
                raise ConfigError(f"{len(negs)} negative prompts for {len(prompts)} prompts; "
                                  "give one for all or one per prompt")
            self.check_prompts(negs)
            uncond = self.encode_ids(*self.encoder.tokenizer(negs))
        root = jax.random.key(seed)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n - start_stage, unit="stage", dynamic_ncols=True)
        outputs = []
        for k in range(start_stage, n):
            if bar is not None:
                c = self.stages[k].unet_cfg
                bar.set_description(f"stage {k} ({c.image_size} px, {settings[k].steps} steps)")
            x = self._samplers[k](self.stages[k].params, emb, mask, *uncond,
                                  jax.random.fold_in(root, k), x, settings=settings[k],
                                  edit=edits[k])
            x = jnp.clip(x, -1.0, 1.0)  # [B, H_k, W_k, C]
            outputs.append(np.asarray(x))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        images = to_uint8(outputs[-1])
        return (images, outputs) if return_all else images


    def _edits(self, batch: int, n: int, init_images, masks, strength) -> list:
        """Per-stage `Edit`s (None where a stage samples from noise as usual)."""
        strengths = [1.0] * n
        if strength is not None:
            strengths = [strength] * n if np.ndim(strength) == 0 else list(strength)
            if len(strengths) != n:
                raise ConfigError(f"{len(strengths)} strengths for {n} stages; give one for "
                                  "all stages or one per stage")
            for v in strengths:
                if not (isinstance(v, (int, float, np.floating)) and 0 < float(v) <= 1):
                    raise ConfigError(f"strength {v!r} must be in (0, 1] (1 = from noise)")
        if init_images is None:
            if masks is not None or any(v != 1 for v in strengths):
                raise ConfigError("a mask or a strength below 1 needs an init image "
                                  "(--init_image)")
            return [None] * n
        init = _as_model_images(init_images, "init images")
        if init.ndim != 4 or init.shape[0] != batch or init.shape[-1] != 3:
            raise ConfigError(f"init images have shape {init.shape}; expected [{batch}, H, W, 3]"
                              " (one RGB image per prompt)")
        m = None
        if masks is not None:
            m = np.asarray(masks)
            if m.dtype == np.uint8:
                m = m.astype(np.float32) / 255.0
            m = m.astype(np.float32)
            if m.ndim == 3:
                m = m[..., None]
            if m.shape != init.shape[:3] + (1,):
                raise ConfigError(f"masks have shape {np.asarray(masks).shape}; expected "
                                  f"{init.shape[:3]} (one per init image, its size)")
            m = jnp.asarray(np.clip(m, 0.0, 1.0))
        init = jnp.asarray(init)
        return [None if (m is None and strengths[k] == 1) else
                Edit(init, m, None if strengths[k] == 1 else jnp.float32(strengths[k]))
                for k in range(n)]


def _as_model_images(images, what: str = "lowres images") -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] images -> float32 [-1, 1]."""
    from jaxt2i.images import to_float

    a = np.asarray(images)
    if a.dtype == np.uint8:
        return to_float(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ConfigError(f"{what} have dtype {a.dtype}; pass uint8 in [0, 255] or float "
                          "in [-1, 1] (e.g. images.astype(np.uint8))")
    return np.clip(a.astype(np.float32), -1.0, 1.0)


def load_cascade(paths: Sequence[str] | str, *, dtype: str | None = None, encoder=None,
                 text_encoder: str | None = None) -> Cascade:
    """Loads a cascade from a cascade directory or a list of per-stage export directories.

    Args:
      paths: one cascade directory (with cascade.json), or export dirs base first (a training
        workdir is accepted for its export/ sub-directory).
      dtype: compute dtype ('float32' | 'bfloat16') of the U-Nets and T5 (default: as saved).
      encoder: an already loaded text encoder (default: the stages' `text.encoder`).
      text_encoder: a directory or hub id to load the text encoder from instead of the
        stages' `text.encoder` (which must be 'bundled' or a local directory: a checkpoint
        never makes jaxt2i download anything).

    Returns:
      a `Cascade`. Raises ConfigError (one line) for a missing or incompatible checkpoint.
    """
    dirs = resolve_stage_dirs([paths] if isinstance(paths, str) else paths)
    stages = [Stage.read(d, dtype=dtype) for d in dirs]
    check_compatible(stages)
    if encoder is None:
        encoder = load_text_encoder(stages[0].config.text, override=text_encoder,
                                    from_checkpoint=True, base=stages[0].path)
    check_compatible(stages, encoder.config.d_model)
    for s in stages:
        s.load_params()
    return Cascade(stages, encoder)


__all__ = ["CASCADE_FILE", "Cascade", "SETTING_NAMES", "Stage", "StageSettings",
           "check_compatible", "load_cascade", "resolve_stage_dirs"]


def check_encoder_prompts(encoder, max_length: int, prompts: Sequence[str]) -> None:
    """Raises ConfigError naming the first prompt longer than `max_length` tokens (no
    truncation) or with text `encoder`'s closed-vocabulary tokenizer does not know."""
    for p, n in zip(prompts, encoder.tokenizer.lengths(list(prompts))):
        if n > max_length:
            short = p if len(p) <= 60 else p[:60] + "..."
            raise ConfigError(f"prompt {short!r} has {n} tokens but the text encoder's "
                              f"max_length is {max_length}; shorten it")
    try:
        encoder.tokenizer(list(prompts))  # unknown text: error or warning
    except ValueError as e:
        raise ConfigError(str(e)) from None
