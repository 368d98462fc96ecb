"""Fine-tuning a DeepFloyd IF stage converted from diffusers (`python -m jaxt2i.convert
--from=diffusers`), on the shapes world by default:

    python -m jaxt2i.train --config=configs/if.py:stage=if-cascade/stage_I --workdir=runs/if
    python -m jaxt2i.train --config=configs/if.py:stage=if-cascade/stage_I,lora=8 \
        --workdir=runs/if-lora

The model, text encoder, schedules and sampling settings are the converted stage's (its
config.json); training starts from its params (`train.init_from`). The loss is the hybrid loss
(`jaxt2i.diffusion.vlb`) for IF's learned-variance U-Nets.

Variants: `stage=` the converted stage directory; `lora=R` LoRA adapters of rank R
on the attention projections (`train.lora.targets`, `jaxt2i.models.lora`), 0 = full
fine-tuning; `size=tiny` a few small steps (tests).

Without a converted stage, `model=NAME` (IF-I-M, IF-I-L, IF-I-XL: `jaxt2i.models.if_unet.SIZES`)
is IF's stage I at its published size with IF's text encoder (T5 v1.1 XXL, 77 tokens), schedule
and sampling settings, bfloat16 with remat, trained from scratch at IF's batch 2048 sharded over
all devices: what `python -m jaxt2i.aot` compiles for a pod without any weights, e.g.

    python -m jaxt2i.aot --config=configs/if.py:model=IF-I-XL --topology=v4:4x4x8
"""

import os

import ml_collections

from configs import common
from jaxt2i.config import ConfigError, parse_variant


def get_config(arg=None):
    from jaxt2i.stage import Stage

    v = parse_variant(arg, {"stage": "", "lora": 0, "size": "full", "model": ""})
    if v["model"]:
        if v["stage"] or v["lora"]:
            raise ConfigError("configs/if.py: model= builds a stage from scratch; it takes no "
                              "stage= or lora=")
        return _named(v["model"])
    if not v["stage"]:
        raise ConfigError("configs/if.py needs the converted IF stage to fine-tune: "
                          "--config=configs/if.py:stage=IF_CASCADE/stage_I (or model=IF-I-XL "
                          "for a stage at a published size, from scratch)")
    if v["size"] not in ("full", "tiny"):
        raise ConfigError(f"configs/if.py: size={v['size']!r}; allowed: full, tiny")
    stage = Stage.read(v["stage"])
    if stage.config.model_family != "if":
        raise ConfigError(f"configs/if.py: {v['stage']!r} is a "
                          f"{stage.config.model_family!r} stage, not a converted IF stage")
    raw = stage.config.to_dict()
    c = common.stage_config("tiny")  # the text, data, train, mesh and sharding sections
    c.model_family = "if"
    c.model_size = os.path.basename(os.path.normpath(stage.path))
    c.model = ml_collections.ConfigDict(raw["model"])
    text = raw["text"]["encoder"]
    beside = os.path.join(stage.path, text)
    c.text.encoder = os.path.abspath(beside) if os.path.isdir(beside) else text
    c.text.max_length = raw["text"]["max_length"]
    c.text.dtype = raw["text"]["dtype"]
    for k, value in raw["diffusion"].items():
        c.diffusion[k] = value
    c.diffusion.loss_weighting = "uniform"  # L_simple of the hybrid loss is unweighted
    c.diffusion.vlb_weight = 0.001  # lambda of L_hybrid (Nichol & Dhariwal 2021)
    c.sample = ml_collections.ConfigDict(raw["sample"])

    c.train.init_from = os.path.abspath(stage.path)
    c.train.lora = ml_collections.ConfigDict({
        "rank": v["lora"], "alpha": 0.0,  # scale = alpha / rank; 0: alpha = rank
        "targets": "to_q,to_k,to_v,to_out_0,add_k_proj,add_v_proj"})
    c.train.lr = 1e-4 if v["lora"] else 1e-5
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.999
    c.train.batch_size = 16
    if v["size"] == "tiny":
        c.train.batch_size = 4
        c.train.num_steps = 30
        c.train.lr = 2e-3 if v["lora"] else 5e-4
        c.train.warmup_steps = 0
        c.train.ema_decay = 0.9
        c.train.log_every = 10
        c.train.save_every = 0
        c.sample.steps = 2
    return c


def _named(name: str) -> ml_collections.ConfigDict:
    """IF's stage I at a published size, from scratch (no weights): `model=NAME`."""
    import dataclasses

    from jaxt2i.models.if_family import IFModelConfig
    from jaxt2i.models.if_unet import SIZES
    from jaxt2i.pipelines.deepfloyd_if import MAX_LENGTH, PIPELINE_DEFAULTS
    from jaxt2i.stage import StageSettings

    sizes = [k for k in SIZES if k.startswith("IF-I-")]
    if name not in sizes:
        raise ConfigError(f"configs/if.py: model={name!r}; allowed: {', '.join(sizes)}")
    unet = dataclasses.replace(SIZES[name], dtype="bfloat16", remat=True)
    c = common.stage_config("tiny")  # the text, data, train, mesh and sharding sections
    common.paper(c)  # T5-XXL, batch 2048, bfloat16, remat, data 4 x fsdp
    c.model_family = "if"
    c.model_size = name
    c.model = ml_collections.ConfigDict(IFModelConfig(unet=unet, image_size=64).to_dict())
    c.text.max_length = MAX_LENGTH
    c.diffusion.schedule = c.diffusion.aug_schedule = "discrete_squaredcos_cap_v2"
    c.diffusion.timestep_spacing = "leading"
    c.diffusion.vlb_weight = 0.001
    c.train.optimizer = "adamw"
    c.train.lr = 1e-4
    c.sample = ml_collections.ConfigDict(StageSettings(
        sampler="ddpm", thresholding="dynamic", threshold_percentile=95.0,
        threshold_max_value=1.5, **PIPELINE_DEFAULTS[False]).to_dict())
    return c
