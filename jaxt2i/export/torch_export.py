"""PyTorch export: each stage as `model.safetensors` + `config.json`, the T5 encoder as a
Hugging Face directory.

Layout written by `export_torch`:

    OUT/cascade.json            stages, text encoder, the sampling defaults of each stage
    OUT/text_encoder/           `transformers.T5EncoderModel.from_pretrained` and
                                `AutoTokenizer.from_pretrained` load it
    OUT/stageK_.../model.safetensors   PyTorch names and layouts (Linear [out, in], Conv OIHW)
    OUT/stageK_.../config.json         {"unet": UNetConfig, "config": stage config, "step"}

`jaxt2i.export.torch_unet.TorchUNet.from_pretrained(OUT/stageK_...)` (the `[torch]` extra)
builds the same U-Net in PyTorch and loads the weights with `strict=True`. Writing needs no
torch. An unCLIP cascade's prior and CLIP are added by `unclip_export`.
"""

from __future__ import annotations

import os

from jaxt2i.export.common import stage_dir_name, write_json


def export_torch(cascade, settings, root: str, dtype: str = "float32", progress=None) -> dict:
    """Writes the cascade under `root` in PyTorch layout with weights in `dtype`.

    Returns:
      the cascade.json record.
    """
    from jaxt2i.export.torch_convert import save_pretrained
    from jaxt2i.text.encoder import save_encoder

    say = progress or (lambda msg: None)
    say("text encoder: writing the Hugging Face T5 directory")
    save_encoder(cascade.encoder, os.path.join(root, "text_encoder"), dtype=dtype)
    names = []
    for k, (stage, st) in enumerate(zip(cascade.stages, settings)):
        name = stage_dir_name(k, stage.unet_cfg)
        names.append(name)
        say(f"stage {k}: writing {name}/model.safetensors")
        save_pretrained(os.path.join(root, name), stage.params, stage.unet_cfg.to_dict(),
                        dtype=dtype, extra={"config": stage.config.to_dict(), "step": stage.step,
                                            "sample_defaults": st.to_dict()})
    record = {"format": "torch", "stages": names, "text_encoder": "text_encoder",
              "max_length": cascade.encoder.max_length, "dtype": dtype, "layout": "NCHW",
              "module": "jaxt2i.export.torch_unet.TorchUNet"}
    write_json(os.path.join(root, "cascade.json"), record)
    return record
