"""CLIP trained contrastively on the shapes world (`kind='clip'`: `python -m jaxt2i.train`
dispatches to `jaxt2i.train.contrastive`).

Variants: `:size=tiny` (tests: the 'tiny' CLIP, a handful of steps) and `:size=demo` (a small
ViT on 32 px scenes, trained on a 2-core CPU in about ten minutes; what jaxt2i/assets/demo_clip
ships). The tokenizer is the shapes world's CLIP BPE (`jaxt2i.text.clip_tokenizer`); the text
tower's vocab_size 0 and eos_token_id -1 mean "the tokenizer's".
"""

import ml_collections

from configs import common

from jaxt2i.config import parse_variant
from jaxt2i.text.clip import get_clip_config

# demo: patch 8 on 32 px (a 4 x 4 grid), 128 wide, 3 layers a tower: 1.3M params. Patch 4
# (an 8 x 8 grid) ran at half the images per second on the 2-core CPU (30 against 65).
_DEMO_TOWER = dict(width=128, layers=3, heads=4, mlp_dim=512)


def get_config(arg=None):
    v = parse_variant(arg, {"size": "demo"})
    if v["size"] not in ("tiny", "demo"):
        from jaxt2i.config import ConfigError

        raise ConfigError(f"unknown configs/clip.py size {v['size']!r}; use tiny or demo")
    model = get_clip_config("tiny").to_dict()
    model["text"].update(vocab_size=0, eos_token_id=-1, max_length=32)
    c = ml_collections.ConfigDict()
    c.kind = "clip"
    c.model_size = v["size"]
    c.model = ml_collections.ConfigDict(model)

    # CLIP's AdamW (b2 0.98, weight decay 0.1); 0: no averaging (evaluated and exported
    # params = trained ones); eval: retrieval among N captions (chance ~1/N)
    common.shapes_run(c, b2=0.98, weight_decay=0.1, ema_decay=0.0)

    if v["size"] == "demo":
        c.model.text.update(_DEMO_TOWER)
        c.model.vision.update(_DEMO_TOWER, patch_size=8)
        c.model.projection_dim = 128
        c.train.batch_size = 64
        c.train.num_steps = 450  # about 8 minutes on a shared 2-core CPU
        c.train.lr = 1e-3
        c.train.warmup_steps = 50
        c.train.log_every = 25
        c.train.save_every = 150
        c.eval.num_scenes = 100
    return c
