"""One cascade stage: its typed config, its U-Net and params, and the functions everything calls.

    stage = Stage.load("runs/base/export", encoder=encoder)   # config.json + params.safetensors
    pred = stage.denoise(params, x_t, t, cond)                 # one U-Net evaluation
    emb, mask = stage.encode_text(text_params, ids, mask)      # the frozen text encoder
    x = stage.sample(params, (emb, mask), (u_emb, u_mask), rng, settings=...)  # reverse process

Training (`jaxt2i.train`), sampling (`jaxt2i.cascade`), the exporters, the evaluator and the
benchmarks all go through a `Stage`: none of them applies the U-Net or the text encoder, or
reads a stage's config, any other way. A stage's config is parsed once into a `StageConfig`
(typed, versioned); the JSON beside an export of an older format is brought up to date by one
function, `upgrade`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import typing
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.config import ConfigError, check_range

log = logging.getLogger("jaxt2i")

# Version of the stage config written beside an export (config.json's config.format_version).
# 1: before versioning (it had a `stage` field, 'base' | 'sr', that repeated
#    model.lowres_size, and could lack diffusion.aug_schedule and text.dtype).
# 2: `stage` removed (model.lowres_size > 0 is an SR stage); every section complete.
# 3: diffusion.aug_order; stages written before it augment the low-res image, then resize it
#    ('augment_first').
# Later additions that need no new version: `model_family` (absent = 'efficient_unet', what
# every older config is; an 'if' model section is refused by older readers, whose UNetConfig
# knows none of its fields, so it cannot be misread), diffusion.timestep_spacing (absent =
# 'trailing', the discrete schedules' default) and sample.threshold_max_value (absent = 0).
FORMAT_VERSION = 3

# Orders of an SR stage's low-res conditioning (`Stage.augment`): 'resize_first' upsamples the
# low-res image to the stage's size with the U-Net's resize, then noise-augments it (the
# Imagen paper, imagen-pytorch); 'augment_first' noise-augments the low-res image and the
# U-Net resizes it (jaxt2i before format 3, and so every stage exported then).
AUG_ORDERS = ("resize_first", "augment_first")


def upgrade(config: Mapping[str, Any], where: str = "stage config") -> dict:
    """A stage config of any format version -> the current one (a new dict; no I/O).

    A config without `model_family` holds an Efficient U-Net ('efficient_unet'), as every
    config written before the field did; the field is not added, so configs round-trip as
    written.

    Raises ConfigError for a config written by a newer jaxt2i, or one whose `stage` field
    contradicts its model.
    """
    out = copy.deepcopy(dict(config))
    version = out.get("format_version", 1)
    if not isinstance(version, int) or version < 1:
        raise ConfigError(f"{where}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ConfigError(f"{where} has format_version {version}, newer than this jaxt2i reads "
                          f"({FORMAT_VERSION}); upgrade jaxt2i")
    if version == 1:
        kind = out.pop("stage", None)
        model = out.get("model")
        if kind is not None and isinstance(model, Mapping):
            is_sr = int(model.get("lowres_size", 0) or 0) > 0
            if kind not in ("base", "sr") or (kind == "sr") != is_sr:
                raise ConfigError(f"{where}: stage {kind!r} contradicts model.lowres_size "
                                  f"({model.get('lowres_size', 0)}); export the stage again")
        if isinstance(out.get("diffusion"), dict):
            out["diffusion"].setdefault("aug_schedule", "cosine")
        if isinstance(out.get("text"), dict):
            out["text"].setdefault("dtype", "float32")
    if version < 3 and isinstance(out.get("diffusion"), dict):
        out["diffusion"].setdefault("aug_order", "augment_first")
    out["format_version"] = FORMAT_VERSION
    return out


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """How one stage is sampled (hashable: a static argument of the stage's jitted sampler).

    The single declaration of the sampling settings: the config's `sample` section, the
    per-stage command-line flags (`jaxt2i.cli`) and the exports' records all follow its fields.

    Attributes:
      sampler: 'ddpm' | 'ddim' | 'dpmpp_2m' | 'dpmpp_2m_sde' | 'dpmpp_3m' | 'dpmpp_3m_sde' |
        'euler' | 'heun' (`jaxt2i.diffusion.SAMPLER_NAMES`).
      steps: number of sampler steps (one denoiser evaluation each; 'heun': two).
      guidance: classifier-free guidance weight w (1 = no guidance, no unconditional pass).
      thresholding: 'none' | 'static' | 'dynamic'.
      aug_level: SR stages: fixed noise-augmentation level in [0, 1] of the low-res input.
      guidance_rescale: phi in [0, 1] of guidance rescale (Lin et al. 2023); 0 = off.
      guidance_t_min, guidance_t_max: guidance applies only while the normalized time
        (1 = pure noise) is in [t_min, t_max] (Kynkaanniemi et al. 2024); 0, 1 = always.
      threshold_percentile: the percentile p of dynamic thresholding (Imagen: 99.5).
      inpaint_resample: inpainting: RePaint jumps back per step (0 = none).
      spacing: the step grid: 'default' (the schedule's) | 'karras' | 'logsnr'.
      churn: EDM's S_churn for 'euler' / 'heun' (0 = deterministic).
      threshold_max_value: the largest scale s of dynamic thresholding (diffusers'
        `sample_max_value`; DeepFloyd IF: 1.5, with threshold_percentile 95); 0 = no limit
        (Imagen).

    Fields with defaults were added later: a saved config without them gets the default.
    """

    sampler: str
    steps: int
    guidance: float
    thresholding: str
    aug_level: float
    spacing: str = "default"
    churn: float = 0.0
    guidance_rescale: float = 0.0
    guidance_t_min: float = 0.0
    guidance_t_max: float = 1.0
    threshold_percentile: float = 99.5
    inpaint_resample: int = 0
    threshold_max_value: float = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):  # coerce (JSON, flags), then range-check
            kind = setting_types()[f.name]
            try:
                object.__setattr__(self, f.name, kind(getattr(self, f.name)))
            except (TypeError, ValueError):
                raise ConfigError(f"sample.{f.name}={getattr(self, f.name)!r} must be of type "
                                  f"{kind.__name__}") from None
        for name in ("steps", "guidance", "aug_level", "churn", "guidance_rescale",
                     "guidance_t_min", "guidance_t_max", "threshold_percentile",
                     "inpaint_resample", "threshold_max_value"):  # NaN / inf / range: one line
            check_range(f"sample.{name}", getattr(self, name), f"sample.{name}")
        if self.guidance_t_min > self.guidance_t_max:
            raise ConfigError(f"sample.guidance_t_min={self.guidance_t_min} is above "
                              f"sample.guidance_t_max={self.guidance_t_max}; the guidance "
                              "interval [t_min, t_max] must not be empty")
        from jaxt2i import diffusion

        if self.spacing not in diffusion.GRID_SPACINGS:
            raise ConfigError(f"sample.spacing={self.spacing!r} is not one of "
                              f"{', '.join(map(repr, diffusion.GRID_SPACINGS))}")
        if self.churn and self.sampler not in diffusion.CHURN_SAMPLERS:
            raise ConfigError(f"sample.churn={self.churn!r} applies only to the samplers "
                              f"{', '.join(map(repr, diffusion.CHURN_SAMPLERS))}, not "
                              f"{self.sampler!r}; set churn to 0")

    @classmethod
    def from_config(cls, sample_cfg: Mapping[str, Any], **overrides) -> "StageSettings":
        """Settings from a config's `sample` section, with non-None `overrides` applied."""
        get = sample_cfg.get if hasattr(sample_cfg, "get") else \
            lambda k: getattr(sample_cfg, k, None)
        values = {f.name: get(f.name) for f in dataclasses.fields(cls)  # missing: the default
                  if get(f.name) is not None or f.default is dataclasses.MISSING}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **overrides) -> "StageSettings":
        """A copy with the non-None `overrides` applied."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Edit(typing.NamedTuple):
    """What an edit gives a stage's sampler (`Stage.sample(..., edit=)`), at any resolution.

    Attributes:
      init: [B, h, w, C] float32 image in [-1, 1] (resized to each stage's size).
      mask: None (image-to-image) or [B, h, w, 1] float32 in [0, 1], 1 where the image is
        generated, 0 where `init` is kept (inpainting; resized per stage).
      strength: None (= 1: from noise) or a float32 scalar in (0, 1]: image-to-image starts
        from `init` noised to this fraction of the reverse process.
    """

    init: Any
    mask: Any = None
    strength: Any = None

    def resized(self, size: int) -> dict:
        """{'init', 'mask', 'strength'} for a stage of `size` px (antialiased resize)."""
        def fit(a):
            a = jnp.asarray(a, jnp.float32)
            if a.shape[1:3] == (size, size):
                return a
            return jax.image.resize(a, (a.shape[0], size, size, a.shape[3]), "linear",
                                    antialias=True)
        mask = None if self.mask is None else jnp.clip(fit(self.mask), 0.0, 1.0)
        return {"init": fit(self.init), "mask": mask, "strength": self.strength}


@functools.lru_cache(maxsize=None)
def setting_types() -> dict[str, type]:
    """{setting name: type} of `StageSettings`, in declaration order."""
    hints = typing.get_type_hints(StageSettings)
    return {f.name: hints[f.name] for f in dataclasses.fields(StageSettings)}


SETTING_NAMES = tuple(f.name for f in dataclasses.fields(StageSettings))


@dataclasses.dataclass(frozen=True)
class TextSpec:
    """The frozen text encoder a stage is conditioned on.

    Attributes:
      encoder: 'bundled' (the package's shapes encoder), a Hugging Face T5 directory or hub id.
      max_length: text length L in tokens.
      dtype: the encoder's compute dtype.
    """

    encoder: str
    max_length: int
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
    """What sampling needs of the stage's diffusion (the training-only fields stay in `raw`).

    Attributes:
      schedule: the noise schedule the stage was trained with (`jaxt2i.diffusion`).
      aug_schedule: schedule of the low-res input's noise-conditioning augmentation (SR); a
        discrete one's timestep is the level times its num_train_timesteps.
      aug_order: 'resize_first' | 'augment_first' (`AUG_ORDERS`, `Stage.augment`).
      timestep_spacing: the sampling timesteps of a discrete schedule (diffusers'
        `timestep_spacing`: 'trailing' | 'leading' | 'linspace' | 'linspace_exclusive';
        DeepFloyd IF's DDPMScheduler: 'leading').
    """

    schedule: str
    aug_schedule: str = "cosine"
    aug_order: str = "augment_first"
    timestep_spacing: str = "trailing"

    def __post_init__(self):
        from jaxt2i.diffusion import schedules

        if self.aug_order not in AUG_ORDERS:
            raise ConfigError(f"diffusion.aug_order={self.aug_order!r} is not allowed; allowed "
                              f"values: {', '.join(AUG_ORDERS)}")
        if self.timestep_spacing not in schedules.SPACINGS:
            raise ConfigError(f"diffusion.timestep_spacing={self.timestep_spacing!r} is not "
                              f"allowed; allowed values: {', '.join(schedules.SPACINGS)}")

    def make_schedule(self, name: str | None = None):
        """The schedule object of `schedule` (or of `name`, e.g. `aug_schedule`); discrete
        ones step with `timestep_spacing`."""
        from jaxt2i import diffusion

        name = name or self.schedule
        if name.startswith("discrete_"):
            return diffusion.get_schedule(name, spacing=self.timestep_spacing)
        return diffusion.get_schedule(name)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """A stage's config, parsed once (from a training config or the JSON beside an export).

    Attributes:
      model: the U-Net's config, of its family's type (`UNetConfig`, `IFModelConfig`).
      text: the text encoder it is conditioned on.
      diffusion: its schedules.
      sample: its default sampling settings.
      model_size: the named size it was made from (e.g. 'demo'), if any.
      model_family: the U-Net family ('efficient_unet' | 'if', `jaxt2i.models.registry`).
      clip: the CLIP whose image embedding the stage is conditioned on (an unCLIP decoder:
        `model.image_embed_dim` > 0; the config's `clip.path`, 'bundled' = the demo CLIP);
        '' for every other stage.
      raw: the whole config as given (training, data, mesh sections included), for records.
    """

    model: Any  # the family's config: UNetConfig | IFModelConfig
    text: TextSpec
    diffusion: DiffusionSpec
    sample: StageSettings
    model_size: str | None = None
    model_family: str = "efficient_unet"
    clip: str = ""
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def is_sr(self) -> bool:
        return self.model.is_sr

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, where: str = "stage config",
                  dtype: str | None = None) -> "StageConfig":
        """Parses a full stage config (any format version) into typed sections.

        Args:
          config: the config dict (a training config's `to_dict()` or an export's).
          where: names the config in errors (e.g. the export's path).
          dtype: override of the model's and text encoder's compute dtype.

        Raises ConfigError (one line naming `where` and the field) for a missing section or a
        bad value.
        """
        from jaxt2i.models.registry import get_family

        if not isinstance(config, Mapping):
            raise ConfigError(f"{where} is not a JSON object")
        raw = dict(config)
        c = upgrade(raw, where)
        for section in ("model", "text", "diffusion", "sample"):
            if not isinstance(c.get(section), Mapping):
                raise ConfigError(f"{where} lacks its '{section}' section; export the stage "
                                  "again (python -m jaxt2i.checkpoint --workdir=RUN)")
        try:
            family = get_family(c.get("model_family"))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        try:
            model = family.config_from_dict(c["model"], dtype)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{where}: unreadable model config "
                              f"({str(e).splitlines()[0]})") from None
        t, d = c["text"], c["diffusion"]
        try:
            text = TextSpec(encoder=str(t["encoder"]), max_length=int(t["max_length"]),
                            dtype=str(dtype or t["dtype"]))
            diff = DiffusionSpec(schedule=str(d["schedule"]), aug_schedule=str(d["aug_schedule"]),
                                 aug_order=str(d["aug_order"]),
                                 timestep_spacing=str(d.get("timestep_spacing", "trailing")))
            sample = StageSettings.from_config(c["sample"])
        except KeyError as e:
            raise ConfigError(f"{where} lacks the field {e.args[0]!r}; export the stage "
                              "again") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        clip = ""
        if getattr(model, "image_embed_dim", 0):  # an unCLIP decoder records its CLIP
            clip = (c.get("clip") or {}).get("path") if isinstance(c.get("clip"), Mapping) else None
            if not clip:
                raise ConfigError(f"{where}: model.image_embed_dim={model.image_embed_dim} needs "
                                  "the CLIP it was trained with in clip.path ('bundled' = the "
                                  "demo CLIP)")
        return cls(model=model, text=text, diffusion=diff, sample=sample,
                   model_size=c.get("model_size"), model_family=family.name, clip=str(clip),
                   raw=raw)

    def to_dict(self) -> dict:
        """The whole config in the current format (what exports write)."""
        return upgrade(self.raw)


def resolve_export_dir(path: str) -> str:
    """A stage export dir: `path` itself or `path/export` (a training workdir).

    Raises ConfigError (one line) naming what `path` is and what to do.
    """
    from jaxt2i.checkpoint import EXPORT_PARAMS

    from jaxt2i import paths

    for d in (path, paths.join(path, "export")):
        if paths.exists(paths.join(d, EXPORT_PARAMS)):
            return d
    if paths.isdir(paths.join(path, "checkpoints")):
        raise ConfigError(f"training run {path!r} has no export/ yet (it is written when the run "
                          "finishes); export its newest checkpoint with "
                          f"`python -m jaxt2i.checkpoint --workdir={path}`")
    raise ConfigError(f"checkpoint {path!r} is neither a cascade directory (cascade.json) nor "
                      f"a stage export (params.safetensors + config.json)")


def load_text_encoder(text: TextSpec, *, override: str | None = None,
                      from_checkpoint: bool = False, base: str = ""):
    """The frozen text encoder a stage names ('bundled' = the package's shapes encoder).

    Args:
      text: the stage's `TextSpec`.
      override: a directory or hub id to load instead (the user's explicit choice).
      from_checkpoint: the spec comes from a checkpoint, which never makes jaxt2i download:
        a hub id there is refused unless `override` names it.
      base: the stage's export directory: a relative `text.encoder` that names a directory
        there (e.g. '../text_encoder', a converted cascade's own copy) is loaded from it.
    """
    from jaxt2i import assets
    from jaxt2i.text import load_encoder

    path = override or text.encoder
    beside = os.path.join(base, path) if base and not override else ""
    if path == "bundled":
        path = assets.text_encoder_dir()
    elif beside and not os.path.isabs(path) and os.path.isdir(beside):
        path = beside  # the checkpoint's own encoder: no warning
    elif from_checkpoint and not override and not os.path.isdir(path):
        raise ConfigError(
            f"the stages' text encoder {path!r} (text.encoder in their config.json) is not "
            "a local directory; pass --text_encoder=DIR (a local copy), or name the hub id "
            f"with --text_encoder={path} to download it")
    elif from_checkpoint and not override:
        log.warning("loading the text encoder named by the stages' config from %s, outside "
                    "the checkpoint", os.path.abspath(path))
    try:
        return load_encoder(path, dtype=text.dtype, max_length=text.max_length)
    except (FileNotFoundError, ValueError) as e:
        what = f"text encoder {path!r}" if from_checkpoint or override else \
            f"text.encoder={text.encoder!r}"
        raise ConfigError(f"{what}: {e}") from None


class Stage:
    """One cascade stage: config, U-Net, params and the text encoder it is conditioned on.

    Attributes:
      config: the `StageConfig`.
      family: its U-Net family (`jaxt2i.models.registry`).
      model: the network module (`UNet`, `IFUNet`, ...).
      schedule: the stage's diffusion schedule object.
      params: the U-Net's params (None until loaded or set).
      encoder: the frozen `TextEncoder` (shared by a cascade's stages; None if not attached).
      path: where the stage was loaded from ('' if built in memory).
      step: the training step of its params, if known.
    """

    def __init__(self, config: StageConfig, params: Any = None, *, encoder: Any = None,
                 path: str = "", step: int | None = None):
        from jaxt2i.models.registry import get_family

        self.config = config
        self.family = get_family(config.model_family)
        self.model = self.family.network(config.model)
        self.schedule = config.diffusion.make_schedule()
        self.params = params
        self.encoder = encoder
        self.path = path
        self.step = step

    # ------------------------------------------------------------------------ loading
    @classmethod
    def read(cls, path: str, *, dtype: str | None = None) -> "Stage":
        """A stage export's config (no params yet): `path` is an export or a training workdir."""
        from jaxt2i.checkpoint import read_export_config

        path = resolve_export_dir(path)
        raw, step = read_export_config(path)
        return cls(StageConfig.from_dict(raw, where=f"stage {path!r}", dtype=dtype), path=path,
                   step=step)

    def load_params(self) -> "Stage":
        """Reads params.safetensors (checked against the config's model) onto the device."""
        from jaxt2i.checkpoint import load_exported

        params, _, _ = load_exported(self.path)
        self.check_params(params)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        return self

    @classmethod
    def load(cls, path: str, *, dtype: str | None = None, encoder: Any = None) -> "Stage":
        """`read` + `load_params`."""
        stage = cls.read(path, dtype=dtype).load_params()
        stage.encoder = encoder
        return stage

    # ----------------------------------------------------------------------- the model
    @property
    def unet_cfg(self):
        """The U-Net's config (= config.model; its family's type)."""
        return self.config.model

    @property
    def is_sr(self) -> bool:
        return self.config.model.is_sr

    @property
    def image_embed_dim(self) -> int:
        """Width of the CLIP image embedding the stage is conditioned on (an unCLIP decoder;
        `Stage.sample(image_embed=)`), 0 for every other stage."""
        return int(getattr(self.config.model, "image_embed_dim", 0))

    @property
    def learned_variance(self) -> bool:
        """The network also predicts a variance (IF): `network_output` has 2C channels."""
        return self.family.learned_variance(self.config.model)

    def example_inputs(self, batch_size: int = 1, text_len: int | None = None) -> dict:
        """Zero inputs of the network's `__call__` at the training size (crop for
        crop-trained SR)."""
        text_len = text_len or (self.encoder.max_length if self.encoder is not None
                                else self.config.text.max_length)
        return self.family.example_inputs(self.config.model, batch_size, text_len)

    def init_params(self, rng, text_len: int | None = None):
        """Fresh (partitioning-boxed) params: the network's `init` on `example_inputs`."""
        return self.model.init(rng, **self.example_inputs(1, text_len))["params"]

    def check_params(self, params) -> None:
        """Raises ConfigError naming the first param the stage's model does not expect."""
        import flax.linen as nn

        from jaxt2i.checkpoint import flatten

        want = {k: tuple(v.shape) for k, v in flatten(nn.unbox(
            self.family.param_shapes(self.config.model))["params"]).items()}
        got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
        for name in sorted(set(want) | set(got)):
            if want.get(name) != got.get(name):
                what = ("is missing from params.safetensors" if name not in got else
                        "is not in the model its config.json describes" if name not in want else
                        f"has shape {got[name]} but the model's is {want[name]}")
                raise ConfigError(f"stage {self.path!r}: param {name} {what}; config.json and "
                                  "params.safetensors are from different models: export the "
                                  "stage again")

    def denoise(self, params, x_t, t, cond: Mapping[str, Any]):
        """One U-Net evaluation (traceable).

        Args:
          params: the U-Net's params.
          x_t: [B, H, W, C] noisy images.
          t: [B] the model's noise-level input (`schedule.model_t`).
          cond: 'text_emb' [B, L, D], 'text_mask' [B, L]; SR stages also 'lowres'
            [B, h, w, C] and 'aug_level' [B]; an unCLIP decoder also 'image_embed' [B, P].

        Returns:
          [B, H, W, C], the prediction of `config.model.objective` (of a network with a learned
          variance, the prediction's channels alone).
        """
        out = self.network_output(params, x_t, t, cond)
        return out[..., :self.config.model.channels] if self.learned_variance else out

    def network_output(self, params, x_t, t, cond: Mapping[str, Any]):
        """The network's whole output (traceable), inputs as `denoise`: [B, H, W, C], or
        [B, H, W, 2C] with a learned variance (`learned_variance`): the prediction, then the
        variance interpolation v in [-1, 1] (IF; `jaxt2i.diffusion.DDPM` 'learned_range')."""
        args, kwargs = self.family.network_inputs(self.config.model, x_t, t, cond)
        return self.model.apply({"params": params}, *args, **kwargs)

    def denoiser(self, params):
        """`denoise` with `params` bound: (x_t, t, cond) -> prediction, as the samplers and
        the loss take it."""
        return lambda x_t, t, cond: self.denoise(params, x_t, t, cond)

    def encode_text(self, text_params, ids, mask):
        """The frozen text encoder (traceable): [B, L] ids, mask -> (emb [B, L, D] float32,
        mask [B, L] bool)."""
        if self.encoder is None:
            raise ValueError("this Stage has no text encoder attached (Stage(..., encoder=))")
        return self.encoder.embed(text_params, ids, mask)

    @property
    def lowres_input_size(self) -> int:
        """Side of the low-res input the U-Net gets at sampling (`augment`'s output): the
        stage's image_size when it resizes first, else model.lowres_size; 0 for a base."""
        c = self.config.model
        if not c.is_sr:
            return 0
        return c.image_size if self.config.diffusion.aug_order == "resize_first" else c.lowres_size

    def upsample(self, lowres, size: int | None = None):
        """The U-Net's resize of the low-res image: [B, h, w, C] -> [B, S, S, C] float32, S =
        `size` (default the stage's image_size)."""
        size = size or self.config.model.image_size
        return self.family.upsample(self.config.model, lowres, size)

    def augment(self, rng, lowres, *, level=None, max_level=None, size: int | None = None):
        """Noise-conditioning augmentation of an SR stage's low-res input, as training and
        sampling both feed it to the U-Net.

        `config.diffusion.aug_order` 'resize_first' upsamples `lowres` to `size` (`upsample`;
        an image already that size is kept) and augments the result; 'augment_first' augments
        `lowres` as it is and leaves the resize to the U-Net.

        Args:
          rng: PRNG key of the level (training) and the noise.
          lowres: [B, h, w, C] in [-1, 1].
          level: a fixed level, scalar or [B] (sampling), or None: levels drawn from
            [0, max_level) (training).
          max_level: training's largest level.
          size: x_t's side (default the stage's image_size; a crop-trained stage's crops pass
            theirs).

        Returns:
          (cond['lowres'] [B, h, w, C] or [B, S, S, C], cond['aug_level'] [B]).
        """
        from jaxt2i import diffusion

        if self.config.diffusion.aug_order == "resize_first":
            lowres = self.upsample(lowres, size)
        kwargs = {"level": level} if level is not None else {"max_level": max_level}
        return diffusion.noise_augment(
            rng, lowres, schedule=self.config.diffusion.make_schedule(
                self.config.diffusion.aug_schedule), **kwargs)

    # ------------------------------------------------------------------------ sampling
    def sample(self, params, text, uncond, rng, lowres=None, *, settings: StageSettings,
               edit: "Edit | None" = None, image_embed=None, sampler=None):
        """The whole reverse process of the stage (traceable; jit it with `settings` and
        `sampler` static).

        Args:
          params: the U-Net's params.
          text: (emb [B, L, D] float32, mask [B, L] bool) of the prompts.
          uncond: (emb, mask) of the unconditional branch of guidance, [1 or B, L, D] and
            [1 or B, L]: the empty prompt, or negative prompts (one per image).
          rng: PRNG key; the start noise comes from split(rng)[0] (as in `diffusion.sample`).
            SR stages draw the augmentation noise from fold_in(rng, 1) and the sampler's step
            noise from fold_in(rng, 2): `diffusion.sample(rng)` takes its step noise from
            split(rng)[1], which equals fold_in(rng, 1) under jax_threefry_partitionable.
          lowres: SR stages: [B, h, w, C] low-res image in [-1, 1] (the previous stage's output).
          settings: sampler, steps, guidance, thresholding, aug_level, spacing, churn, ...
          edit: image-to-image and inpainting (`Edit`: init image, mask, strength; arrays, so
            new images, masks or strengths do not recompile), resized to this stage's size.
          image_embed: an unCLIP decoder (`image_embed_dim` > 0) only, and required there:
            [B, P] CLIP image embeddings (e.g. the prior's); the unconditional half of
            guidance gets zeros, the null the decoder was trained with.
          sampler: None (`settings.sampler`) or a sampler object that replaces it, e.g.
            `diffusion.DDIM(eta=1.0)` (unCLIP variations); steps etc. stay `settings`'.

        Returns:
          [B, H, W, C] float32 images, roughly in [-1, 1].
        """
        from jaxt2i import diffusion

        c = self.config.model
        emb, mask = text
        cond = {"text_emb": emb, "text_mask": mask}
        uncond = {"text_emb": uncond[0], "text_mask": uncond[1]}
        if self.image_embed_dim:
            if image_embed is None:
                raise ValueError(f"this stage is an unCLIP decoder: pass image_embed [B, "
                                 f"{self.image_embed_dim}] (e.g. sampled by the prior)")
            cond["image_embed"] = jnp.asarray(image_embed, jnp.float32)
            uncond["image_embed"] = jnp.zeros((1, self.image_embed_dim), jnp.float32)
        elif image_embed is not None:
            raise ValueError("image_embed given to a stage without image conditioning "
                             "(model.image_embed_dim is 0)")
        if c.is_sr:  # both guidance branches see the same augmented low-res image
            if lowres is None:
                raise ValueError("a super-resolution stage needs lowres [B, h, w, C]")
            low, level = self.augment(jax.random.fold_in(rng, 1), lowres,
                                      level=settings.aug_level)
            cond.update(lowres=low, aug_level=level)
            uncond.update(lowres=low, aug_level=level)
        shape = (emb.shape[0], c.image_size, c.image_size, c.channels)
        x_init = None
        if c.is_sr:  # same start noise as before, step noise from a key of its own
            x_init = jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32)
            rng = jax.random.fold_in(rng, 2)
        edits = {}
        if edit is not None:
            edits = edit.resized(c.image_size)
            edits["resample"] = settings.inpaint_resample if edits.get("mask") is not None else 0
        sampler, denoiser = sampler or settings.sampler, self.denoiser(params)
        if self.learned_variance:  # eps + v to the loop; DDPM steps with the learned variance
            denoiser = lambda x_t, t, cond: self.network_output(params, x_t, t, cond)  # noqa: E731
            if sampler == "ddpm":
                sampler = diffusion.DDPM(variance="learned_range")
        return diffusion.sample(
            denoiser, shape, rng, schedule=self.schedule, x_init=x_init,
            sampler=sampler, num_steps=settings.steps, cond=cond,
            uncond=None if settings.guidance == 1 else uncond, guidance_scale=settings.guidance,
            prediction=c.objective,
            thresholding=diffusion.Thresholding(
                settings.thresholding, percentile=settings.threshold_percentile,
                max_value=settings.threshold_max_value or None),
            spacing=settings.spacing, churn=settings.churn,
            guidance_rescale=settings.guidance_rescale, learned_variance=self.learned_variance,
            guidance_interval=(settings.guidance_t_min, settings.guidance_t_max), **edits)

    def __repr__(self) -> str:
        c = self.config.model
        kind = f"sr {c.lowres_size}->{c.image_size}" if c.is_sr else f"base {c.image_size}"
        return f"Stage({kind} px, {self.path or 'in memory'}, step {self.step})"


__all__ = ["AUG_ORDERS", "Edit", "FORMAT_VERSION", "SETTING_NAMES", "DiffusionSpec", "Stage",
           "StageConfig", "StageSettings", "TextSpec", "load_text_encoder", "resolve_export_dir",
           "setting_types", "upgrade"]
