"""A trained unCLIP diffusion prior: its config, params, the CLIP it was trained on, and one
compiled reverse process.

    prior = load_prior("runs/prior/export")          # config.json + params.safetensors
    clip = prior.load_clip()                         # the frozen CLIP it reads
    z = prior.embed_prompts(clip, ["a red circle"], jax.random.key(0))   # [1, clip_dim]

The export is what `python -m jaxt2i.train --config=configs/prior.py` writes to WORKDIR/export:
the EMA params (safetensors) and the run's config (`kind: 'prior'`, the model section with the
CLIP's widths filled in, `clip.path`, the sampling defaults). Training evaluates through the
same object, so what the log reports is what a loaded export samples.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.config import ConfigError
from jaxt2i.models import prior as prior_lib

KIND = "prior"


@dataclasses.dataclass(frozen=True)
class PriorSettings:
    """How the prior is sampled (hashable: a static argument of the jitted sampler).

    Attributes:
      sampler: a `jaxt2i.diffusion` sampler name ('ddim' as in the paper's 64-step runs).
      steps: sampler steps.
      guidance: classifier-free guidance scale (1 = the conditional prediction alone).
      num_candidates: samples per caption; the one nearest the caption's text embedding is
        kept (paper sec. 2.1: 2).
    """

    sampler: str = "ddim"
    steps: int = 64
    guidance: float = 1.0
    num_candidates: int = 2

    @classmethod
    def from_config(cls, sample: Mapping[str, Any]) -> "PriorSettings":
        """From a config's `sample` section (fields it lacks keep their defaults)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: type(getattr(cls, k))(sample[k]) for k in names if k in sample})


def resolve_clip_path(path: str) -> str:
    """'bundled' -> the shipped demo CLIP's directory; anything else as given."""
    if path == "bundled":
        from jaxt2i.assets import demo_clip_dir

        return demo_clip_dir()
    return path


def load_frozen_clip(path: str, towers=("text", "vision")):
    """The frozen CLIP a prior or decoder config names (`clip.path`); ConfigError if unreadable."""
    from jaxt2i.text.clip_convert import load_clip

    try:
        return load_clip(resolve_clip_path(path), towers=towers)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"clip.path={path!r}: {e}") from None


def model_config(model: Mapping[str, Any], clip=None) -> prior_lib.PriorConfig:
    """The PriorConfig of a config's `model` section; clip_dim / text_dim / max_text_len 0
    take `clip`'s (its projection width, text-tower width and tokenizer length)."""
    d = dict(model)
    if clip is not None:
        fill = {"clip_dim": clip.config.projection_dim, "text_dim": clip.config.text.width,
                "max_text_len": clip.tokenizer.max_length if clip.tokenizer is not None
                else clip.config.text.max_length}
        for k, v in fill.items():
            if int(d.get(k, 0)) <= 0:
                d[k] = v
            elif k != "max_text_len" and int(d[k]) != v:
                raise ConfigError(f"model.{k}={d[k]} does not fit the CLIP (its is {v}); set "
                                  f"--config.model.{k}=0 (the CLIP's)")
    try:
        return prior_lib.PriorConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


class PriorStage:
    """A diffusion prior with its schedule, sampling settings and (once loaded) params.

    Attributes:
      config: the `PriorConfig`; model: the `DiffusionPrior`.
      schedule: the noise schedule's name; settings: the default `PriorSettings`.
      clip_path: the CLIP its inputs and outputs live in ('bundled' = the demo CLIP).
      params: {'params': ...} variables (None until set); path, step: where it came from.
    """

    def __init__(self, config: prior_lib.PriorConfig, *, schedule: str = "cosine",
                 settings: PriorSettings = PriorSettings(), clip_path: str = "bundled",
                 params: Any = None, path: str = "", step: int | None = None):
        self.config = config
        self.model = prior_lib.DiffusionPrior(config)
        self.schedule = schedule
        self.settings = settings
        self.clip_path = clip_path
        self.params = params
        self.path = path
        self.step = step
        self._jit_sample = jax.jit(self.sample, static_argnames=("settings", "return_candidates"))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], clip=None, **kwargs) -> "PriorStage":
        """From a prior training config (dict); `clip` fills the model's zero widths."""
        return cls(model_config(config["model"], clip), schedule=config["diffusion"]["schedule"],
                   settings=PriorSettings.from_config(config["sample"]),
                   clip_path=config["clip"]["path"], **kwargs)

    def load_clip(self):
        """The frozen CLIP this prior was trained on (text tower for sampling, both for eval)."""
        return load_frozen_clip(self.clip_path)

    def sample(self, params, text_tokens, text_mask, text_embed, rng, *,
               settings: PriorSettings | None = None, return_candidates: bool = False):
        """The whole reverse process (traceable; one `lax.scan`): CLIP text features ->
        unit-norm image embeddings [B, clip_dim] (see `prior_lib.sample_prior`)."""
        s = settings or self.settings
        return prior_lib.sample_prior(
            self.model, params, text_tokens, text_mask, text_embed, rng,
            schedule=self.schedule, num_candidates=s.num_candidates,
            guidance=None if s.guidance == 1 else s.guidance, steps=s.steps, sampler=s.sampler,
            return_candidates=return_candidates)

    def generate(self, text_tokens, text_mask, text_embed, rng, *, params=None,
                 settings: PriorSettings | None = None, return_candidates: bool = False):
        """`sample` jitted once per settings (the loaded params unless `params`)."""
        params = self.params if params is None else params
        if params is None:
            raise ValueError("this PriorStage has no params: load_prior(dir) or pass params=")
        return self._jit_sample(params, jnp.asarray(text_tokens, jnp.float32),
                                jnp.asarray(text_mask, bool), jnp.asarray(text_embed, jnp.float32),
                                rng, settings=settings or self.settings,
                                return_candidates=return_candidates)

    def embed_prompts(self, clip, prompts, rng, **kwargs):
        """Prompts -> CLIP text (of `clip`) -> sampled image embeddings [B, clip_dim]."""
        text = clip.encode_text(list(prompts))
        return self.generate(text.states, text.mask, text.embeds, rng, **kwargs)

    def __repr__(self) -> str:
        return (f"PriorStage(clip_dim {self.config.clip_dim}, width {self.config.width} x "
                f"{self.config.layers}, {self.path or 'in memory'}, step {self.step})")


def export_prior(params: Any, config: Mapping[str, Any], prior: PriorStage, out_dir: str,
                 step: int) -> str:
    """Writes the prior's params and its config (the model section resolved) to `out_dir`."""
    from jaxt2i.checkpoint import export_params

    config = dict(config, kind=KIND, model=prior.config.to_dict())
    return export_params(params["params"], config, out_dir, step=step)


def load_prior(path: str) -> PriorStage:
    """Reads a prior export (or a training workdir's export/) into a `PriorStage` with params.

    Raises ConfigError (one line) when `path` holds no prior export or one that does not fit
    its config.
    """
    from jaxt2i.checkpoint import flatten, load_exported

    for d in (path, os.path.join(path, "export")):
        if os.path.exists(os.path.join(d, "params.safetensors")):
            path = d
            break
    else:
        raise ConfigError(f"{path!r} is not a prior export (params.safetensors + config.json); "
                          "train one with python -m jaxt2i.train --config=configs/prior.py")
    params, config, step = load_exported(path)
    if config.get("kind") != KIND:
        raise ConfigError(f"{path!r} holds a {config.get('kind') or 'cascade stage'!r} export, "
                          "not a diffusion prior's")
    stage = PriorStage.from_config(config, path=path, step=step)
    want = {k: tuple(v.shape) for k, v in flatten(nn.unbox(
        prior_lib.param_shapes(stage.config))["params"]).items()}
    got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    if want != got:
        bad = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise ConfigError(f"{path!r}: params.safetensors does not fit its config.json (first "
                          f"difference: {bad[0]}); export the prior again")
    stage.params = {"params": jax.tree_util.tree_map(jnp.asarray, params)}
    return stage
