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

What only unCLIP can do (paper sec. 3), from images instead of the prior: `UnCLIP.variations`
(an image's CLIP embedding decoded with DDIM at eta > 0), `UnCLIP.interpolate` (between two
images' embeddings, `slerp`) and `UnCLIP.text_diff` (an image's embedding rotated toward a
caption change, `text_diff_embeds`); `edit_to_dir` is their command-line form.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
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
        self._fns, self._vision = {}, None

    def generate(self, prompts: Sequence[str], seed: int = 0) -> np.ndarray:
        """One image per prompt: [B, H, W, 3] uint8 of the last stage.

        The prior samples with key split(key(seed))[0]; stage k with fold_in(split(...)[1], k).
        """
        prompts = list(prompts)
        self.check_prompts(prompts)
        prior_key, stage_key = jax.random.split(jax.random.key(seed))
        try:
            z = self.prior.embed_prompts(self.clip, prompts, prior_key)  # [B, P]
        except ValueError as e:  # a prompt a closed-vocabulary tokenizer cannot read
            raise ConfigError(str(e)) from None
        return self._decode(z, prompts, stage_key)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raises ConfigError (one line) for prompts the cascade cannot read: none at all, a
        prompt the stages' text encoder refuses (too long, or words a closed vocabulary lacks)
        or, with the bundled CLIP (trained on English captions only), a prompt in another
        script (its byte-level tokenizer reads anything, so the prior would sample from text
        its CLIP never learned)."""
        if not prompts:
            raise ConfigError("no prompts given: pass --prompt TEXT (repeatable)")
        if self.prior.clip_path == "bundled":
            for p in prompts:
                if not p.isascii():
                    short = p if len(p) <= 40 else p[:40] + "..."
                    raise ConfigError(
                        f"prompt {short!r}: the bundled unCLIP demo's CLIP was trained on "
                        "English captions only; write it in English, e.g. 'a red circle above "
                        "a blue square', or use --model=imagen, whose text encoder reads "
                        "Chinese too")
        from jaxt2i.cascade import check_encoder_prompts

        check_encoder_prompts(self.encoder, self.encoder.max_length, prompts)

    def settings(self, overrides=None, num_stages: int | None = None) -> list:
        """The decoder's and SR stages' saved sampling settings (`StageSettings`); unCLIP
        directories take no per-stage overrides yet."""
        self._whole(num_stages, "per-stage settings", bool(overrides and any(overrides)))
        return [s.config.sample for s in self.stages]

    def sample(self, prompts: Sequence[str], seed: int = 0, *, settings=None,
               num_stages: int | None = None) -> np.ndarray:
        """`generate` under `Cascade.sample`'s signature (what `jaxt2i.eval` calls): the whole
        cascade with its saved settings, one image per prompt."""
        self._whole(num_stages, "per-stage settings",
                    settings is not None and list(settings) != self.settings())
        return self.generate(prompts, seed)

    def _whole(self, num_stages, what: str, given: bool) -> None:
        if num_stages not in (None, len(self.stages)):
            raise ConfigError(f"an unCLIP cascade runs all its {len(self.stages)} stages "
                              f"(prior -> decoder -> SR) so far; drop --stages={num_stages}")
        if given:
            raise ConfigError(f"an unCLIP cascade samples with its saved settings so far; "
                              f"drop the {what}")

    def image_embeds(self, images) -> np.ndarray:
        """Images -> unit-norm CLIP image embeddings [B, P] (the scale the prior samples at).

        The decoder's CLIP (its `clip.path`) embeds each image as CLIP's training preprocesses
        it (`CLIP.encode_image`: shorter side resized to the tower's size, centre crop, CLIP's
        mean / std), so images of any size work. `images`: [H, W, 3] uint8 arrays (a list, or
        one [B, H, W, 3] array).
        """
        if self._vision is None:  # the vision tower only when an image mode asks for it
            from jaxt2i.prior_stage import load_frozen_clip

            self._vision = load_frozen_clip(self.stages[0].config.clip, towers=("vision",))
        return np.concatenate([_unit(np.asarray(self._vision.encode_image(
            np.asarray(im)[None]).embeds, np.float64)) for im in images]).astype(np.float32)

    def variations(self, image, num_images: int = 1, seed: int = 0, *, eta: float = 1.0,
                   prompt: str = "") -> np.ndarray:
        """`num_images` variations of `image` ([H, W, 3] uint8; paper sec. 3.1): its CLIP image
        embedding, with `prompt` ('' = none), through the decoder sampled by DDIM at `eta` (> 0:
        each variation takes its own noise path; 1 = DDPM's step variance), then the SR stages.
        Keys as `generate`'s stages: [N, H, W, 3] uint8."""
        check_options(num_images=num_images, eta=eta)
        z = np.repeat(self.image_embeds([image]), num_images, axis=0)
        return self._decode(z, [prompt] * num_images, _stage_key(seed), sampler=_ddim(eta))

    def interpolate(self, image_a, image_b, frames: int = 5, seed: int = 0, *,
                    eta: float = 0.0, prompt: str = "") -> np.ndarray:
        """`frames` images from `image_a`'s CLIP embedding to `image_b`'s (paper sec. 3.2):
        slerp(z_a, z_b, k / (frames - 1)), every frame decoded with the same noise, so frames
        differ only through the embedding: [frames, H, W, 3] uint8."""
        check_options(frames=frames, eta=eta)
        za, zb = self.image_embeds([image_a, image_b])
        return self._frames(slerp(za, zb, np.linspace(0.0, 1.0, frames)), prompt, seed, eta)

    def text_diff(self, image, from_caption: str, to_caption: str, frames: int = 5,
                  seed: int = 0, *, max_theta: float = 0.5, eta: float = 0.0,
                  prompt: str = "") -> np.ndarray:
        """`image` edited along a caption change (paper sec. 3.3): its CLIP embedding rotated
        toward z_d = normalize(z_t(to_caption) - z_t(from_caption)) (the prior's CLIP text
        embeddings), slerp(z_i, z_d, theta) for `frames` thetas from 0 to `max_theta` (the
        paper: 0.25 to 0.5), decoded with one noise as `interpolate`: [frames, H, W, 3]."""
        check_options(frames=frames, max_theta=max_theta, eta=eta)
        z_i = self.image_embeds([image])[0]
        try:
            old, new = np.asarray(self.clip.encode_text([from_caption, to_caption]).embeds)
        except ValueError as e:  # a caption a closed-vocabulary tokenizer cannot read
            raise ConfigError(str(e)) from None
        thetas = np.linspace(0.0, max_theta, frames)
        return self._frames(text_diff_embeds(z_i, old, new, thetas), prompt, seed, eta)

    def _frames(self, z, prompt: str, seed: int, eta: float) -> np.ndarray:
        return self._decode(z, [prompt], _stage_key(seed), sampler=_ddim(eta), shared=True)

    def _decode(self, z, prompts: list[str], stage_key, *, sampler=None,
                shared: bool = False) -> np.ndarray:
        """Embeddings z [B, P] -> the decoder (`sampler` replacing its saved one) -> the SR
        stages, stage k keyed fold_in(stage_key, k). `shared`: one prompt for all rows, and
        every row sampled alone with the same key, so all rows get the same noise."""
        from jaxt2i.images import to_uint8

        try:
            emb, mask = self.encoder.encode(prompts)
            u_emb, u_mask = self.encoder.encode([""])
        except ValueError as e:  # a prompt a closed-vocabulary tokenizer cannot read
            raise ConfigError(str(e)) from None
        text = (emb.astype(np.float32), mask)
        uncond = (u_emb.astype(np.float32), u_mask)
        x = None
        for k, stage in enumerate(self.stages):
            fn = self._stage_fn(k, sampler if k == 0 else None, shared)
            x = fn(stage.params, text, uncond, jax.random.fold_in(stage_key, k), x,
                   jnp.asarray(z, jnp.float32) if k == 0 else None)
        return to_uint8(np.asarray(x))

    def _stage_fn(self, k: int, sampler, shared: bool):
        """Stage k's whole reverse process, jitted once per (sampler, shared)."""
        if (k, sampler, shared) not in self._fns:
            stage = self.stages[k]

            def run(params, text, uncond, rng, lowres, z):
                return stage.sample(params, text, uncond, rng, lowres, image_embed=z,
                                    settings=stage.config.sample, sampler=sampler)

            def run_rows(params, text, uncond, rng, lowres, z):  # [B, ...] rows, one key
                one = lambda a: None if a is None else a[None]  # noqa: E731
                return jax.vmap(lambda lo, zz: run(params, text, uncond, rng, one(lo),
                                                   one(zz))[0])(lowres, z)

            self._fns[k, sampler, shared] = jax.jit(run_rows if shared else run)
        return self._fns[k, sampler, shared]


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def slerp(a, b, t) -> np.ndarray:
    """Spherical interpolation between the directions of `a` and `b` ([P]): [K, P] unit
    vectors for the fractions `t` [K] (t = 0: a / |a|, t = 1: b / |b|; the angle from a grows
    linearly with t, on the great circle through both). Parallel a, b give a / |a| for every t;
    opposite ones (no unique great circle) are refused."""
    a, b = _unit(a), _unit(b)
    t = np.asarray(t, np.float64)[:, None]
    omega = math.acos(float(np.clip(a @ b, -1.0, 1.0)))
    if math.sin(omega) < 1e-7:
        if omega > 1.0:
            raise ValueError("slerp between opposite directions is not defined (no unique "
                             "great circle)")
        return np.repeat(a[None], len(t), axis=0).astype(np.float32)
    out = (np.sin((1.0 - t) * omega) * a + np.sin(t * omega) * b) / math.sin(omega)
    return out.astype(np.float32)


def text_diff_embeds(image_embed, from_text, to_text, thetas) -> np.ndarray:
    """Paper sec. 3.3: z_d = normalize(to_text - from_text) (CLIP text embeddings [P]) and
    slerp(image_embed, z_d, theta) for each theta [K] -> [K, P] unit vectors."""
    diff = np.asarray(to_text, np.float64) - np.asarray(from_text, np.float64)
    if not np.linalg.norm(diff) > 0:
        raise ConfigError("the two captions have the same CLIP text embedding, so there is no "
                          "direction to move along; give captions that differ")
    return slerp(image_embed, diff, thetas)


def _stage_key(seed: int):
    """The stages' key of `generate` for `seed` (the prior's half unused)."""
    return jax.random.split(jax.random.key(seed))[1]


def _ddim(eta: float):
    from jaxt2i import diffusion

    return diffusion.DDIM(eta=float(eta))


def check_options(*, num_images=None, frames=None, eta=None, max_theta=None, **_) -> None:
    """One-line ConfigErrors for the image modes' options (None = not given; others, such as
    the captions, are not checked here)."""
    for name, value, lowest in (("num_images", num_images, 1), ("frames", frames, 2)):
        if value is not None and (isinstance(value, bool) or not isinstance(
                value, (int, np.integer)) or value < lowest):
            raise ConfigError(f"{name}={value!r} must be an integer >= {lowest}")
    if eta is not None and not (isinstance(eta, (int, float)) and math.isfinite(eta) and
                                eta >= 0):
        raise ConfigError(f"eta={eta!r} must be a number >= 0 (0 = deterministic DDIM, 1 = "
                          "DDPM's step variance)")
    if max_theta is not None and not (isinstance(max_theta, (int, float)) and
                                      0.0 < max_theta <= 1.0):
        raise ConfigError(f"max_theta={max_theta!r} must be in (0, 1] (the paper: 0.25 to 0.5)")


def load_unclip(path: str) -> UnCLIP:
    """Loads an unCLIP directory (see the module docstring); ConfigError (one line) if it is
    not one or its parts do not fit together."""
    from jaxt2i.prior_stage import load_frozen_clip, load_prior
    from jaxt2i.stage import Stage, load_text_encoder, resolve_export_dir

    spec = read_spec(path)
    if spec is None:
        raise ConfigError(f"{path!r} has no {CASCADE_FILE} with \"kind\": \"{KIND}\"")
    prior = load_prior(os.path.join(path, spec["prior"]))
    stages = [Stage.read(resolve_export_dir(os.path.normpath(os.path.join(path, s))))
              .load_params() for s in spec["stages"]]  # e.g. ../demo_cascade/sr
    encoder = load_text_encoder(stages[0].config.text, from_checkpoint=True, base=stages[0].path)
    clip = load_frozen_clip(prior.clip_path, towers=("text",))
    return UnCLIP(prior, clip, stages, encoder)


# The image modes of `edit_to_dir`: their command-line flag, and how many images they read.
MODES = {"variations": ("--variations_of", 1), "interpolate": ("--interpolate", 2),
         "text_diff": ("--text_diff", 1)}


def sample_to_dir(path: str, prompts: Sequence[str], out: str, *, num_images: int = 1,
                  seed: int = 0) -> dict:
    """Samples `num_images` per prompt and writes out/NNN.png, grid.png and sample.json."""
    pipe = load_unclip(path)
    batch = [p for p in prompts for _ in range(num_images)]
    images = pipe.generate(batch, seed)
    return _write(out, images, pipe, {"checkpoint": os.path.abspath(path), "prompts": batch,
                                      "seed": seed, "prior": vars(pipe.prior.settings)})


def edit_to_dir(path: str, mode: str, image_paths: Sequence[str], out: str, *, seed: int = 0,
                prompt: str = "", **options) -> dict:
    """An image mode of `UnCLIP` from image files, written as `sample_to_dir` writes.

    Args:
      mode: 'variations' (one image; options num_images, eta), 'interpolate' (two images;
        frames, eta) or 'text_diff' (one image; from_caption, to_caption, frames, max_theta,
        eta); options left out take the method's defaults.
      image_paths: the image files (read before the cascade is loaded: a wrong path fails
        fast, in one line naming the flag).
      prompt: the decoder's caption ('' = none).
    """
    from jaxt2i.images import read_image

    flag, count = MODES[mode]
    if len(image_paths) != count:
        raise ConfigError(f"{flag} takes {count} image file{'s' * (count > 1)}"
                          f"{' (A.png,B.png)' if count > 1 else ''}, got {len(image_paths)}")
    options = {k: v for k, v in options.items() if v is not None}
    check_options(**options)  # before the cascade is loaded
    images = [read_image(p, what=flag) for p in image_paths]
    pipe = load_unclip(path)
    out_images = getattr(pipe, mode)(*images, seed=seed, prompt=prompt, **options)
    return _write(out, out_images, pipe, {
        "checkpoint": os.path.abspath(path), "mode": mode, "inputs": [
            os.path.abspath(p) for p in image_paths], "prompt": prompt, "seed": seed, **options})


def _write(out: str, images: np.ndarray, pipe: UnCLIP, record: dict) -> dict:
    """out/NNN.png per image, grid.png, and sample.json (`record` + names + stage settings);
    `out` may be a URL (written locally, then uploaded)."""
    from PIL import Image

    from jaxt2i import paths
    from jaxt2i.images import save_grid

    names = [f"{i:03d}.png" for i in range(len(images))]
    record = {"kind": KIND, **record, "images": names,
              "stages": [s.config.sample.to_dict() for s in pipe.stages]}
    with paths.local_dir(out) as local:
        os.makedirs(local, exist_ok=True)
        for name, img in zip(names, images):
            Image.fromarray(img).save(os.path.join(local, name))
        save_grid(images, os.path.join(local, "grid.png"))
        with open(os.path.join(local, "sample.json"), "w") as f:
            json.dump(record, f, indent=2)
    return record
