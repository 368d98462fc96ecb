"""The U-Net families a `Stage` can hold, picked by name from its config's `model_family`.

A family knows how to read its `model` section, build its network, make example inputs and
abstract params, and apply the network to a `Stage`'s inputs:

    family = get_family("if")
    cfg = family.config_from_dict(section, dtype=None)   # the typed `StageConfig.model`
    module = family.network(cfg)
    args, kwargs = family.network_inputs(cfg, x_t, t, cond)  # the network's call arguments
    out = module.apply({"params": params}, *args, **kwargs)   # (done by `Stage` alone)

Every family's config exposes what the cascade, the samplers and the exporters read of a
stage: `image_size`, `lowres_size`, `is_sr`, `channels`, `text_dim`, `objective`, `dtype`,
`remat`, `remat_policy`, `crop_size` and `to_dict()`; `family.learned_variance(cfg)` says
whether the network also predicts a variance (then the network returns 2C channels: the
prediction, then IF's learned-range interpolation v in [-1, 1]). Families:

  'efficient_unet'  Imagen's Efficient U-Net (`jaxt2i.models.unet`); every config without a
                    `model_family` is one.
  'if'              DeepFloyd IF's stage I / II U-Nets (`jaxt2i.models.if_family`).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from jaxt2i.config import ConfigError

DEFAULT_FAMILY = "efficient_unet"


class EfficientUNetFamily:
    """Imagen's Efficient U-Net: `UNetConfig` / `UNet`, as stages have always held."""

    name = "efficient_unet"

    def config_from_dict(self, section: Mapping[str, Any], dtype: str | None = None):
        from jaxt2i.models.unet import UNetConfig

        return UNetConfig.from_dict(dict(section, **({"dtype": dtype} if dtype else {})))

    def network(self, cfg):
        from jaxt2i.models.unet import UNet

        return UNet(cfg)

    def example_inputs(self, cfg, batch_size: int, text_len: int) -> dict:
        from jaxt2i.models.unet import example_inputs

        return example_inputs(cfg, batch_size, text_len)

    def param_shapes(self, cfg):
        from jaxt2i.models.unet import param_shapes

        return param_shapes(cfg)

    def count_params(self, cfg) -> int:
        from jaxt2i.models.unet import count_params

        return count_params(cfg)

    def learned_variance(self, cfg) -> bool:
        return False

    def network_inputs(self, cfg, x_t, t, cond: Mapping[str, Any]) -> tuple[tuple, dict]:
        kwargs = {"lowres": cond.get("lowres"), "aug_level": cond.get("aug_level")}
        if "image_embed" in cond:  # the unCLIP decoder's CLIP embedding
            kwargs["image_embed"] = cond["image_embed"]
        return (x_t, t, cond["text_emb"], cond["text_mask"]), kwargs

    def upsample(self, cfg, lowres, size: int):
        from jaxt2i.models.unet import resize_lowres

        return resize_lowres(lowres, (size, size), cfg.lowres_resize)


@functools.lru_cache(maxsize=None)
def families() -> dict[str, Any]:
    """{name: family object} of every registered family."""
    from jaxt2i.models.if_family import IFFamily

    return {f.name: f for f in (EfficientUNetFamily(), IFFamily())}


FAMILY_NAMES = ("efficient_unet", "if")


def get_family(name: str | None):
    """The family called `name` (None = 'efficient_unet'); ConfigError (one line) otherwise."""
    name = DEFAULT_FAMILY if name is None else name
    if name not in FAMILY_NAMES:
        raise ConfigError(f"model_family={name!r} is not a U-Net family this jaxt2i knows; "
                          f"allowed: {', '.join(FAMILY_NAMES)}")
    return families()[name]


__all__ = ["DEFAULT_FAMILY", "EfficientUNetFamily", "FAMILY_NAMES", "families", "get_family"]
