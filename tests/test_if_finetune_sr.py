"""Fine-tuning a DeepFloyd IF stage II (super-resolution) through `python -m jaxt2i.train`:
the tiny random stage II of `test_if_pipeline` (a diffusers UNet2DConditionModel with IF-II's
config, converted by `python -m jaxt2i.convert --from=diffusers`), trained on the shapes world
with its low-res input upsampled and noise-augmented as IF does (the level is the U-Net's
class label), in a fresh process; and the shapes evaluator's command of docs/deepfloyd-if.md
on the converted cascade.
"""

import importlib
import json
import re
import shlex

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from test_if_pipeline import DOC, SIZE_I, SIZE_II, converted, pipelines  # noqa: E402,F401
from test_if_train import _cli, _held_out_losses  # noqa: E402

from jaxt2i.models.if_unet import IFUNet  # noqa: E402


@pytest.mark.slow
def test_stage_two_fine_tunes_and_exports_to_diffusers(converted, tmp_path):
    """`configs/if.py:stage=.../stage_II,size=tiny` (30 steps of batch 4): its low-res inputs
    are 16 px shapes renders, its held-out loss (upsampled, augmented low-res input, the
    hybrid loss) falls below 0.9 of the converted model's; its export, written in diffusers'
    layout, loads in UNet2DConditionModel and computes what our network computes (with the
    augmentation level as class label) within 1e-4."""
    from jaxt2i.checkpoint import load_exported
    from jaxt2i.models.if_convert import save_if_unet

    stage_dir = converted["out"] / "stage_II"
    cfg = importlib.import_module("configs.if").get_config(f"stage={stage_dir},size=tiny")
    assert cfg.model.image_size == SIZE_II and cfg.model.lowres_size == SIZE_I
    run = tmp_path / "run"
    r = _cli(["jaxt2i.train", f"--config=configs/if.py:stage={stage_dir},size=tiny",
              f"--workdir={run}"])
    print(r.stdout.strip().splitlines()[-1])
    before, after = _held_out_losses(run, [stage_dir, run / "export"])
    print(f"stage II held-out loss: converted {before:.4f}, fine-tuned {after:.4f}")
    assert after < 0.9 * before

    params = load_exported(str(run / "export"))[0]
    ours = converted["cascade"].stages[1].config.model.unet
    save_if_unet(ours, params, str(tmp_path / "unet"))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, SIZE_II, SIZE_II, 6)).astype(np.float32)  # [x_t, upscaled]
    text = rng.standard_normal((2, 5, ours.text_dim)).astype(np.float32)
    t, level = np.array([10.0, 700.0]), np.array([250.0, 0.0])
    out = jax.jit(IFUNet(ours).apply)({"params": params}, x, t, text, aug_level=level)
    with torch.no_grad():
        ref = unet(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(t), torch.tensor(text),
                   class_labels=torch.tensor(level)).sample
    np.testing.assert_allclose(np.asarray(out), ref.permute(0, 2, 3, 1).numpy(), atol=1e-4,
                               rtol=1e-4)


def test_doc_command_evaluates_a_converted_cascade(converted):
    """docs' `python -m jaxt2i.eval --checkpoint=if-cascade ...` in a fresh process, on both
    stages of the tiny converted cascade (4 held-out prompts, 2 steps each): one scored
    32 px image per prompt."""
    cmd = shlex.split(re.search(r"```bash\n(python -m jaxt2i.eval --checkpoint=if-cascade[^\n]*)",
                                open(DOC).read()).group(1))
    args = [a.replace("if-cascade", str(converted["out"])) for a in cmd[2:]]
    args = [a for a in args
            if not a.startswith(("--stages", "--num_prompts", "--steps", "--splits"))]
    r = _cli(args + ["--stages=2", "--num_prompts=4", "--batch_size=4", "--steps=2,2",
                     "--splits=held_out"])
    record = json.loads(r.stdout.strip().splitlines()[-1])
    assert record["image_size"] == SIZE_II and record["num_prompts"] == 4
    row = record["results"]["held_out"]
    assert row["n"] == 4 and all(0 <= row[k] <= 1 for k in ("colour", "background", "whole")
                                 if row[k] is not None)
