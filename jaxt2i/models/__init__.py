"""Diffusion U-Nets: the Efficient U-Net family of Imagen's base and super-resolution stages.

``UNet(config).apply(variables, x_t, noise_level, text_emb, text_mask, lowres=None,
aug_level=None, image_embed=None)`` predicts eps, v or x0 (``config.objective``) in NHWC
layout (``image_embed``: unCLIP's decoder, ``config.image_embed_dim``). Named sizes are listed
in ``SIZES`` and built with ``get_unet_config(name, **overrides)``. The unCLIP diffusion prior
is ``jaxt2i.models.prior``.
"""

from jaxt2i.models.unet import (
    SIZES, UNet, UNetConfig, count_params, example_inputs, get_unet_config, param_shapes)

__all__ = ["SIZES", "UNet", "UNetConfig", "count_params", "example_inputs",
           "get_unet_config", "param_shapes"]
