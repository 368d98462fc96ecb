"""Base (text-to-image, lowest resolution) stage.

Variants: `:size=tiny` (tests), `demo` (the shapes demo, 32 px), `bench_23m`, `paper_base64`
(the paper's 2B model: Adafactor, batch 2048, T5-XXL text).
"""

from configs.common import stage_config
from jaxt2i.config import parse_variant


def get_config(arg=None):
    v = parse_variant(arg, {"size": "demo"})
    c = stage_config(v["size"], sr=False)
    if v["size"] == "tiny":
        c.train.batch_size = 4
        c.train.num_steps = 20
        c.train.warmup_steps = 2
        c.train.log_every = 5
        c.train.save_every = 10
        c.sample.steps = 4
        c.model.text_dim = 128  # the bundled encoder's width
    elif v["size"] == "paper_base64":
        c.text.encoder = "google/t5-v1_1-xxl"
        c.text.max_length = 128
        c.text.dtype = "bfloat16"
        c.train.optimizer = "adafactor"
        c.train.batch_size = 2048
        c.train.num_steps = 2_500_000
        c.train.warmup_steps = 10_000
        c.model.dtype = "bfloat16"
        c.model.remat = True
        c.mesh.fsdp = -1
        c.mesh.data = 1
    return c
