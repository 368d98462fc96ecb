"""DeepFloyd IF: diffusers pipeline directories <-> jaxt2i cascade directories, without torch.

    from_diffusers(["IF-I-XL-v1.0", "IF-II-L-v1.0"], "if-cascade")  # python -m jaxt2i.convert
    to_diffusers("if-cascade", "if-diffusers")                       #   --from / --to=diffusers

A diffusers IF pipeline directory holds model_index.json, unet/ (UNet2DConditionModel),
scheduler/ (DDPMScheduler), text_encoder/ (T5EncoderModel) and tokenizer/ (T5Tokenizer); a
super-resolution one (IFSuperResolutionPipeline) also image_noising_scheduler/. The cascade
`from_diffusers` writes (and `jaxt2i.sample --checkpoint=DST` runs):

    DST/cascade.json     {"kind": "deepfloyd_if", "stages": ["stage_I", "stage_II"], ...}
    DST/stage_I/         config.json (model_family 'if') + params.safetensors (float32)
    DST/stage_II/
    DST/text_encoder/    the T5 files as they were (config.json, safetensors) + the tokenizer

`to_diffusers` writes DST/stage_I/ (an IFPipeline with the text encoder and tokenizer) and
DST/stage_II/ (an IFSuperResolutionPipeline without them: pass stage I's prompt embeddings, as
DeepFloyd's own examples load stage II with text_encoder=None).

What maps to what:
  unet/               the stage's IFUNet (`jaxt2i.models.if_convert`), image_size = its
                      sample_size; stage II's lowres_size = stage I's image_size.
  scheduler/          diffusion.schedule 'discrete_<beta_schedule>' and timestep_spacing; the
                      DDPM sampler with variance_type 'learned_range' (6 output channels);
                      thresholding=True: 'dynamic' at dynamic_thresholding_ratio x 100 and
                      sample_max_value (IF: 95 and 1.5); else clip_sample: 'static'.
  image_noising_scheduler/  diffusion.aug_schedule; noise_level n is aug_level n / 1000.
  pipeline defaults   (arguments of the pipelines' __call__, not in any config) 100 steps and
                      guidance 7 (stage I), 50 steps, guidance 4 and noise level 250 (stage II),
                      text length 77.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Sequence

from jaxt2i.config import ConfigError

KIND = "deepfloyd_if"
STAGE_NAMES = ("stage_I", "stage_II")
TEXT_DIR = "text_encoder"
MAX_LENGTH = 77  # IF's pipelines tokenize to 77 tokens
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# model_index.json class of each kind of stage (False: stage I, True: super-resolution).
PIPELINE_CLASS = {False: "IFPipeline", True: "IFSuperResolutionPipeline"}
DIFFUSERS_VERSION = "0.16.0"  # the first diffusers with IF; written into model_index.json
# The diffusers pipelines' __call__ defaults, which no config file records.
PIPELINE_DEFAULTS = {False: dict(steps=100, guidance=7.0, aug_level=0.0),
                     True: dict(steps=50, guidance=4.0, aug_level=0.25)}
# DDPMScheduler.__init__ defaults, for keys a scheduler_config.json leaves out.
DDPM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "variance_type": "fixed_small",
    "clip_sample": True, "prediction_type": "epsilon", "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False}
# Values jaxt2i's discrete schedules implement (the others are refused in one line).
_ONLY = {"num_train_timesteps": (1000,), "trained_betas": (None,),
         "prediction_type": ("epsilon",), "rescale_betas_zero_snr": (False,),
         "steps_offset": (0,), "timestep_spacing": ("leading", "trailing", "linspace"),
         "beta_schedule": ("squaredcos_cap_v2", "linear", "scaled_linear")}
# Weight-file names of a transformers T5 directory (a variant v: model.v.safetensors,
# model.safetensors.index.v.json); the cascade's copy always uses the plain names.
T5_SINGLE, T5_INDEX = "model.safetensors", "model.safetensors.index.json"


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read as JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return d


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def _refuse(path: str, name: str, value: Any, supported: str) -> None:
    raise ConfigError(f"{path}: {name}={value!r} is not supported by jaxt2i's IF stages "
                      f"(supported: {supported})")


def _roman(k: int) -> str:
    return STAGE_NAMES[k] if k < len(STAGE_NAMES) else f"stage_{k + 1}"


# ----------------------------------------------------------------------- scheduler configs
def schedule_from_diffusers(cfg: dict, path: str) -> tuple[str, str]:
    """(jaxt2i schedule name, timestep_spacing) of a DDPMScheduler config.

    Raises ConfigError naming `path` and the first field jaxt2i does not implement.
    """
    if cfg.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        _refuse(path, "_class_name", cfg["_class_name"], "'DDPMScheduler'")
    get = lambda k: cfg.get(k, DDPM_DEFAULTS[k])  # noqa: E731
    for name, allowed in _ONLY.items():
        if get(name) not in allowed:
            _refuse(path, name, get(name), " or ".join(map(repr, allowed)))
    beta = get("beta_schedule")
    if beta != "squaredcos_cap_v2" and (get("beta_start"), get("beta_end")) != (1e-4, 0.02):
        _refuse(path, "beta_start/beta_end", (get("beta_start"), get("beta_end")),
                "(0.0001, 0.02) for the linear schedules")
    return f"discrete_{beta}", get("timestep_spacing")


def sampling_from_diffusers(cfg: dict, path: str, learned_variance: bool) -> dict:
    """The `StageSettings` thresholding fields of a DDPMScheduler config (its variance_type
    checked against the U-Net's output)."""
    get = lambda k: cfg.get(k, DDPM_DEFAULTS[k])  # noqa: E731
    want = "learned_range" if learned_variance else "fixed_small"
    if get("variance_type") != want:
        _refuse(path, "variance_type", get("variance_type"),
                f"{want!r} for this U-Net, which predicts "
                f"{'eps and a variance' if learned_variance else 'eps alone'}")
    if get("thresholding"):
        return dict(thresholding="dynamic",
                    threshold_percentile=round(float(get("dynamic_thresholding_ratio")) * 100, 9),
                    threshold_max_value=float(get("sample_max_value")))
    if get("clip_sample"):
        if float(get("clip_sample_range")) != 1.0:
            _refuse(path, "clip_sample_range", get("clip_sample_range"), "1.0")
        return dict(thresholding="static")
    return dict(thresholding="none")


def scheduler_to_diffusers(schedule: str, spacing: str, *, learned_variance: bool = False,
                           settings=None) -> dict:
    """A DDPMScheduler config.json for a jaxt2i discrete schedule (and a stage's thresholding
    settings; None = the image-noising scheduler of stage II)."""
    if not schedule.startswith("discrete_"):
        raise ConfigError(f"diffusion schedule {schedule!r} has no DDPMScheduler form; "
                          "--to=diffusers writes discrete (DDPM) schedules only")
    out = dict(DDPM_DEFAULTS, _class_name="DDPMScheduler", _diffusers_version=DIFFUSERS_VERSION,
               beta_schedule=schedule[len("discrete_"):], timestep_spacing=spacing,
               variance_type="learned_range" if learned_variance else "fixed_small")
    if settings is not None:
        kind = settings.thresholding
        out.update(thresholding=kind == "dynamic", clip_sample=kind != "none",
                   dynamic_thresholding_ratio=settings.threshold_percentile / 100,
                   # 0 (no limit) has no diffusers form: a scale no image reaches
                   sample_max_value=settings.threshold_max_value or 1e6)
    return out


# --------------------------------------------------------------------------- reading
@dataclasses.dataclass
class _Pipeline:
    """One diffusers IF pipeline directory, its configs parsed (no weights read yet)."""
    path: str
    is_sr: bool
    unet: Any  # IFUNetConfig
    scheduler: dict
    noising: dict | None


def _inspect(path: str) -> _Pipeline:
    from jaxt2i.models.if_convert import config_from_diffusers

    if not os.path.isdir(path):
        raise ConfigError(f"{path!r} is not a directory; pass a diffusers IF pipeline directory "
                          "(model_index.json, unet/, scheduler/, text_encoder/, tokenizer/)")
    unet_cfg = os.path.join(path, "unet", "config.json")
    if not os.path.isfile(unet_cfg):
        raise ConfigError(f"{path!r} has no unet/ folder with a config.json; pass a diffusers "
                          "IF pipeline directory (model_index.json, unet/, scheduler/, ...)")
    try:
        unet = config_from_diffusers(_read_json(unet_cfg))
    except ValueError as e:
        raise ConfigError(f"{unet_cfg}: {str(e).splitlines()[0]}") from None
    is_sr = unet.class_embed_type == "timestep"
    index = os.path.join(path, MODEL_INDEX)
    if os.path.isfile(index):
        name = _read_json(index).get("_class_name")
        if name not in PIPELINE_CLASS.values():
            _refuse(index, "_class_name", name, " or ".join(PIPELINE_CLASS.values()))
        if name != PIPELINE_CLASS[is_sr]:
            raise ConfigError(f"{index} names a {name} but its unet/ is a "
                              f"{'super-resolution' if is_sr else 'stage-I'} U-Net")
    scheduler = _read_json(os.path.join(path, "scheduler", SCHEDULER_CONFIG))
    noising = None
    if is_sr:
        noising = _read_json(os.path.join(path, "image_noising_scheduler", SCHEDULER_CONFIG))
    return _Pipeline(os.path.abspath(path), is_sr, unet, scheduler, noising)


def _stage_config(p: _Pipeline, image_size: int, lowres_size: int) -> dict:
    """The jaxt2i stage config of pipeline `p` (checked by parsing it)."""
    from jaxt2i.models.if_family import IFModelConfig
    from jaxt2i.stage import StageConfig, StageSettings

    sched_path = os.path.join(p.path, "scheduler", SCHEDULER_CONFIG)
    schedule, spacing = schedule_from_diffusers(p.scheduler, sched_path)
    try:
        model = IFModelConfig(unet=p.unet, image_size=image_size, lowres_size=lowres_size)
    except ValueError as e:
        raise ConfigError(f"{os.path.join(p.path, 'unet')}: {e}") from None
    aug_schedule = schedule
    if p.is_sr:
        noise_path = os.path.join(p.path, "image_noising_scheduler", SCHEDULER_CONFIG)
        # 1000 timesteps (checked there), the U-Net's class labels: AUG_TIMESTEPS
        aug_schedule, _ = schedule_from_diffusers(p.noising, noise_path)
    thresholding = sampling_from_diffusers(p.scheduler, sched_path, model.learned_variance)
    try:
        settings = StageSettings(sampler="ddpm", spacing="default", **thresholding,
                                 **PIPELINE_DEFAULTS[p.is_sr])
    except ConfigError as e:
        raise ConfigError(f"{sched_path}: {e}") from None
    from jaxt2i.stage import FORMAT_VERSION

    config = {
        "format_version": FORMAT_VERSION, "model_family": "if", "model": model.to_dict(),
        "text": {"encoder": f"../{TEXT_DIR}", "max_length": MAX_LENGTH, "dtype": "float32"},
        "diffusion": {"schedule": schedule, "aug_schedule": aug_schedule,
                      "aug_order": "resize_first", "timestep_spacing": spacing},
        "sample": settings.to_dict(),
        "converted_from": {"format": "diffusers", "pipeline": p.path},
    }
    StageConfig.from_dict(config, where=f"the stage converted from {p.path}")
    return config


def _t5_weight_files(te_dir: str, variant: str | None) -> list[tuple[str, str]]:
    """[(file in te_dir, name in the copy)] of a T5 directory's weights (`variant` renamed to
    the plain names, which `jaxt2i.text.load_encoder` reads)."""
    single = T5_SINGLE if not variant else f"model.{variant}.safetensors"
    index = T5_INDEX if not variant else f"model.safetensors.index.{variant}.json"
    if os.path.isfile(os.path.join(te_dir, index)):
        weight_map = _read_json(os.path.join(te_dir, index)).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{os.path.join(te_dir, index)} has no 'weight_map'")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(te_dir, s))]
        if missing:
            raise ConfigError(f"{os.path.join(te_dir, index)} lists shards that are not in "
                              f"{te_dir}: {missing}; copy every shard")
        return [(index, T5_INDEX)] + [(s, s) for s in shards]
    if os.path.isfile(os.path.join(te_dir, single)):
        return [(single, T5_SINGLE)]
    found = sorted(n for n in os.listdir(te_dir) if n.endswith(".safetensors"))
    hint = f"; found {found}: pass --variant to read one of them" if found else ""
    raise ConfigError(f"{te_dir} has no {single} or {index}{hint}")


def _check_t5(te_dir: str, files: list[tuple[str, str]], text_dim: int) -> dict:
    """Reads the T5 config and the weights' headers (no tensor data): every tensor the encoder
    needs is there with its shape, and its width is the U-Nets' text width. -> config.json."""
    from safetensors import safe_open

    from jaxt2i.text import convert
    from jaxt2i.text.t5 import T5Config

    cfg_path = os.path.join(te_dir, "config.json")
    hf_cfg = _read_json(cfg_path)
    try:
        cfg = T5Config.from_hf(hf_cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{cfg_path}: not a T5 encoder config jaxt2i reads "
                          f"({str(e).splitlines()[0]})") from None
    if cfg.d_model != text_dim:
        raise ConfigError(f"{cfg_path}: the text encoder's width d_model={cfg.d_model} is not "
                          f"the U-Nets' text width {text_dim}")
    shapes = {}
    for src, _ in files:
        if not src.endswith(".safetensors"):
            continue
        try:
            with safe_open(os.path.join(te_dir, src), framework="np") as f:
                for name in f.keys():
                    key = "shared.weight" if name == "encoder.embed_tokens.weight" else name
                    shapes.setdefault(key, tuple(f.get_slice(name).get_shape()))
        except Exception as e:  # noqa: BLE001 - safetensors' own error types for a bad file
            raise ConfigError(f"{os.path.join(te_dir, src)} is not a readable safetensors file "
                              f"({str(e).splitlines()[0]})") from None
    for e in convert.param_map(cfg):
        if e.hf_name not in shapes:
            raise ConfigError(f"{te_dir}: the T5 weights lack {e.hf_name}; check that "
                              "config.json belongs to these weights")
        if shapes[e.hf_name] != tuple(e.hf_shape):
            raise ConfigError(f"{te_dir}: {e.hf_name} has shape {list(shapes[e.hf_name])}, "
                              f"config.json says {list(e.hf_shape)}")
    return hf_cfg


def _copy(src: str, dst: str, say: Callable[[str], None]) -> None:
    size = os.path.getsize(src)
    if size > 100 << 20:
        say(f"  copying {os.path.basename(src)} ({size / 2**30:.2f} GiB)")
    shutil.copyfile(src, dst)


def _check_out(out: str) -> None:
    if os.path.isfile(out):
        raise ConfigError(f"--out {out!r} is a file; choose a new directory")
    if os.path.isdir(out) and os.listdir(out):
        raise ConfigError(f"--out {out!r} exists and is not empty; choose a new directory "
                          "(nothing is ever written over)")


def from_diffusers(sources: Sequence[str], out: str, *, text_encoder: str | None = None,
                   variant: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Writes a jaxt2i cascade directory from diffusers IF pipeline directories.

    Args:
      sources: a stage-I pipeline directory, optionally followed (in any order) by a stage-II
        one (e.g. local copies of DeepFloyd/IF-I-XL-v1.0 and DeepFloyd/IF-II-L-v1.0).
      out: the cascade directory to write (absent or empty). It is written beside, as
        OUT.partial-HOST-PID, and renamed into place when complete: a failure leaves nothing.
      text_encoder: a transformers T5 directory (config.json, safetensors, tokenizer files) to
        use instead of the pipelines' text_encoder/ + tokenizer/.
      variant: diffusers / transformers weight variant, e.g. 'fp16' (unet/
        diffusion_pytorch_model.fp16.safetensors, text_encoder/model.fp16*.safetensors).
      log: progress lines go here.

    Returns:
      the cascade.json record. Raises ConfigError (one line) for a bad input.
    """
    from jaxt2i.checkpoint import export_params
    from jaxt2i.export.common import staging_dir
    from jaxt2i.models.if_convert import load_if_unet
    from jaxt2i.models.if_unet import count_params
    from jaxt2i.text.tokenizer import TOKENIZER_FILES

    sources = list(sources)
    if not 1 <= len(sources) <= 2:
        raise ConfigError(f"{len(sources)} pipeline directories given; pass a stage-I IF pipeline "
                          "directory and optionally a stage-II one")
    pipes = sorted((_inspect(s) for s in sources), key=lambda p: p.is_sr)
    if pipes[0].is_sr:
        raise ConfigError(f"{pipes[0].path} is a stage-II (super-resolution) pipeline; a "
                          "cascade starts at stage I: pass the stage-I pipeline too")
    if len(pipes) == 2 and not pipes[1].is_sr:
        raise ConfigError(f"{pipes[0].path} and {pipes[1].path} are both stage-I pipelines; "
                          "pass one stage-I and one stage-II pipeline")
    sizes = []
    for p in pipes:
        if not isinstance(p.unet.sample_size, int):
            raise ConfigError(f"{os.path.join(p.path, 'unet', 'config.json')}: sample_size "
                              f"{p.unet.sample_size!r} is not an image size")
        sizes.append(p.unet.sample_size)
    configs = [_stage_config(p, sizes[k], sizes[k - 1] if k else 0)
               for k, p in enumerate(pipes)]
    if text_encoder:
        te_dir, tok_dir = text_encoder, text_encoder
    else:
        te_dir = os.path.join(pipes[0].path, "text_encoder")
        tok_dir = os.path.join(pipes[0].path, "tokenizer")
        if not os.path.isdir(te_dir) or not os.path.isdir(tok_dir):
            raise ConfigError(f"{pipes[0].path} has no text_encoder/ and tokenizer/ folders; "
                              "pass --text_encoder=DIR (a transformers T5 directory with its "
                              "tokenizer files)")
    if not os.path.isdir(te_dir):
        raise ConfigError(f"--text_encoder {te_dir!r} is not a directory")
    files = _t5_weight_files(te_dir, variant)
    hf_cfg = _check_t5(te_dir, files, pipes[0].unet.text_dim)
    _check_out(out)

    with staging_dir(out, log=log) as root:
        for k, (p, config) in enumerate(zip(pipes, configs)):
            name = _roman(k)
            log(f"{name}: reading {os.path.join(p.path, 'unet')}")
            try:
                unet, params = load_if_unet(os.path.join(p.path, "unet"), variant=variant)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(str(e).splitlines()[0]) from None
            log(f"{name}: writing {name}/params.safetensors ({count_params(unet) / 1e6:,.1f}M "
                f"parameters, {unet.sample_size} px)")
            export_params(params, config, os.path.join(root, name))
            del params
        log(f"{TEXT_DIR}: copying the T5 encoder and its tokenizer from {te_dir}")
        tdir = os.path.join(root, TEXT_DIR)
        os.makedirs(tdir)
        shutil.copyfile(os.path.join(te_dir, "config.json"), os.path.join(tdir, "config.json"))
        for src, dst in files:
            _copy(os.path.join(te_dir, src), os.path.join(tdir, dst), log)
        taken = {"config.json"} | {d for _, d in files}
        for n in sorted(os.listdir(tok_dir)):
            if (n in TOKENIZER_FILES or n.endswith((".model", ".json"))) and n not in taken \
                    and "safetensors" not in n and os.path.isfile(os.path.join(tok_dir, n)):
                shutil.copyfile(os.path.join(tok_dir, n), os.path.join(tdir, n))
        _check_tokenizer(tdir, hf_cfg, tok_dir)
        record = {"kind": KIND, "stages": [_roman(k) for k in range(len(pipes))],
                  "text_encoder": TEXT_DIR,
                  "converted_from": {"format": "diffusers", "pipelines": [p.path for p in pipes],
                                     "variant": variant}}
        _write_json(os.path.join(root, "cascade.json"), record)
    return record


def _check_tokenizer(tdir: str, hf_cfg: dict, where: str) -> None:
    """Loads the copied tokenizer (errors name `where`, the directory it came from)."""
    from jaxt2i.text.encoder import check_tokenizer_fits
    from jaxt2i.text.t5 import T5Config
    from jaxt2i.text.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(tdir, MAX_LENGTH)
        check_tokenizer_fits(tok, T5Config.from_hf(hf_cfg), hf_cfg, where)
    except Exception as e:  # noqa: BLE001 - transformers raises KeyError etc. for a bad file
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"the tokenizer in {where} cannot be used ({type(e).__name__}: "
                          f"{why}); copy the T5's own tokenizer files") from None


# --------------------------------------------------------------------------- writing
def _text_encoder_dir(stage) -> str:
    """The local directory of the stages' text encoder (as `load_text_encoder` finds it)."""
    from jaxt2i import assets

    spec = stage.config.text.encoder
    if spec == "bundled":
        return assets.text_encoder_dir()
    beside = os.path.join(stage.path, spec)
    if not os.path.isabs(spec) and os.path.isdir(beside):
        return beside
    if os.path.isdir(spec):
        return spec
    raise ConfigError(f"the stages' text encoder {spec!r} is not a local directory; "
                      "--to=diffusers copies a local T5 directory")


def to_diffusers(checkpoints: Sequence[str] | str, out: str, *,
                 log: Callable[[str], None] = print) -> dict:
    """Writes diffusers IF pipeline directories from a jaxt2i cascade of IF stages.

    Args:
      checkpoints: a cascade directory, or one stage export per stage (stage I first).
      out: the directory to write (absent or empty): out/stage_I is an IFPipeline (U-Net,
        scheduler, T5 text encoder and tokenizer), out/stage_II an IFSuperResolutionPipeline
        (U-Net, scheduler, image-noising scheduler; no text encoder: give it stage I's
        prompt embeddings). Written beside and renamed into place when complete.
      log: progress lines go here.

    Returns:
      {'pipelines': [...], ...}. Raises ConfigError (one line) for a bad input.
    """
    from jaxt2i.cascade import check_compatible, resolve_stage_dirs
    from jaxt2i.export.common import staging_dir
    from jaxt2i.models.if_convert import save_if_unet
    from jaxt2i.stage import Stage
    from jaxt2i.text.tokenizer import TOKENIZER_FILES

    dirs = resolve_stage_dirs([checkpoints] if isinstance(checkpoints, str) else checkpoints)
    stages = [Stage.read(d) for d in dirs]
    for s in stages:
        if s.config.model_family != "if":
            raise ConfigError(f"stage {s.path!r} is an {s.config.model_family!r} stage; "
                              "--to=diffusers writes DeepFloyd IF stages only")
    check_compatible(stages)
    te_dir = _text_encoder_dir(stages[0])
    weights = _t5_weight_files(te_dir, None)
    _check_out(out)
    names = []
    with staging_dir(out, log=log) as root:
        for k, stage in enumerate(stages):
            name = _roman(k)
            names.append(name)
            pdir = os.path.join(root, name)
            log(f"{name}: reading {stage.path}")
            stage.load_params()
            c, d = stage.config.model, stage.config.diffusion
            log(f"{name}: writing {name}/unet ({c.image_size} px)")
            save_if_unet(c.unet, stage.params, os.path.join(pdir, "unet"))
            stage.params = None
            os.makedirs(os.path.join(pdir, "scheduler"))
            _write_json(os.path.join(pdir, "scheduler", SCHEDULER_CONFIG), scheduler_to_diffusers(
                d.schedule, d.timestep_spacing, learned_variance=c.learned_variance,
                settings=stage.config.sample))
            index = {"_class_name": PIPELINE_CLASS[c.is_sr],
                     "_diffusers_version": DIFFUSERS_VERSION,
                     "unet": ["diffusers", "UNet2DConditionModel"],
                     "scheduler": ["diffusers", "DDPMScheduler"],
                     "text_encoder": [None, None], "tokenizer": [None, None],
                     "safety_checker": [None, None], "feature_extractor": [None, None],
                     "watermarker": [None, None], "requires_safety_checker": False}
            if c.is_sr:
                os.makedirs(os.path.join(pdir, "image_noising_scheduler"))
                _write_json(os.path.join(pdir, "image_noising_scheduler", SCHEDULER_CONFIG),
                            scheduler_to_diffusers(d.aug_schedule, d.timestep_spacing))
                index["image_noising_scheduler"] = ["diffusers", "DDPMScheduler"]
            if k == 0:
                log(f"{name}: copying the T5 encoder and its tokenizer from {te_dir}")
                tdir, kdir = os.path.join(pdir, "text_encoder"), os.path.join(pdir, "tokenizer")
                os.makedirs(tdir)
                os.makedirs(kdir)
                shutil.copyfile(os.path.join(te_dir, "config.json"),
                                os.path.join(tdir, "config.json"))
                for src, dst in weights:
                    _copy(os.path.join(te_dir, src), os.path.join(tdir, dst), log)
                taken = {"config.json", "generation_config.json"} | {s for s, _ in weights}
                for n in sorted(os.listdir(te_dir)):
                    if n not in taken and "safetensors" not in n and \
                            (n in TOKENIZER_FILES or n.endswith((".model", ".json"))):
                        shutil.copyfile(os.path.join(te_dir, n), os.path.join(kdir, n))
                index.update(text_encoder=["transformers", "T5EncoderModel"],
                             tokenizer=["transformers", "T5Tokenizer"])
            _write_json(os.path.join(pdir, MODEL_INDEX), index)
    return {"pipelines": names, "out": os.path.abspath(out)}


__all__ = ["KIND", "MAX_LENGTH", "PIPELINE_DEFAULTS", "STAGE_NAMES", "from_diffusers",
           "sampling_from_diffusers", "schedule_from_diffusers", "scheduler_to_diffusers",
           "to_diffusers"]
