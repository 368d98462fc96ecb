"""Super-resolution stage (low-res image + text -> high-res image).

Variants: `:size=tiny_sr` (tests), `demo_sr` (shapes demo, 32 -> 128 px), `bench_sr22m`,
`paper_sr256` (64 -> 256, 600M), `paper_sr1024` (256 -> 1024, 400M, trained on 256 px crops,
linear schedule).
"""

from configs.common import stage_config
from jaxt2i.config import parse_variant


def get_config(arg=None):
    v = parse_variant(arg, {"size": "demo_sr"})
    c = stage_config(v["size"], sr=True)
    c.sample.sampler = "ddim"
    c.sample.guidance = 3.0
    if v["size"] == "tiny_sr":
        c.train.batch_size = 4
        c.train.num_steps = 20
        c.train.warmup_steps = 2
        c.train.log_every = 5
        c.train.save_every = 10
        c.sample.steps = 4
        c.model.text_dim = 128
    elif v["size"].startswith("paper_"):
        c.text.encoder = "google/t5-v1_1-xxl"
        c.text.max_length = 128
        c.text.dtype = "bfloat16"
        c.train.b2 = 0.999
        c.train.batch_size = 2048 if v["size"] == "paper_sr256" else 4096
        c.train.num_steps = 2_500_000
        c.train.warmup_steps = 10_000
        c.model.dtype = "bfloat16"
        c.model.remat = True
        c.mesh.fsdp = -1
        c.mesh.data = 1
        if v["size"] == "paper_sr1024":
            c.diffusion.schedule = "linear"
            c.data.random_crop = True
    return c
