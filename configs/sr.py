"""Super-resolution stage (low-res image + text -> high-res image).

Variants: `:size=tiny_sr` (tests), `demo_sr` (shapes demo, 32 -> 128 px), `bench_sr22m`,
`paper_sr256` (64 -> 256, 600M), `paper_sr1024` (256 -> 1024, 400M, trained on 256 px crops,
linear schedule).
"""

from configs import common
from jaxt2i.config import parse_variant


def get_config(arg=None):
    v = parse_variant(arg, {"size": "demo_sr"})
    c = common.stage_config(v["size"])
    c.sample.sampler = "ddim"
    c.sample.guidance = 3.0
    if v["size"] == "tiny_sr":
        common.tiny(c)
    elif v["size"] == "demo_sr":
        common.demo(c, num_steps=1500)
        c.train.batch_size = 16
    elif v["size"].startswith("paper_"):
        common.paper(c)  # Adam (0.9, 0.999) for the SR models, as in the paper
        if v["size"] == "paper_sr1024":
            c.diffusion.schedule = "linear"
            c.data.random_crop = True
    return c
