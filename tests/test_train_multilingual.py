"""docs/training.md's "Training on your own captions in Chinese" (issue #28), run as its commands
read, each in a fresh process from the repository's root: token counts of the captions, a
dataset built from a folder of images with a JSONL manifest of Chinese captions, its umT5 text
cache, a base stage trained on both with the umT5 encoder named by path, and a sample of a
Chinese prompt from its export.

The umT5 is a tiny random one (width 32) with a `tokenizers` Unigram trained here on Chinese
shapes-world captions; nothing is downloaded. The docs' `/models/umt5-base` (width 768) and
`size=demo` stand for it and `size=tiny`; training runs 2 steps.
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from doc_commands import ROOT, bash_block

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from multilingual_helpers import (save_unigram_tokenizer, save_with_tokenizer,  # noqa: E402
                                  umt5, unigram_tokenizer)

SECTION = "## Training on your own captions in Chinese (mT5 / umT5)"
PROMPT = "一只红色的猫坐在蓝色的桌子上"  # the docs' sample prompt
NUM_IMAGES = 8
# What the test puts in place of the docs' encoder and sizes (paths aside); and the flags it
# adds to the training command, each a test-size choice.
SUBSTITUTE = {"size=demo": "size=tiny", "text_dim=768": "text_dim=32"}
TRAIN_EXTRA = ["--config.train.num_steps=2", "--config.train.log_every=1"]
MODULES = ["jaxt2i.encode", "jaxt2i.data.builders", "jaxt2i.data.text_cache", "jaxt2i.train",
           "jaxt2i.sample"]


def doc_commands(work, encoder):
    """The docs' commands with `zh/` in `work` and the tiny encoder and sizes put in, as
    argument lists; the training command gets TRAIN_EXTRA."""
    lines = bash_block("training.md", SECTION)
    for doc in SUBSTITUTE:  # each stands once in the training command
        assert [doc in line for line in lines] == [m == "jaxt2i.train" for m in MODULES], doc
    commands = []
    for line in lines:
        line = line.replace("zh/", f"{work}/").replace("/models/umt5-base", str(encoder))
        for doc, test in SUBSTITUTE.items():
            line = line.replace(doc, test)
        commands.append(shlex.split(line))
    assert [c[:3] for c in commands] == [["python", "-m", m] for m in MODULES], commands
    commands[3] += TRAIN_EXTRA
    return commands


def _write_inputs(work, commands):
    """Eight 16 px shapes-world images with Chinese captions, the manifest and caption list
    the docs name, and a tiny umT5 whose tokenizer is trained on Chinese captions and on the
    Chinese text of the docs' commands (their prompts)."""
    from PIL import Image

    from jaxt2i.data import shapes

    world = shapes.ShapesSource(16, NUM_IMAGES, "train", 0, language="zh")
    (work / "images").mkdir(parents=True)
    rows = []
    for i in range(NUM_IMAGES):
        ex = world[i]
        Image.fromarray(ex["image"]).save(work / "images" / f"{i:04d}.png")
        rows.append({"image": f"{i:04d}.png", "caption": ex["caption"]})
    (work / "captions.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    captions = [r["caption"] for r in rows]
    (work / "some_captions.txt").write_text("\n".join(captions + [PROMPT]) + "\n",
                                            encoding="utf-8")
    more = shapes.ShapesSource(8, 300, "train", 1, language="zh")
    doc_text = re.findall(r"[\u4e00-\u9fff，、]+", " ".join(" ".join(c) for c in commands))
    raw = unigram_tokenizer([more.caption_at(i) for i in range(300)] + captions + doc_text * 5,
                            vocab_size=200)
    tok_dir = save_unigram_tokenizer(raw, work / "tokenizer")
    model = umt5(len(transformers.AutoTokenizer.from_pretrained(str(tok_dir))) + 6)
    return captions, model


def _run(args, work, env):
    r = subprocess.run(["bash", "-c", shlex.join(args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_doc_chinese_captions_train_and_sample_with_umt5(tmp_path):
    from jaxt2i.data import builders
    from jaxt2i.data.text_cache import TextCache

    work, encoder = tmp_path / "zh", tmp_path / "umt5-tiny"
    commands = doc_commands(work, encoder)
    captions, model = _write_inputs(work, commands)
    save_with_tokenizer(model, work / "tokenizer", encoder)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(encoder))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's plain machine
    outs = [_run(args, work, env) for args in commands]

    # 1. token counts: transformers' tokenizer's, and at most one per character + 2 (the
    # docs' bound for SentencePiece tokenizers: a leading piece and </s>)
    counts = [int(n) for n in re.findall(r"^\s+(\d+) tokens ", outs[0], re.M)]
    lines = captions + [PROMPT]
    assert counts == [len(hf_tok(p)["input_ids"]) for p in lines], outs[0]
    assert all(n <= len(p) + 2 for n, p in zip(counts, lines)), (counts, lines)
    assert max(counts) <= 64  # the docs' max_length holds them

    # 2. the dataset, where the docs say it is, with every image and its Chinese caption
    dataset = outs[1].strip().splitlines()[-1].removeprefix("dataset: ")
    assert dataset == f"{work}/tfds/image_text/images/1.0.0", outs[1]
    source = builders.load_source(dataset)
    got = {source[i]["path"].decode(): source[i]["caption"].decode() for i in range(len(source))}
    assert got == {f"{i:04d}.png": c for i, c in enumerate(captions)}

    # 3. the cache holds transformers' umT5 embeddings of the dataset's captions (bfloat16)
    cache = TextCache(str(work / "cache"))
    assert (len(cache), cache.max_length, cache.d_model) == (NUM_IMAGES, 64, 32)
    batch = hf_tok([source[i]["caption"].decode() for i in range(2)], padding="max_length",
                   max_length=64, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state.numpy()
    for i in range(2):
        emb, mask = (np.asarray(a) for a in cache[i])
        np.testing.assert_array_equal(mask.astype(bool), batch["attention_mask"][i].numpy() > 0)
        m = mask.astype(bool)
        scale = np.abs(ref[i][m]).max()
        assert np.abs(emb.astype(np.float32)[m] - ref[i][m]).max() < 2e-2 * scale

    # 4. training: finite losses, a checkpoint, the export naming the umT5 encoder
    run = work / "run"
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2], rows
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows), rows
    assert os.listdir(run / "checkpoints") == ["2"]
    assert (run / "samples" / "step_0000002.png").exists()
    exported = json.loads((run / "export" / "config.json").read_text())["config"]
    assert exported["text"]["encoder"] == str(encoder), exported["text"]
    assert (exported["text"]["max_length"], exported["text"]["dtype"]) == (64, "bfloat16")
    assert exported["model"]["text_dim"] == 32

    # 5. the sample of the Chinese prompt, from that export
    out = work / "samples"
    record = json.loads((out / "sample.json").read_text())
    assert record["prompts"] == [PROMPT] and record["batch"] == [PROMPT] * 4
    assert record["checkpoints"] == [f"{run}/export"] and record["steps_trained"] == [2]
    assert sorted(os.listdir(out)) == ["000.png", "001.png", "002.png", "003.png", "grid.png",
                                       "sample.json"]
    with open(out / "000.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"wrote 4 images, grid.png and sample.json to {out}" in outs[4]


def test_chinese_caption_encodings_the_docs_name(tmp_path):
    """UTF-8 and UTF-16 (with its byte-order mark) Chinese captions are read as written; GBK /
    GB18030 ones are not (read as Windows-1252) and are counted as `non_utf8_caption`."""
    from PIL import Image

    from jaxt2i.data import builders

    texts = {"utf8": "一只红色的猫坐在蓝色的桌子上", "utf16": "两个绿色的三角形",
             "gbk": "白色背景上的一颗黄色的星星"}
    raw = {"utf8": texts["utf8"].encode("utf-8"),
           "utf16": texts["utf16"].encode("utf-16"),  # with its byte-order mark
           "gbk": texts["gbk"].encode("gb18030")}
    for name, data in raw.items():
        Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_bytes(data)  # side-car captions
    builder = builders.image_text_builder(str(tmp_path / "tfds"), str(tmp_path))
    report = builders.build(builder)
    assert report.counts["non_utf8_caption"] == 1
    assert report.examples["non_utf8_caption"] == ["gbk.png"]
    src = builders.load_source(str(builder.data_path))
    got = {src[i]["path"].decode(): src[i]["caption"].decode() for i in range(len(src))}
    assert got["utf8.png"] == texts["utf8"] and got["utf16.png"] == texts["utf16"]
    assert got["gbk.png"] != texts["gbk"] and not set(got["gbk.png"]) & set(texts["gbk"])
