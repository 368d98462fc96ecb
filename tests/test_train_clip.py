"""Contrastive CLIP training (`configs/clip.py`, `jaxt2i.train.contrastive`).

One tiny run of the documented command in a fresh process on 4 simulated devices (mesh
data 2 x fsdp 2) is shared: it must write checkpoints and a Hugging Face export that
transformers' PyTorch CLIPModel reads to the same logits, and a run resumed from its
mid-run checkpoint must retrace its losses exactly. The loss and the retrieval metrics are
checked against numpy on given inputs.
"""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.eval.retrieval import caption_objects, retrieval_accuracy
from jaxt2i.train.contrastive import MAX_LOGIT_SCALE, clip_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The command of docs/unclip.md ("Training CLIP on the shapes world"), at tiny size.
COMMAND = ["-m", "jaxt2i.train", "--config=configs/clip.py:size=tiny"]
TINY = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.train.num_steps=6",
        "--config.train.save_every=3", "--config.eval.num_scenes=8"]


def _run(workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, *COMMAND, f"--workdir={workdir}", *TINY], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clip") / "run"
    return workdir, _run(workdir)


def test_docs_show_the_command():
    with open(os.path.join(ROOT, "docs", "unclip.md")) as f:
        docs = f.read()
    assert "python -m jaxt2i.train --config=configs/clip.py:size=demo --workdir=" in docs


def test_train_writes_checkpoints_export_and_retrieval(run):
    workdir, out = run
    assert "finished at step 6" in out and "retrieval held_out (N=8)" in out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    export = workdir / "export"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "retrieval.json"):
        assert (export / name).exists(), name
    with open(export / "retrieval.json") as f:
        report = json.load(f)
    assert report["step"] == 6 and set(report) >= {"held_out", "test"}
    assert 0 <= report["held_out"]["image_to_text"] <= 1


def test_resume_is_exact(run, tmp_path):
    """A run restarted from the step-3 checkpoint computes the losses of steps 4-6 exactly
    as the uninterrupted run did, and exports the same weights."""
    workdir, _ = run
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir / "checkpoints" / "3", resumed / "checkpoints" / "3")
    _run(resumed)
    want, got = _losses(workdir), _losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == want[step], (step, got[step], want[step])
    a = (workdir / "export" / "model.safetensors").read_bytes()
    b = (resumed / "export" / "model.safetensors").read_bytes()
    assert a == b


def test_export_matches_transformers(run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxt2i.data.shapes import ShapesSource
    from jaxt2i.text.clip import preprocess_images
    from jaxt2i.text.clip_convert import load_clip

    export = str(run[0] / "export")
    clip = load_clip(export)
    src = ShapesSource(32, 4, "held_out", 5)
    captions = [src.caption_at(i) for i in range(4)]
    images = np.stack([src[i]["image"] for i in range(4)])
    ids, mask = clip.tokenize(captions)
    pixels = np.asarray(preprocess_images(jnp.asarray(images), clip.config.vision.image_size))
    ours = clip.module.apply({"params": clip.params}, ids, mask, pixels)
    model = transformers.CLIPModel.from_pretrained(export).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    enc = hf_tok(captions, padding="max_length", max_length=clip.tokenizer.max_length,
                 truncation=True, return_tensors="pt")
    np.testing.assert_array_equal(enc["input_ids"].numpy(), ids)
    with torch.no_grad():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(ours["logits_per_image"]),
                               ref.logits_per_image.numpy(), atol=1e-4, rtol=1e-4)


def _np_infonce(t, i, logit_scale):
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    i = i / np.linalg.norm(i, axis=-1, keepdims=True)
    logits = min(np.exp(logit_scale), 100.0) * i @ t.T

    def ce(x):  # mean over rows of -log softmax(x)[r, r]
        x = x - x.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(x).sum(axis=1)) - np.diag(x)))

    return 0.5 * (ce(logits) + ce(logits.T))


@pytest.mark.parametrize("logit_scale", [0.0, np.log(1 / 0.07), 6.0])  # 6.0: exp > 100, clipped
def test_loss_matches_numpy_symmetric_infonce(logit_scale):
    rng = np.random.default_rng(0)
    t, i = rng.normal(size=(2, 7, 5))
    i[3] = t[3] * 2.0  # a perfect pair, at another norm
    loss, m = clip_loss(jnp.asarray(t), jnp.asarray(i), jnp.asarray(logit_scale))
    np.testing.assert_allclose(float(loss), _np_infonce(t, i, logit_scale), rtol=1e-5)
    np.testing.assert_allclose(float(m["temperature"]), min(np.exp(logit_scale), 100.0),
                               rtol=1e-6)
    assert MAX_LOGIT_SCALE == pytest.approx(np.log(100.0))


def test_retrieval_accuracy_against_a_fixed_matrix():
    captions = ["a red circle", "a blue square", "a red circle",
                "a small red circle above a green star"]
    sim = np.array([  # rows: images, columns: captions
        [0.9, 0.1, 0.2, 0.0],   # image 0 -> caption 0: right
        [0.1, 0.2, 0.8, 0.0],   # image 1 -> caption 2 ('a red circle'): wrong
        [0.7, 0.1, 0.3, 0.0],   # image 2 -> caption 0, the same text as its own: right
        [0.0, 0.0, 0.1, 0.05],  # image 3 -> caption 2: wrong, but red circle is one of its pairs
    ])
    m = retrieval_accuracy(sim, captions)
    assert m["image_to_text"] == 0.5
    # caption 0 -> image 0 right; 1 -> image 1 right; 2 -> image 1 wrong; 3 -> image 3 right
    assert m["text_to_image"] == 0.75
    assert m["attribute"] == 0.5  # image 3's objects are {red circle, green star}
    assert m["chance"] == pytest.approx((2 + 1 + 2 + 1) / 16)
    assert m["attribute_chance"] == pytest.approx((2 + 1 + 2 + 1) / 16)
    assert caption_objects("two large green stars and a red circle on a black background") == (
        ("green", "star"), ("red", "circle"))
    with pytest.raises(ValueError, match=r"\[N, N\]"):
        retrieval_accuracy(sim[:3], captions)


# Measured on these 32 scenes: image->text 0.72 (23x chance 0.031), attribute 0.84 (22x 0.039).
MARGIN = 10.0


def test_shipped_demo_clip_retrieves_held_out_scenes():
    """The bundled CLIP, on held-out scenes it never saw (their colour-shape pairs and
    relations are not in its training split): top-1 retrieval well above chance."""
    from jaxt2i.assets import demo_clip_dir
    from jaxt2i.data.shapes import ShapesSource
    from jaxt2i.text.clip_convert import load_clip

    clip = load_clip(demo_clip_dir())
    n = 32
    src = ShapesSource(clip.config.vision.image_size, n, "held_out", 1)
    items = [src[i] for i in range(n)]
    captions = [it["caption"] for it in items]
    text = np.asarray(clip.encode_text(captions).embeds, np.float64)
    image = np.asarray(clip.encode_image(np.stack([it["image"] for it in items])).embeds,
                       np.float64)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    m = retrieval_accuracy(image @ text.T, captions)
    assert m["image_to_text"] >= MARGIN * m["chance"], m
    assert m["attribute"] >= MARGIN * m["attribute_chance"], m


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_config_variants(size):
    import jax

    from jaxt2i.config import from_json, load_config_file, to_json, validate
    from jaxt2i.text.clip import count_params
    from jaxt2i.text.clip_tokenizer import shapes_clip_tokenizer
    from jaxt2i.train.contrastive import model_config

    c = load_config_file(os.path.join(ROOT, "configs", f"clip.py:size={size}"))
    validate(c)
    assert c.kind == "clip" and from_json(to_json(c)).to_dict() == json.loads(to_json(c))
    tok = shapes_clip_tokenizer()
    m = model_config(c, tok)
    assert m.text.vocab_size == len(tok) == 635 and m.text.eos_token_id == tok.eos_token_id
    if size == "demo":  # the shipped model's size
        assert count_params(m) == 1_335_425 and m.vision.patch_size == 8
        assert c.train.batch_size % jax.device_count() == 0


def test_unknown_size_is_one_line():
    from jaxt2i.config import ConfigError, load_config_file

    with pytest.raises(ConfigError, match="use tiny or demo"):
        load_config_file(os.path.join(ROOT, "configs", "clip.py:size=huge"))


def test_shapes_tokenizer_is_a_pure_function():
    """Every process builds the same tokenizer (a resumed run tokenizes as its first run did),
    each shapes word one token."""
    import hashlib

    from jaxt2i.text.clip_tokenizer import shapes_clip_tokenizer, shapes_corpus

    tok = shapes_clip_tokenizer()
    vocab = json.dumps(tok.get_vocab(), sort_keys=True).encode()
    assert hashlib.md5(vocab).hexdigest() == "ce48e0d8b740f152adb88cd347735254"
    assert all(len(tok.tokenize(w)) == 1 for w in shapes_corpus())
