"""unCLIP's diffusion prior trained on the shapes world (`kind='prior'`: `python -m jaxt2i.train`
dispatches to `jaxt2i.train.prior`).

The frozen CLIP (`clip.path`; 'bundled' = the shipped demo CLIP) gives, inside the train step,
each caption's token states and text embedding (the prior's inputs) and its scene's image
embedding (the target). Variants: `:size=tiny` (tests: the tiny prior, a handful of steps) and
`:size=demo`. The model's clip_dim, text_dim and max_text_len 0 mean "the CLIP's".
"""

import ml_collections

from configs import common

from jaxt2i.config import ConfigError, parse_variant
from jaxt2i.models.prior import get_prior_config


def get_config(arg=None):
    v = parse_variant(arg, {"size": "demo"})
    if v["size"] not in ("tiny", "demo"):
        raise ConfigError(f"unknown configs/prior.py size {v['size']!r}; use tiny or demo")
    c = ml_collections.ConfigDict()
    c.kind = "prior"
    c.model_size = v["size"]
    c.model = ml_collections.ConfigDict(get_prior_config(v["size"]).to_dict())
    c.model.update(clip_dim=0, text_dim=0, max_text_len=0)  # 0: the CLIP's

    c.clip = ml_collections.ConfigDict()
    c.clip.path = "bundled"  # a Hugging Face CLIP directory; 'bundled' = the demo CLIP

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"
    c.diffusion.loss_weighting = "uniform"  # the paper's plain MSE on x0
    c.diffusion.text_drop_prob = 0.1  # caption dropped for classifier-free guidance (paper)

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ddim"
    c.sample.steps = 64  # the paper's
    c.sample.guidance = 1.0  # 1: no unconditional half
    c.sample.num_candidates = 2  # the paper: 2 samples, the nearer one to the text kept

    # the paper's prior optimizer (Table 3: AdamW b2 0.96, weight decay 6.0e-2); eval: the
    # held-out / test scenes whose captions the evaluation samples
    common.shapes_run(c, b2=0.96, weight_decay=0.06, ema_decay=0.99)

    if v["size"] == "tiny":
        c.sample.steps = 8
    else:
        c.train.batch_size = 64
        c.train.num_steps = 1000
        c.train.lr = 5e-4
        c.train.warmup_steps = 50
        c.train.ema_decay = 0.999
        c.train.log_every = 25
        c.train.save_every = 250
        c.eval.num_scenes = 100
    return c
