"""Base (text-to-image, lowest resolution) stage.

Variants: `:size=tiny` (tests), `demo` (the shapes demo, 32 px), `bench_23m`, `paper_base64`
(the paper's 2B model: Adafactor, batch 2048, T5-XXL text).
"""

from configs import common
from jaxt2i.config import parse_variant


def get_config(arg=None):
    v = parse_variant(arg, {"size": "demo"})
    c = common.stage_config(v["size"])
    if v["size"] == "tiny":
        common.tiny(c)
    elif v["size"] == "demo":
        common.demo(c, num_steps=3000)
        # Measured on the shapes world (README): dynamic thresholding at guidance 5 greys and
        # breaks up flat white backgrounds; static clipping at guidance 3 keeps them.
        c.sample.guidance = 3.0
        c.sample.thresholding = "static"
    elif v["size"] == "paper_base64":
        common.paper(c)
        c.train.optimizer = "adafactor"
    return c
