"""The README's commands as a user runs them: each in a fresh process, its output then read by
its consumer (the data pipeline's reader, PyTorch, `jax.export`). Failure paths of the same
commands are tested beside their modules; these are the success paths."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=ROOT):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (args, r.stderr[-3000:])
    return r


def test_data_builder_and_text_cache_commands(tmp_path):
    from jaxt2i import assets
    from jaxt2i.data import builders, shapes
    from jaxt2i.data.text_cache import TextCache
    from jaxt2i.text import load_encoder

    r = _run("jaxt2i.data.builders", f"--data_dir={tmp_path / 'tfds'}", "--shapes=16:8:2")
    dataset = r.stdout.strip().splitlines()[-1].removeprefix("dataset: ")
    source = builders.load_source(dataset)
    assert len(source) == 8
    want = shapes.ShapesSource(16, 8, "train", 0)
    for i in range(8):  # TFDS stores examples in its own order; each keeps its index
        ex = source[i]
        assert ex["caption"].decode() == want.caption_at(int(ex["index"]))

    _run("jaxt2i.data.text_cache", f"--encoder={assets.text_encoder_dir()}",
         f"--out_dir={tmp_path / 'cache'}", "--shapes=train:6")
    cache = TextCache(str(tmp_path / "cache"))
    assert len(cache) == 6
    enc = load_encoder(assets.text_encoder_dir())
    caps = shapes.ShapesSource(16, 6, "train", 0)
    emb, mask = enc.encode([caps.caption_at(i) for i in range(6)])
    got_emb, got_mask = cache[3]
    n = int(np.asarray(mask[3]).sum())
    np.testing.assert_array_equal(np.asarray(got_mask).astype(bool), np.asarray(mask[3]))
    # bfloat16 storage: 3 significant digits of the encoder's float32 output
    np.testing.assert_allclose(np.asarray(got_emb, np.float32)[:n],
                               np.asarray(emb[3])[:n], rtol=2e-2, atol=2e-2)


def test_export_commands_load_in_their_consumers(tiny_cascade_dir, tmp_path):
    """`python -m jaxt2i.export --format=torch|stablehlo` in fresh processes; PyTorch's
    TorchUNet and `jax.export` reproduce the JAX cascade."""
    torch = pytest.importorskip("torch")
    from jaxt2i.cascade import load_cascade
    from jaxt2i.export.stablehlo import run_exported
    from jaxt2i.export.torch_unet import TorchUNet

    cascade = load_cascade(str(tiny_cascade_dir))
    _run("jaxt2i.export", f"--checkpoint={tiny_cascade_dir}", "--format=torch",
         f"--out={tmp_path / 'pt'}")
    names = json.loads((tmp_path / "pt" / "cascade.json").read_text())["stages"]
    net = TorchUNet.from_pretrained(str(tmp_path / "pt" / names[0])).eval()
    c = cascade.stages[0].unet_cfg
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, c.image_size, c.image_size, 3)).astype(np.float32)
    t = np.array([0.3, 0.7], np.float32)
    emb, mask = cascade.encoder.encode(["a red circle", "two green stars"])
    emb, mask = np.array(emb, np.float32), np.array(mask)
    want = np.asarray(cascade.stages[0].model.apply({"params": cascade.stages[0].params},
                                                    jnp.asarray(x), jnp.asarray(t), emb, mask))
    with torch.no_grad():
        got = net(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                  torch.from_numpy(emb), torch.from_numpy(mask)).permute(0, 2, 3, 1).numpy()
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    _run("jaxt2i.export", f"--checkpoint={tiny_cascade_dir}", "--format=stablehlo",
         "--steps=2", "--platforms=cpu", f"--out={tmp_path / 'hlo'}")
    prompts = ["a red circle", ""]
    want = cascade.sample(prompts, seed=3, settings=cascade.settings([{"steps": 2}] * 2))
    np.testing.assert_array_equal(run_exported(str(tmp_path / "hlo"), prompts, seed=3), want)


def test_assets_command_rebuilds_the_shipped_text_encoder_but_its_learned_rows(tmp_path):
    """`python -m jaxt2i.assets --out=DIR` writes the shipped encoder's files: the tokenizer byte
    for byte, the English words' embedding rows, every layer where the shipped record says
    `align_text` did not train them (`layers_lr` 0; docs/text-encoder.md), and config.json but
    the record of that."""
    from safetensors.numpy import load_file

    from jaxt2i import assets

    _run("jaxt2i.assets", f"--out={tmp_path / 'enc'}")
    shipped = assets.text_encoder_dir()
    names = sorted(os.listdir(shipped))
    assert names and sorted(os.listdir(tmp_path / "enc")) == names
    for n in names:
        if n.startswith("tokenizer"):
            with open(os.path.join(shipped, n), "rb") as a, open(tmp_path / "enc" / n, "rb") as b:
                assert a.read() == b.read(), n
    with open(os.path.join(shipped, "config.json")) as f:
        cfg = json.load(f)
    record = cfg.pop("jaxt2i_learned_rows")
    assert cfg == json.loads((tmp_path / "enc" / "config.json").read_text())
    first, rows = cfg[assets.LEARNED_ROWS_KEY], record["rows"]
    want, got = load_file(str(tmp_path / "enc" / "model.safetensors")), load_file(
        os.path.join(shipped, "model.safetensors"))
    assert sorted(want) == sorted(got)
    layers_trained = record.get("layers_lr", 0) > 0
    moved = [k for k in want if k != "shared.weight" and not np.array_equal(got[k], want[k])]
    assert bool(moved) == layers_trained, moved
    for k in want:
        if k == "shared.weight":  # the token embedding (Hugging Face's name)
            np.testing.assert_array_equal(got[k][:first], want[k][:first])
            np.testing.assert_array_equal(got[k][first + rows:], want[k][first + rows:])
            assert not np.array_equal(got[k][first:first + rows], want[k][first:first + rows])


def test_encode_command_with_an_empty_prompt_and_a_prompts_file(tmp_path):
    """docs/text-encoder.md's command: `--prompt ""` is kept, the file's lines are stripped and
    its blank lines skipped; the safetensors file holds what the encoder gives in Python."""
    from safetensors.numpy import load_file

    from jaxt2i import assets
    from jaxt2i.text import load_encoder

    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("  two green stars \n\n   \na red circle\n", encoding="utf-8")
    out = tmp_path / "emb.safetensors"
    _run("jaxt2i.encode", "--prompt", "a red circle above a blue square", "--prompt", "",
         f"--prompts_file={prompts_file}", f"--out={out}")
    want = ["a red circle above a blue square", "", "two green stars", "a red circle"]
    from safetensors import safe_open

    with safe_open(str(out), "numpy") as f:
        assert json.loads(f.metadata()["prompts"]) == want
    got = load_file(str(out))
    emb, mask = load_encoder(assets.text_encoder_dir()).encode(want)
    np.testing.assert_array_equal(got["mask"].astype(bool), np.asarray(mask))
    np.testing.assert_allclose(got["embeddings"], np.asarray(emb, np.float32), atol=1e-5)


@pytest.mark.slow
def test_readme_chinese_prompt_draws_what_it_says(tmp_path):
    """The README's Chinese prompt through the bundled demo: the shapes detector reads the
    samples against the prompt (a red circle above a blue square)."""
    from PIL import Image

    from jaxt2i.eval import detector

    zh = "一个红色的圆形在一个蓝色的正方形上面"
    cmd = f'python -m jaxt2i.sample --prompt "{zh}" --num_images=4 --out=samples_zh'
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert cmd in f.read()
    _run("jaxt2i.sample", "--prompt", zh, "--num_images=4", "--out=samples_zh", cwd=tmp_path)
    images = sorted((tmp_path / "samples_zh").glob("[0-9][0-9][0-9].png"))
    assert len(images) == 4
    scores = [detector.score(np.asarray(Image.open(p).convert("RGB")), zh) for p in images]
    assert sum(s["colour"] and s["shape"] for s in scores) >= 3, [s["found"] for s in scores]
