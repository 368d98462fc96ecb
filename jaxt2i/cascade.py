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

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxt2i.config import ConfigError

log = logging.getLogger("jaxt2i")

CASCADE_FILE = "cascade.json"
SETTING_NAMES = ("sampler", "steps", "guidance", "thresholding", "aug_level")


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """How one stage is sampled (hashable: a static argument of the stage's jitted function).

    Attributes:
      sampler: 'ddpm' | 'ddim' | 'dpmpp_2m'.
      steps: number of denoiser evaluations.
      guidance: classifier-free guidance weight w (1 = no guidance, no unconditional pass).
      thresholding: 'none' | 'static' | 'dynamic'.
      aug_level: SR stages: fixed noise-augmentation level in [0, 1] of the low-res input.
    """

    sampler: str
    steps: int
    guidance: float
    thresholding: str
    aug_level: float

    def __post_init__(self):
        from jaxt2i.config import check_range

        for name in ("steps", "guidance", "aug_level"):  # NaN / inf / out of range: one line
            check_range(f"sample.{name}", getattr(self, name), f"sample.{name}")

    @classmethod
    def from_config(cls, sample_cfg, **overrides) -> "StageSettings":
        """Settings from a stage config's `sample` section, with non-None `overrides` applied."""
        get = sample_cfg.get if hasattr(sample_cfg, "get") else lambda k: getattr(sample_cfg, k)
        values = {k: get(k) for k in SETTING_NAMES}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(sampler=str(values["sampler"]), steps=int(values["steps"]),
                   guidance=float(values["guidance"]), thresholding=str(values["thresholding"]),
                   aug_level=float(values["aug_level"]))


def sample_stage(model, params, emb, mask, u_emb, u_mask, rng, lowres=None, *, schedule,
                 aug_schedule, settings: StageSettings):
    """The whole reverse process of one stage (traceable; jit it with `settings` static).

    Args:
      model: the stage's `UNet` module.
      params: its parameters.
      emb: [B, L, D] float32 text embeddings; mask: [B, L] bool.
      u_emb: [1 or B, L, D] embeddings of the empty prompt; u_mask: [1 or B, L].
      rng: PRNG key; the start noise comes from split(rng)[0] (as in `diffusion.sample`).
        SR stages draw the augmentation noise from fold_in(rng, 1) and the sampler's step
        noise from fold_in(rng, 2): `diffusion.sample(rng)` takes its step noise from
        split(rng)[1], which equals fold_in(rng, 1) under jax_threefry_partitionable.
      lowres: SR stages: [B, h, w, C] low-res image in [-1, 1] (the previous stage's output).
      schedule: the stage's diffusion schedule (object or name).
      aug_schedule: schedule of the noise-conditioning augmentation (SR stages).
      settings: sampler, steps, guidance, thresholding, aug_level.

    Returns:
      [B, H, W, C] float32 images, roughly in [-1, 1].
    """
    from jaxt2i import diffusion

    c = model.config
    cond = {"text_emb": emb, "text_mask": mask}
    uncond = {"text_emb": u_emb, "text_mask": u_mask}
    if c.is_sr:  # both guidance branches see the same augmented low-res image
        if lowres is None:
            raise ValueError("a super-resolution stage needs lowres [B, h, w, C]")
        low, level = diffusion.noise_augment(
            jax.random.fold_in(rng, 1), lowres, level=settings.aug_level,
            schedule=aug_schedule)
        cond.update(lowres=low, aug_level=level)
        uncond.update(lowres=low, aug_level=level)

    def denoise(x_t, model_t, cnd):  # [B', H, W, C], [B'] -> [B', H, W, C]
        return model.apply({"params": params}, x_t, model_t, cnd["text_emb"], cnd["text_mask"],
                           lowres=cnd.get("lowres"), aug_level=cnd.get("aug_level"))

    shape = (emb.shape[0], c.image_size, c.image_size, c.channels)
    x_init = None
    if c.is_sr:  # same start noise as before, step noise from a key of its own
        x_init = jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32)
        rng = jax.random.fold_in(rng, 2)
    return diffusion.sample(
        denoise, shape, rng, schedule=schedule, x_init=x_init,
        sampler=settings.sampler, num_steps=settings.steps, cond=cond,
        uncond=None if settings.guidance == 1 else uncond, guidance_scale=settings.guidance,
        prediction=c.objective, thresholding=settings.thresholding)


@dataclasses.dataclass
class Stage:
    """One loaded stage: its config, U-Net and parameters."""

    path: str
    config: dict  # the full stage config saved with the export
    unet_cfg: Any  # UNetConfig
    params: Any = None
    step: int | None = None

    @property
    def is_sr(self) -> bool:
        return self.unet_cfg.is_sr

    def default_settings(self) -> StageSettings:
        return StageSettings.from_config(self.config["sample"])


def _export_dir(path: str) -> str:
    """A stage export dir: `path` itself or `path/export` (a training workdir)."""
    from jaxt2i.checkpoint import EXPORT_PARAMS

    for d in (path, os.path.join(path, "export")):
        if os.path.exists(os.path.join(d, EXPORT_PARAMS)):
            return d
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise ConfigError(f"training run {path!r} has no export/ yet (it is written when the run "
                          "finishes); export its newest checkpoint with "
                          f"`python -m jaxt2i.checkpoint --workdir={path}`")
    raise ConfigError(f"checkpoint {path!r} is neither a cascade directory ({CASCADE_FILE}) nor "
                      f"a stage export ({EXPORT_PARAMS} + config.json)")


def resolve_stage_dirs(paths: Sequence[str]) -> list[str]:
    """Per-stage export directories from one cascade directory or a list of stage exports."""
    paths = list(paths)
    if not paths:
        raise ConfigError("no checkpoint given: pass a cascade directory or one export per stage")
    for p in paths:
        if not os.path.exists(p):
            raise ConfigError(f"checkpoint {p!r} does not exist")
    if len(paths) == 1 and os.path.exists(os.path.join(paths[0], CASCADE_FILE)):
        with open(os.path.join(paths[0], CASCADE_FILE)) as f:
            try:
                names = json.load(f)["stages"]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{os.path.join(paths[0], CASCADE_FILE)} must be JSON with a "
                                  "'stages' list of sub-directories") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{os.path.join(paths[0], CASCADE_FILE)} must be JSON with a "
                              "'stages' list of sub-directories")
        root = os.path.realpath(paths[0])
        paths = [os.path.join(paths[0], n) for n in names]
        for p in paths:
            if not os.path.exists(p):
                raise ConfigError(f"cascade stage directory {p!r} does not exist")
            if not os.path.realpath(p).startswith(root + os.sep):
                log.warning("%s names stage %s, outside the cascade directory %s: loading it "
                            "from there", CASCADE_FILE, os.path.realpath(p), root)
    return [_export_dir(p) for p in paths]


def _read_stage(path: str, dtype: str | None) -> Stage:
    from jaxt2i.checkpoint import read_export_config
    from jaxt2i.models.unet import UNetConfig

    config, step = read_export_config(path, sections=("model", "text", "sample"))
    try:
        model = dict(config["model"], **({"dtype": dtype} if dtype else {}))
        unet_cfg = UNetConfig.from_dict(model)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"stage {path!r}: unreadable model config "
                          f"({str(e).splitlines()[0]})") from None
    return Stage(path=path, config=config, unet_cfg=unet_cfg, step=step)


def _check_params_fit(stage: Stage, params) -> None:
    """Raises ConfigError naming the first param the stage's model config does not expect."""
    from jaxt2i.checkpoint import flatten
    from jaxt2i.models.unet import param_shapes

    import flax.linen as nn

    want = {k: tuple(v.shape) for k, v in
            flatten(nn.unbox(param_shapes(stage.unet_cfg))["params"]).items()}
    got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            what = ("is missing from params.safetensors" if name not in got else
                    "is not in the model its config.json describes" if name not in want else
                    f"has shape {got[name]} but the model's is {want[name]}")
            raise ConfigError(f"stage {stage.path!r}: param {name} {what}; config.json and "
                              "params.safetensors are from different models: export the stage "
                              "again")


def check_compatible(stages: Sequence[Stage], text_width: int | None = None) -> None:
    """Raises ConfigError (one line) unless the stages chain into one cascade.

    Stage 0 must be a base stage; stage k+1 an SR stage whose lowres_size equals stage k's
    image_size; all stages share the text encoder and max_length, and their text_dim equals the
    encoder width (`text_width`, when known).
    """
    for k, s in enumerate(stages):
        c = s.unet_cfg
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
        t0, t = stages[0].config["text"], s.config["text"]
        for key in ("encoder", "max_length"):
            if t.get(key) != t0.get(key):
                raise ConfigError(f"stage {k} uses text.{key}={t.get(key)!r} but stage 0 uses "
                                  f"{t0[key]!r}; all stages must share one text encoder")
        if text_width is not None and c.text_dim != text_width:
            raise ConfigError(f"stage {k} ({s.path}) has text_dim {c.text_dim} but the text "
                              f"encoder's width is {text_width}")


class Cascade:
    """A loaded cascade: text encoder + stages, with one jitted sampler per stage.

    Attributes:
      stages: the `Stage`s, base first.
      encoder: the frozen text encoder (`jaxt2i.text.TextEncoder`).
      traces: per stage, how many times its sampler was traced (compiled).
    """

    def __init__(self, stages: Sequence[Stage], encoder):
        from jaxt2i.models.unet import UNet

        check_compatible(stages, encoder.config.d_model)
        self.stages = list(stages)
        self.encoder = encoder
        self.models = [UNet(s.unet_cfg) for s in self.stages]
        self.traces = [0] * len(self.stages)
        self._encode = jax.jit(self._encode_fn)
        self._jitted = [jax.jit(self._stage_fn(k), static_argnames=("settings",))
                        for k in range(len(self.stages))]
        ids, mask = encoder.tokenizer([""])
        self._u_emb, self._u_mask = self._encode(encoder.params, ids, mask)  # [1, L, D], [1, L]

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    def _encode_fn(self, text_params, ids, mask):  # [B, L] -> [B, L, D] float32, [B, L]
        emb = self.encoder.module.apply({"params": text_params}, ids, mask)
        return emb.astype(jnp.float32), mask.astype(bool)

    def _stage_fn(self, k: int):
        s = self.stages[k]

        def fn(params, emb, mask, u_emb, u_mask, rng, lowres, settings):
            self.traces[k] += 1  # Python side effect: runs only while tracing
            return sample_stage(self.models[k], params, emb, mask, u_emb, u_mask, rng, lowres,
                                schedule=s.config["diffusion"]["schedule"],
                                aug_schedule=s.config["diffusion"].get("aug_schedule", "cosine"),
                                settings=settings)
        return fn

    def compiled_count(self, k: int) -> int:
        """Entries in stage k's jit cache (one per distinct shapes / settings)."""
        return self._jitted[k]._cache_size()

    def settings(self, overrides: Sequence[dict] | None = None,
                 num_stages: int | None = None) -> list[StageSettings]:
        """Per-stage settings: each stage's saved defaults with `overrides[k]` applied."""
        n = num_stages or len(self.stages)
        overrides = list(overrides or [{}] * n)
        return [StageSettings.from_config(self.stages[k].config["sample"], **overrides[k])
                for k in range(n)]

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raises ConfigError naming the first prompt longer than the text length (no truncation)
        or with text a closed-vocabulary tokenizer (the bundled encoder's) does not know."""
        if not prompts:
            raise ConfigError("no prompts given: pass --prompt TEXT (repeatable) or --prompts_file")
        for p, n in zip(prompts, self.encoder.tokenizer.lengths(prompts)):
            if n > self.max_length:
                short = p if len(p) <= 60 else p[:60] + "..."
                raise ConfigError(f"prompt {short!r} has {n} tokens but the text encoder's "
                                  f"max_length is {self.max_length}; shorten it")
        try:
            self.encoder.tokenizer(list(prompts))  # unknown text: error or warning
        except ValueError as e:
            raise ConfigError(str(e)) from None

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
               return_all: bool = False):
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
        ids, mask = self.encoder.tokenizer(prompts)  # [B, L] int32, [B, L] bool
        emb, mask = self._encode(self.encoder.params, jnp.asarray(ids), jnp.asarray(mask))
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
            x = self._jitted[k](self.stages[k].params, emb, mask, self._u_emb, self._u_mask,
                                jax.random.fold_in(root, k), x, settings=settings[k])
            x = jnp.clip(x, -1.0, 1.0)  # [B, H_k, W_k, C]
            outputs.append(np.asarray(x))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        images = to_uint8(outputs[-1])
        return (images, outputs) if return_all else images


def _as_model_images(images) -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] images -> float32 [-1, 1]."""
    from jaxt2i.images import to_float

    a = np.asarray(images)
    if a.dtype == np.uint8:
        return to_float(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ConfigError(f"lowres images have dtype {a.dtype}; pass uint8 in [0, 255] or float "
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
    from jaxt2i.checkpoint import load_exported

    dirs = resolve_stage_dirs([paths] if isinstance(paths, str) else paths)
    stages = [_read_stage(d, dtype) for d in dirs]
    check_compatible(stages)
    if encoder is None:
        from jaxt2i import assets
        from jaxt2i.text import load_encoder

        t = stages[0].config["text"]
        path = text_encoder or t["encoder"]
        if path == "bundled":
            path = assets.text_encoder_dir()
        elif not text_encoder and not os.path.isdir(path):
            # A checkpoint never sends jaxt2i to the network: only a hub id the user names.
            raise ConfigError(
                f"the stages' text encoder {path!r} (text.encoder in their config.json) is not "
                "a local directory; pass --text_encoder=DIR (a local copy), or name the hub id "
                f"with --text_encoder={path} to download it")
        elif not text_encoder:
            log.warning("loading the text encoder named by the stages' config from %s, outside "
                        "the checkpoint", os.path.abspath(path))
        try:
            encoder = load_encoder(path, dtype=dtype or t.get("dtype", "float32"),
                                   max_length=t["max_length"])
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"text encoder {path!r}: {e}") from None
    check_compatible(stages, encoder.config.d_model)
    for s in stages:
        params, _, _ = load_exported(s.path)
        _check_params_fit(s, params)
        s.params = jax.tree_util.tree_map(jnp.asarray, params)
    return Cascade(stages, encoder)


__all__ = ["CASCADE_FILE", "Cascade", "Stage", "StageSettings", "check_compatible",
           "load_cascade", "resolve_stage_dirs", "sample_stage"]
