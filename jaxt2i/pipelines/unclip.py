"""The unCLIP (DALL·E 2) pipeline: prompt -> CLIP text -> prior -> decoder -> SR stages.

    pipe = load_unclip("runs/unclip")            # a directory whose cascade.json says unclip
    images = pipe.generate(["a red circle above a blue square"], seed=0)  # [B, H, W, 3] uint8

`cascade.json` of an unCLIP directory:

    {"kind": "unclip", "prior": "prior", "stages": ["decoder", "sr"]}

`prior` is a `jaxt2i.prior_stage.load_prior` export; `stages` are stage exports, the first an
unCLIP decoder (`model.image_embed_dim` > 0, conditioned on the same CLIP as the prior), the
others the Imagen super-resolution stages. The prior draws `num_candidates` (2) embeddings per
caption and keeps the one with the higher dot product with the caption's CLIP text embedding;
each of the prior, the decoder and every SR stage is ONE jitted reverse process.
`python -m jaxt2i.sample --checkpoint=DIR --prompt ...` runs it (`sample_to_dir`).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import numpy as np

from jaxt2i.config import ConfigError

KIND = "unclip"
CASCADE_FILE = "cascade.json"


def read_spec(path: str) -> dict | None:
    """The cascade.json of an unCLIP directory, or None when `path` is not one."""
    spec_path = os.path.join(path, CASCADE_FILE)
    if not os.path.isfile(spec_path):
        return None
    try:
        with open(spec_path) as f:
            spec = json.load(f)
    except ValueError:
        return None  # the Imagen cascade's reader reports a broken file
    if not isinstance(spec, dict) or spec.get("kind") != KIND:
        return None
    if not isinstance(spec.get("prior"), str) or not isinstance(spec.get("stages"), list) or \
            not spec["stages"] or not all(isinstance(s, str) for s in spec["stages"]):
        raise ConfigError(f"{spec_path} must hold \"prior\": a sub-directory and \"stages\": a "
                          "non-empty list of sub-directories (the decoder first)")
    return spec


class UnCLIP:
    """A loaded unCLIP cascade.

    Attributes:
      prior: the `PriorStage`; clip: the CLIP (text tower) it reads.
      stages: the decoder `Stage`, then the SR stages; encoder: their text encoder (T5).
    """

    def __init__(self, prior, clip, stages, encoder):
        from jaxt2i.cascade import check_compatible

        decoder = stages[0]
        if not decoder.image_embed_dim or decoder.is_sr:
            raise ConfigError(f"the first stage ({decoder.path}) must be an unCLIP decoder (a "
                              "base stage with model.image_embed_dim > 0)")
        if decoder.image_embed_dim != prior.config.clip_dim:
            raise ConfigError(f"the decoder takes {decoder.image_embed_dim}-wide embeddings but "
                              f"the prior makes {prior.config.clip_dim}-wide ones")
        if decoder.config.clip != prior.clip_path:
            raise ConfigError(f"the decoder was trained on CLIP {decoder.config.clip!r} but the "
                              f"prior on {prior.clip_path!r}; they must share one CLIP")
        check_compatible(stages, encoder.config.d_model, unclip=True)  # SR chain, one T5
        self.prior, self.clip, self.stages, self.encoder = prior, clip, list(stages), encoder
        for s in self.stages:
            s.encoder = encoder
        self._samplers = [jax.jit(s.sample, static_argnames=("settings",)) for s in self.stages]

    def generate(self, prompts: Sequence[str], seed: int = 0) -> np.ndarray:
        """One image per prompt: [B, H, W, 3] uint8 of the last stage.

        The prior samples with key split(key(seed))[0]; stage k with fold_in(split(...)[1], k).
        """
        from jaxt2i.images import to_uint8

        prompts = list(prompts)
        if not prompts:
            raise ConfigError("no prompts given: pass --prompt TEXT (repeatable)")
        prior_key, stage_key = jax.random.split(jax.random.key(seed))
        try:
            z = self.prior.embed_prompts(self.clip, prompts, prior_key)  # [B, P]
            emb, mask = self.encoder.encode(prompts)
            u_emb, u_mask = self.encoder.encode([""])
        except ValueError as e:  # a prompt a closed-vocabulary tokenizer cannot read
            raise ConfigError(str(e)) from None
        text = (emb.astype(np.float32), mask)
        uncond = (u_emb.astype(np.float32), u_mask)
        x = None
        for k, (stage, fn) in enumerate(zip(self.stages, self._samplers)):
            x = fn(stage.params, text, uncond, jax.random.fold_in(stage_key, k), x,
                   settings=stage.config.sample, image_embed=z if k == 0 else None)
        return to_uint8(np.asarray(x))


def load_unclip(path: str) -> UnCLIP:
    """Loads an unCLIP directory (see the module docstring); ConfigError (one line) if it is
    not one or its parts do not fit together."""
    from jaxt2i.prior_stage import load_frozen_clip, load_prior
    from jaxt2i.stage import Stage, load_text_encoder, resolve_export_dir

    spec = read_spec(path)
    if spec is None:
        raise ConfigError(f"{path!r} has no {CASCADE_FILE} with \"kind\": \"{KIND}\"")
    prior = load_prior(os.path.join(path, spec["prior"]))
    stages = [Stage.read(resolve_export_dir(os.path.join(path, s))).load_params()
              for s in spec["stages"]]
    encoder = load_text_encoder(stages[0].config.text, from_checkpoint=True, base=stages[0].path)
    clip = load_frozen_clip(prior.clip_path, towers=("text",))
    return UnCLIP(prior, clip, stages, encoder)


def sample_to_dir(path: str, prompts: Sequence[str], out: str, *, num_images: int = 1,
                  seed: int = 0) -> dict:
    """Samples `num_images` per prompt and writes out/NNN.png, grid.png and sample.json."""
    from PIL import Image

    from jaxt2i.images import save_grid

    pipe = load_unclip(path)
    batch = [p for p in prompts for _ in range(num_images)]
    images = pipe.generate(batch, seed)
    os.makedirs(out, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        names.append(f"{i:03d}.png")
        Image.fromarray(img).save(os.path.join(out, names[-1]))
    save_grid(images, os.path.join(out, "grid.png"))
    record = {"kind": KIND, "checkpoint": os.path.abspath(path), "prompts": batch, "seed": seed,
              "images": names, "prior": vars(pipe.prior.settings),
              "stages": [s.config.sample.to_dict() for s in pipe.stages]}
    with open(os.path.join(out, "sample.json"), "w") as f:
        json.dump(record, f, indent=2)
    return record
