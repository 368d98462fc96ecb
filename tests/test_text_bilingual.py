"""Issue #28: the bundled encoder reads the shapes world in Chinese as well as English, and
`python -m jaxt2i.train.align_text` learns the Chinese words' rows through a frozen cascade."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxt2i import assets
from jaxt2i.data import shapes
from jaxt2i.text import load_encoder
from jaxt2i.text.tokenizer import UnknownTextError, build_word_tokenizer

from bilingual_helpers import english_only_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _captions(language: str, n: int = 600) -> list[str]:
    out = []
    for i in range(n):
        rng = np.random.default_rng([7, i])
        out.append(shapes.caption(shapes.sample_scene(rng, shapes.SPLITS[i % 3]), rng, language))
    return out


def test_chinese_words_are_whole_tokens_after_every_english_id():
    english = build_word_tokenizer(assets.vocabulary())
    both = build_word_tokenizer(assets.vocabulary(), unspaced_words=shapes.vocabulary_zh())
    en = _captions("en")
    assert both(en)["input_ids"] == english(en)["input_ids"]
    assert len(english) == 256 and len(both) == 256 + len(shapes.vocabulary_zh())
    words = set(shapes.vocabulary_zh())
    for c in _captions("zh"):
        pieces = both.tokenize(c)
        assert pieces[0] == "\u2581" and set(pieces[1:]) <= words, (c, pieces)
        assert "".join(pieces[1:]) == c
        assert all(i >= 256 for i in both(c, add_special_tokens=False)["input_ids"][1:])


def test_the_bundled_encoder_encodes_english_almost_as_before_and_reads_chinese():
    enc = load_encoder(assets.text_encoder_dir())
    ref = english_only_encoder()
    prompts = _captions("en", 64) + ["", "a cross"]
    got, mask = enc.encode(prompts)
    want, want_mask = ref.encode(prompts)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(want_mask))
    # Its layers were trained with the Chinese rows (`align_text --layers_lr`), which held the
    # English encodings near the English-only encoder's (keep_english): measured 8.7e-5 of
    # their mean square; the demo's English eval rows are unchanged (docs/demo.md).
    w = np.asarray(mask)[..., None]
    got, want = np.asarray(got), np.asarray(want)
    rel = np.sum(w * (got - want) ** 2) / np.sum(w * want ** 2)
    assert 0 < rel < 5e-4, rel
    emb, mask = enc.encode(_captions("zh", 64))
    assert np.isfinite(np.asarray(emb)).all() and np.asarray(mask).sum(1).min() > 3
    # The learned rows moved from where `python -m jaxt2i.assets` starts them.
    with open(os.path.join(assets.text_encoder_dir(), "config.json")) as f:
        cfg = json.load(f)
    assert cfg[assets.LEARNED_ROWS_KEY] == 256
    assert cfg["jaxt2i_learned_rows"]["command"].startswith("python -m jaxt2i.train.align_text")


@pytest.mark.parametrize("prompt,unknown", [("一只可爱的猫", "'只', '可', '爱', '猫'"),
                                            ("一个红色的心形", "'心'")])
def test_chinese_outside_the_world_is_one_line_in_chinese(prompt, unknown):
    enc = load_encoder(assets.text_encoder_dir())
    with pytest.raises(UnknownTextError) as e:
        enc.encode([prompt])
    msg = str(e.value)
    assert "\n" not in msg and unknown in msg and repr(prompt) in msg
    assert "'一个红色的圆形在一个蓝色的正方形上面'" in msg and "mT5, umT5 or ByT5" in msg


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_align_text_command_learns_only_the_new_rows_and_resumes(tiny_cascade_dir, tmp_path):
    """docs/text-encoder.md's three commands (fewer, smaller steps; the sample on the tiny
    cascade): the loss falls, every other weight is the input's, English encodes as before, the
    aligned encoder samples a Chinese prompt; a second run resumes."""
    enc_dir, out = tmp_path / "zh_encoder", tmp_path / "zh_aligned"
    r = _run("jaxt2i.assets", f"--out={enc_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    args = ["jaxt2i.train.align_text", f"--text_encoder={enc_dir}", f"--out={out}",
            "--batch_size=8", "--lr=0.05", "--log_every=10", "--save_every=20"]  # the demo
    r = _run(*args, "--steps=40")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "aligning 82 token rows (ids 256..337) through 1 frozen stage(s)" in r.stdout
    assert re.search(r"step 40/40: loss stage1=[0-9.]+; [0-9.]+ steps/s, ETA", r.stdout)
    record = json.loads((out / "config.json").read_text())["jaxt2i_learned_rows"]
    assert [row[0] for row in record["losses"]] == [10, 20, 30, 40]
    before, after = load_encoder(str(enc_dir)), load_encoder(str(out))
    # The learned rows bring the demo's predictions from Chinese captions closer to those from
    # English ones, on batches the run never drew (40 steps of 8 moved it 15%).
    held = [_held_out_loss(enc) for enc in (before, after)]
    assert held[1] < 0.92 * held[0], held
    flat = lambda p: {k: np.asarray(v) for k, v in jax_flat(p)}  # noqa: E731
    b, a = flat(before.params), flat(after.params)
    for k in b:
        if k != "token_embedding":
            np.testing.assert_array_equal(a[k], b[k])
    tb, ta = b["token_embedding"], a["token_embedding"]
    np.testing.assert_array_equal(ta[:256], tb[:256])
    np.testing.assert_array_equal(ta[338:], tb[338:])
    assert np.abs(ta[256:338] - tb[256:338]).max() > 0.1
    np.testing.assert_array_equal(np.asarray(after.encode(["a red circle"])[0]),
                                  np.asarray(before.encode(["a red circle"])[0]))

    zh = "一个红色的圆形在一个蓝色的正方形上面"
    r = _run("jaxt2i.sample", f"--checkpoint={tiny_cascade_dir}", f"--text_encoder={out}",
             "--prompt", zh, "--num_images=2", "--steps=2", f"--out={tmp_path / 'samples'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "samples" / "sample.json").read_text())["prompts"][0] == zh

    r = _run(*args, "--steps=60")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming {out} at step 40 of 60" in r.stdout and "step 50/60" in r.stdout
    record = json.loads((out / "config.json").read_text())["jaxt2i_learned_rows"]
    assert [row[0] for row in record["losses"]] == [10, 20, 30, 40, 50, 60]

    r = _run("jaxt2i.train.align_text", f"--text_encoder={enc_dir}", f"--out={enc_dir}")
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "holds no align_state.npz" in lines[0]
    r = _run("jaxt2i.train.align_text", f"--out={tmp_path / 'new'}", "--stages=3",
             f"--text_encoder={enc_dir}")
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode == 2 and lines == ["error: --stages=3: the cascade has stages 1..2"]


@pytest.mark.slow
def test_align_text_with_layers_trains_them_and_holds_english(tmp_path):
    """`--layers_lr`: the encoder's layers train beside the Chinese rows (through the bundled
    demo's base), the English rows stay bit for bit, the English encodings move only a little
    (the keep_english term), and a resume with another --layers_lr is one error line."""
    enc_dir, out = tmp_path / "zh_encoder", tmp_path / "zh_layers"
    assert _run("jaxt2i.assets", f"--out={enc_dir}").returncode == 0
    args = ["jaxt2i.train.align_text", f"--text_encoder={enc_dir}", f"--out={out}",
            "--batch_size=8", "--lr=0.05", "--layers_lr=3e-4", "--log_every=5", "--steps=10"]
    r = _run(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "aligning 82 token rows (ids 256..337) and the encoder's layers" in r.stdout
    assert re.search(r"step 10/10: loss stage1=[0-9.]+ keep_english=[0-9.]+;", r.stdout)
    record = json.loads((out / "config.json").read_text())["jaxt2i_learned_rows"]
    assert record["layers_lr"] == 3e-4 and record["text_encoder"] == str(enc_dir)
    before, after = load_encoder(str(enc_dir)), load_encoder(str(out))
    b, a = ({k: np.asarray(v) for k, v in jax_flat(e.params)} for e in (before, after))
    assert b.keys() == a.keys()
    moved = [k for k in b if k != "token_embedding" and not np.array_equal(a[k], b[k])]
    assert len(moved) > len(b) // 2, moved  # the layers trained
    np.testing.assert_array_equal(a["token_embedding"][:256], b["token_embedding"][:256])
    prompts = _captions("en", 64)
    (old, mask), (new, _) = before.encode(prompts), after.encode(prompts)
    w = np.asarray(mask)[..., None]
    rel = np.sum(w * (np.asarray(new) - old) ** 2) / np.sum(w * np.asarray(old) ** 2)
    assert 0 < rel < 0.05, rel

    r = _run("jaxt2i.train.align_text", f"--out={out}", "--steps=20")
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode == 2 and lines == [
        f"error: --layers_lr=0.0: {out} was started with --layers_lr=0.0003; resume it with "
        "that value"], lines
    shutil.rmtree(enc_dir)  # the English reference of a resume is gone: one line
    r = _run("jaxt2i.train.align_text", f"--out={out}", "--steps=20", "--layers_lr=3e-4")
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "restore it there" in lines[0], lines
    assert str(enc_dir) in lines[0]


def _held_out_loss(encoder) -> float:
    """The alignment loss of `encoder` through the bundled demo's base on 4 fixed batches of 32
    caption pairs (seeds the command never uses)."""
    import jax

    from jaxt2i.cascade import load_cascade
    from jaxt2i.train.align_text import Aligner

    cascade = load_cascade(assets.demo_cascade_dir(), encoder=encoder)
    al = Aligner(cascade, 256, 0.01, 10)
    losses = []
    for r in range(4):
        batch = al.batch(np.random.default_rng([123, r]), 32, None)
        losses.append(float(al._loss(al.initial(), [al.stages[0].params], batch,
                                     jax.random.key(r))[0]))
    return float(np.mean(losses))


def jax_flat(params, prefix=""):
    for k, v in params.items():
        if isinstance(v, dict):
            yield from jax_flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.slow  # three demo-size training runs of 2 steps and an evaluation in both languages
def test_round11_bilingual_base_commands_run_as_written(tmp_path):
    """docs/demo.md's round 11: round 10's base trained on captions in both languages in three
    runs, each from the one before, and the held-out evaluation in both languages, each in a
    fresh process, shortened to a few steps of small batches. Round 10's export is stood in for
    by the bundled base (round 11's: the same architecture)."""
    from doc_commands import bash_block, shortened, workspace

    cmds = bash_block("demo.md", "## Chinese prompts", 1)
    assert [c.split()[2] for c in cmds] == ["jaxt2i.train"] * 3 + ["jaxt2i.eval"]
    assert all("--config.data.caption_language=both" in c for c in cmds[:3])
    for cmd, start in zip(cmds, ["runs/base_r10/export", "runs/base_both", "runs/base_both2"]):
        assert f"--config.train.init_from={start} " in cmd
    assert "--checkpoint=runs/base_both3 " in cmds[3]
    ws = workspace(tmp_path)
    os.makedirs(ws / "runs" / "base_r10")
    os.symlink(os.path.join(ROOT, "jaxt2i", "assets", "demo_cascade", "base"),
               ws / "runs" / "base_r10" / "export")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    results = []
    for cmd in cmds:
        r = subprocess.run(["bash", "-c", shortened(cmd)], cwd=ws, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, (cmd, r.stderr[-3000:])
        results.append(r)
    with open(ws / "runs" / "base_both3" / "config.json") as f:
        config = json.load(f)  # the last run's config
    assert config["data"]["caption_language"] == "both"
    assert config["train"]["init_from"] == "runs/base_both2"
    record = json.loads(results[-1].stdout.strip().splitlines()[-1])
    assert set(record["results"]) == {"held_out", "held_out (zh)"}
    assert record["steps_trained"][0] == 2  # the third run's, not the bundled base
