"""Fine-tuning a DeepFloyd IF stage converted from diffusers (`python -m jaxt2i.convert
--from=diffusers`), on the shapes world by default:

    python -m jaxt2i.train --config=configs/if.py:stage=if-cascade/stage_I --workdir=runs/if
    python -m jaxt2i.train --config=configs/if.py:stage=if-cascade/stage_I,lora=8 \
        --workdir=runs/if-lora

The model, text encoder, schedules and sampling settings are the converted stage's (its
config.json); training starts from its params (`train.init_from`). The loss is the hybrid loss
(`jaxt2i.diffusion.vlb`) for IF's learned-variance U-Nets.

Variants: `stage=` the converted stage directory (required); `lora=R` LoRA adapters of rank R
on the attention projections (`train.lora.targets`, `jaxt2i.models.lora`), 0 = full
fine-tuning; `size=tiny` a few small steps (tests).
"""

import os

import ml_collections

from configs import common
from jaxt2i.config import ConfigError, parse_variant


def get_config(arg=None):
    from jaxt2i.stage import Stage

    v = parse_variant(arg, {"stage": "", "lora": 0, "size": "full"})
    if not v["stage"]:
        raise ConfigError("configs/if.py needs the converted IF stage to fine-tune: "
                          "--config=configs/if.py:stage=IF_CASCADE/stage_I")
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
