"""unCLIP's decoder: a base Efficient U-Net conditioned on the caption and on the CLIP image
embedding of its image (Ramesh et al. 2022, sec. 2).

The train step embeds each training image with the frozen CLIP image tower (`clip.path`;
'bundled' = the shipped demo CLIP, whose joint space is 128 wide: `model.image_embed_dim`),
then drops the embedding for `diffusion.image_drop_prob` of the examples (10%, the paper) and
the caption for `diffusion.cond_drop_prob` (50%, the paper), independently. The caption comes
from the stage's text encoder, as for the Imagen base stage (`text.encoder`). Variants:
`:size=tiny` (tests) and `:size=demo` (the shapes demo's base U-Net, 32 px).
"""

from configs import base
from jaxt2i.config import ConfigError, parse_variant

CLIP_DIM = 128  # the bundled demo CLIP's projection_dim


def get_config(arg=None):
    v = parse_variant(arg, {"size": "demo"})
    if v["size"] not in ("tiny", "demo"):
        raise ConfigError(f"unknown configs/unclip_decoder.py size {v['size']!r}; use tiny or "
                          "demo")
    c = base.get_config(f"size={v['size']}")
    c.model.image_embed_dim = CLIP_DIM
    c.model.image_embed_tokens = 4  # the paper's extra context tokens
    c.clip = {"path": "bundled"}
    c.diffusion.cond_drop_prob = 0.5  # the caption (paper: 50%)
    c.diffusion.image_drop_prob = 0.1  # the CLIP image embedding (paper: 10%)
    return c
