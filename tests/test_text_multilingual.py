"""mT5, umT5 and ByT5 encoders against transformers' PyTorch models (issue #28).

Every checkpoint is a tiny random one made here, every tokenizer is trained (SentencePiece,
`tokenizers`' Unigram) or built (ByT5's byte tokenizer) here on Chinese, English and mixed text;
nothing is downloaded. Named sizes are checked against the published configurations, their
parameter counts against transformers' models built on the meta device (no memory).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxt2i.text import T5Config, count_params, get_t5_config, load_encoder, save_encoder
from jaxt2i.text import convert
from jaxt2i.text.tokenizer import is_byte_level

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from multilingual_helpers import (save_unigram_tokenizer, save_with_tokenizer,  # noqa: E402
                                  small_config, umt5, unigram_tokenizer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ZH = ["一只红色的猫坐在蓝色的桌子上", "两个绿色的三角形在白色的背景上", "一个红色的圆在蓝色的正方形上面",
      "画一只可爱的小狗，它在草地上奔跑。", "紫色的星星在黑色的天空里"]
EN = ["a red cat sitting on a blue table", "two green triangles on a white background",
      "a red circle above a blue square", "a purple star in the night sky"]
MIX = ["一只 red 猫 above a 蓝色的 square", "Imagen 画了一个紫色的星星",
       "a 红色的 circle 在 blue square 上面"]
CORPUS = ZH + EN + MIX
# Chinese, English, mixed, the unconditional prompt, and new combinations of known pieces.
PROMPTS = [ZH[0], EN[1], MIX[0], "", "一只紫色的猫", MIX[1]]


def _reference(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                    attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long))
    return out.last_hidden_state.numpy()


def _errors(emb, ref, mask):
    """(max abs difference, that over the reference's max abs) over the real tokens."""
    m = np.asarray(mask, bool)
    a, b = np.asarray(emb, np.float32)[m], np.asarray(ref, np.float32)[m]
    diff = float(np.abs(a - b).max())
    return diff, diff / float(np.abs(b).max())


def _check_parity(enc, model, prompts=PROMPTS, label=""):
    emb, mask = enc.encode(prompts)
    ids, _ = enc.tokenizer(prompts)
    ref = _reference(model, ids, mask)
    diff, rel = _errors(emb, ref, mask)
    print(f"\n{label} float32 max abs diff {diff:.3g} (relative {rel:.3g})")
    assert rel < 1e-4, (diff, rel)
    # Padding positions are computed too; they agree as well.
    assert _errors(emb, ref, np.ones_like(mask))[1] < 1e-4
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Tokenizers trained / built here
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A SentencePiece Unigram model trained on Chinese + English (mT5's tokenizer kind)."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm_zh")
    (d / "corpus.txt").write_text("\n".join(CORPUS * 10), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=120,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                         "extra_ids": 0}))
    return d


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory):
    """A `tokenizers` Unigram (tokenizer.json, umT5's hub format) trained on the same text."""
    raw = unigram_tokenizer(CORPUS * 20)
    return save_unigram_tokenizer(raw, tmp_path_factory.mktemp("unigram_zh")), raw


def _padded(rows, length):
    ids = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids


def test_sentencepiece_ids_match_on_chinese_english_and_mixed_text(spm_dir):
    import sentencepiece as spm

    from jaxt2i.text import load_tokenizer

    tok = load_tokenizer(str(spm_dir), 40)
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "spiece.model"))
    prompts = CORPUS + ["", "一只紫色的猫", "红色 cat，蓝色 dog"]
    want = [sp.encode(p) + [1] for p in prompts]
    ids, mask = tok(prompts)
    np.testing.assert_array_equal(ids, _padded(want, 40))
    np.testing.assert_array_equal(mask.sum(1), [len(w) for w in want])
    assert tok.lengths(prompts) == [len(w) for w in want]


def test_tokenizers_unigram_ids_match_on_chinese_english_and_mixed_text(unigram_dir):
    from jaxt2i.text import load_tokenizer

    d, raw = unigram_dir
    tok = load_tokenizer(str(d), 48)
    prompts = CORPUS + ["", "一只紫色的猫"]
    want = [raw.encode(p).ids for p in prompts]
    assert all(w[-1] == 1 for w in want)
    np.testing.assert_array_equal(tok(prompts)[0], _padded(want, 48))


# ---------------------------------------------------------------------------------------------
# mT5
# ---------------------------------------------------------------------------------------------

def _mt5(vocab, ff="gated-gelu", cls=None):
    torch.manual_seed(0)
    cfg = small_config(transformers.MT5Config, vocab_size=vocab, feed_forward_proj=ff)
    return (cls or transformers.MT5EncoderModel)(cfg).eval()


@pytest.mark.parametrize("ff", ["gated-gelu", "relu"])
def test_mt5_encoder_matches_transformers(ff, spm_dir, tmp_path):
    model = _mt5(100, ff)
    d = save_with_tokenizer(model, spm_dir, tmp_path / "mt5")
    assert json.loads((d / "config.json").read_text())["model_type"] == "mt5"
    enc = load_encoder(str(d), max_length=40)
    assert not enc.config.bias_per_layer and enc.config.feed_forward_proj == ff
    _check_parity(enc, model, label=f"mT5 ({ff})")


def test_full_mt5_checkpoint_loads_its_encoder(spm_dir, tmp_path):
    full = _mt5(100, cls=transformers.MT5ForConditionalGeneration)
    d = save_with_tokenizer(full, spm_dir, tmp_path / "mt5_full")
    enc = load_encoder(str(d), max_length=40)
    _check_parity(enc, full.encoder, label="mT5 (full checkpoint)")


# ---------------------------------------------------------------------------------------------
# umT5
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def umt5_dir(unigram_dir, tmp_path_factory):
    model = umt5(len(transformers.AutoTokenizer.from_pretrained(str(unigram_dir[0]))) + 6)
    return save_with_tokenizer(model, unigram_dir[0],
                               tmp_path_factory.mktemp("umt5") / "m"), model


def test_umt5_encoder_matches_transformers(umt5_dir):
    d, model = umt5_dir
    names = list(model.state_dict())
    assert sum("relative_attention_bias" in n for n in names) == 3  # one table per layer
    enc = load_encoder(str(d), max_length=48)
    assert enc.config.bias_per_layer
    assert set(enc.params["layers_2"]) >= {"relpos_bias", "attention", "mlp"}
    assert "relpos_bias" not in enc.params
    _check_parity(enc, model, label="umT5")


def test_umt5_bfloat16_close_to_float32_reference(umt5_dir):
    import jax.numpy as jnp

    d, model = umt5_dir
    enc = load_encoder(str(d), dtype="bfloat16", max_length=48)
    assert enc.params["layers_1"]["relpos_bias"].dtype == jnp.bfloat16
    emb, mask = enc.encode(PROMPTS)
    ids, _ = enc.tokenizer(PROMPTS)
    # The documented bound: bfloat16 keeps ~3 significant digits.
    assert _errors(emb, _reference(model, ids, mask), mask)[1] < 5e-2


def test_umt5_is_not_t5_with_a_shared_table(umt5_dir, tmp_path):
    """The test is sensitive to the per-layer tables: sharing layer 0's moves the output."""
    d, model = umt5_dir
    enc = load_encoder(str(d), max_length=48)
    shared = enc.params["layers_0"]["relpos_bias"]
    params = {k: (dict(v, relpos_bias=shared) if k.startswith("layers_") else v)
              for k, v in enc.params.items()}
    ids, mask = enc.tokenizer(PROMPTS)
    ref = _reference(model, ids, mask)
    assert _errors(enc.apply(params, ids, mask), ref, mask)[1] > 1e-2


def test_full_umt5_checkpoint_loads_its_encoder(unigram_dir, tmp_path):
    full = umt5(160, cls=transformers.UMT5ForConditionalGeneration)
    d = save_with_tokenizer(full, unigram_dir[0], tmp_path / "umt5_full")
    names = convert.read_hf_tensors(str(d), wanted=())[1]
    assert any(n.startswith("decoder.block.1.") and "relative_attention_bias" in n for n in names)
    enc = load_encoder(str(d), max_length=48)
    _check_parity(enc, full.encoder, label="umT5 (full checkpoint)")


def test_umt5_round_trips_through_save_encoder(umt5_dir, tmp_path):
    d, model = umt5_dir
    enc = load_encoder(str(d), max_length=48)
    out = tmp_path / "export"
    save_encoder(enc, str(out))
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == "umt5" and hf_cfg["architectures"] == ["UMT5EncoderModel"]
    back = transformers.UMT5EncoderModel.from_pretrained(str(out)).eval()
    _check_parity(enc, back, label="umT5 (save_encoder -> transformers)")
    # hf_to_flax and flax_to_hf are inverses, tensor for tensor.
    tensors, names = convert.read_hf_tensors(str(d))
    params = convert.hf_to_flax(tensors, names, enc.config, np.float32)
    again = convert.flax_to_hf(params, enc.config)
    assert set(again) == {e.hf_name for e in convert.param_map(enc.config)}
    for name, a in again.items():
        np.testing.assert_array_equal(a, tensors[name])
    assert load_encoder(str(out)).config == enc.config


def test_umt5_config_read_from_architectures_and_mislabelled_weights(umt5_dir, tmp_path):
    import shutil

    d, model = umt5_dir
    # Early umT5 uploads name no model_type: their `architectures` says what they are.
    bare = tmp_path / "bare"
    shutil.copytree(d, bare)
    cfg = json.loads((bare / "config.json").read_text())
    cfg.pop("model_type")
    (bare / "config.json").write_text(json.dumps(cfg))
    assert load_encoder(str(bare), max_length=48).config.bias_per_layer
    # umT5 weights under a T5 config: refused, naming the cause.
    cfg["model_type"], cfg["architectures"] = "t5", ["T5EncoderModel"]
    (bare / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unexpected tensors.*block\.1\.layer\.0\.SelfAttention"
                                         r"\.relative_attention_bias.*umt5"):
        load_encoder(str(bare), max_length=48)


def test_stages_name_them_by_path_like_any_t5(umt5_dir, byt5_dir):
    """text.encoder = a umT5 / ByT5 directory: what training and sampling load
    (`stage.load_text_encoder`), and the shape-only encoder `jaxt2i.aot` compiles against."""
    import jax

    from jaxt2i.stage import TextSpec, load_text_encoder
    from jaxt2i.text.encoder import abstract_encoder

    for d, max_length in ((umt5_dir[0], 48), (byt5_dir[0], 64)):
        enc = load_text_encoder(TextSpec(encoder=str(d), max_length=max_length))
        assert enc.max_length == max_length and enc.encode(["一只红色的猫"])[0].shape[1] == max_length
        shapes = abstract_encoder(str(d))
        assert jax.tree_util.tree_structure(shapes.params) == \
            jax.tree_util.tree_structure(enc.params)
    xxl = abstract_encoder("google/umt5-xxl", dtype="bfloat16")
    assert xxl.params["layers_23"]["relpos_bias"].shape == (32, 64)
    assert xxl.config == get_t5_config("umt5-xxl", dtype="bfloat16", param_dtype="bfloat16")


def test_config_defaults_follow_transformers():
    # An old T5 config.json without feed_forward_proj is a ReLU T5 (transformers' default).
    hf = transformers.T5Config(vocab_size=64).to_dict()
    hf.pop("feed_forward_proj")
    assert T5Config.from_hf(hf).feed_forward_proj == "relu"
    assert T5Config.from_hf({"model_type": "mt5"}).feed_forward_proj == "gated-gelu"
    umt5 = T5Config.from_hf({"model_type": "umt5", "vocab_size": 64})
    assert umt5.bias_per_layer and umt5.to_hf()["model_type"] == "umt5"
    assert not T5Config.from_hf({"model_type": "t5", "bias_per_layer": True}).bias_per_layer
    with pytest.raises(ValueError, match="model_type 'bert'"):
        T5Config.from_hf({"model_type": "bert"})


# ---------------------------------------------------------------------------------------------
# ByT5
# ---------------------------------------------------------------------------------------------

BYTE_PROMPTS = PROMPTS + ["猫🐱 and café", "ひらがな、한국어, Ελληνικά"]


def _byte_ids(prompt):
    """The reference: UTF-8 bytes shifted past <pad>=0, </s>=1, <unk>=2, then </s>."""
    return [b + 3 for b in prompt.encode("utf-8")] + [1]


@pytest.fixture(scope="module")
def byt5_dir(tmp_path_factory):
    """A tiny ByT5 as on the hub: T5 config with vocab 384, ByT5Tokenizer, no vocabulary file."""
    torch.manual_seed(0)
    cfg = small_config(transformers.T5Config, vocab_size=384, feed_forward_proj="gated-gelu",
                       tokenizer_class="ByT5Tokenizer")
    model = transformers.T5EncoderModel(cfg).eval()
    d = tmp_path_factory.mktemp("byt5") / "m"
    model.save_pretrained(str(d))
    transformers.ByT5Tokenizer().save_pretrained(str(d))
    assert not {"spiece.model", "tokenizer.json", "vocab.json"} & set(os.listdir(d))
    return d, model


def test_byt5_tokenizer_gives_utf8_byte_ids(byt5_dir):
    d, _ = byt5_dir
    enc = load_encoder(str(d), max_length=64)
    assert is_byte_level(str(d))
    ids, mask = enc.tokenizer(BYTE_PROMPTS)
    want = [_byte_ids(p) for p in BYTE_PROMPTS]
    np.testing.assert_array_equal(ids, _padded(want, 64))
    ref = transformers.ByT5Tokenizer()(BYTE_PROMPTS, padding="max_length", max_length=64)
    np.testing.assert_array_equal(ids, np.asarray(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(ref["attention_mask"], bool))
    # Lengths count bytes: a Chinese character is 3, an emoji 4, plus </s>.
    assert enc.tokenizer.lengths(["一只猫", "cat", "🐱", ""]) == [10, 4, 5, 1]


def test_byt5_max_length_counts_bytes(byt5_dir):
    d, _ = byt5_dir
    enc = load_encoder(str(d), max_length=16)
    fits, over = "一二三四五", "一二三四五六"  # 15 + 1 and 18 + 1 bytes
    assert enc.tokenizer.lengths([fits, over]) == [16, 19]
    ids, mask = enc.tokenizer([fits])
    assert mask.all() and ids[0, -1] == 1
    # What `Cascade.check_prompts` refuses (no truncation at sampling): more bytes than L.
    assert [n > enc.max_length for n in enc.tokenizer.lengths([fits, over])] == [False, True]


def test_byt5_encoder_matches_transformers(byt5_dir):
    d, model = byt5_dir
    enc = load_encoder(str(d), max_length=64)
    assert enc.config.vocab_size == 384 and not enc.config.bias_per_layer
    _check_parity(enc, model, BYTE_PROMPTS, label="ByT5")


def test_byt5_hub_layout_and_save_encoder(byt5_dir, tmp_path):
    """google/byt5-* name the tokenizer class only in config.json; save_encoder keeps it."""
    import shutil

    d, model = byt5_dir
    hub = tmp_path / "hub"
    shutil.copytree(d, hub)
    tc = json.loads((hub / "tokenizer_config.json").read_text())
    tc.pop("tokenizer_class")
    (hub / "tokenizer_config.json").write_text(json.dumps(tc))
    assert json.loads((hub / "config.json").read_text())["tokenizer_class"] == "ByT5Tokenizer"
    enc = load_encoder(str(hub), max_length=64)
    _check_parity(enc, model, BYTE_PROMPTS, label="ByT5 (hub layout)")
    out = tmp_path / "export"
    save_encoder(enc, str(out))
    again = load_encoder(str(out))
    np.testing.assert_array_equal(again.tokenizer(BYTE_PROMPTS)[0], enc.tokenizer(BYTE_PROMPTS)[0])
    _check_parity(again, transformers.T5EncoderModel.from_pretrained(str(out)).eval(),
                  BYTE_PROMPTS, label="ByT5 (save_encoder -> transformers)")


def test_encode_command_with_a_chinese_prompt_and_byt5(byt5_dir, tmp_path):
    """`python -m jaxt2i.encode --text_encoder=<ByT5 dir>` in a fresh process."""
    from safetensors.numpy import load_file

    d, model = byt5_dir
    out = tmp_path / "emb.safetensors"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    prompts = ["一只红色的猫坐在蓝色的桌子上", "", "a 红色的 circle"]
    args = [sys.executable, "-m", "jaxt2i.encode", f"--text_encoder={d}", "--max_length=48",
            f"--out={out}"] + [f"--prompt={p}" for p in prompts]
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert " 43 tokens" in r.stdout  # 14 characters x 3 bytes + </s>
    got = load_file(str(out))
    mask = got["mask"].astype(bool)
    ids = _padded([_byte_ids(p) for p in prompts], 48)
    np.testing.assert_array_equal(mask, ids > 0)
    diff, rel = _errors(got["embeddings"], _reference(model, ids, mask), mask)
    assert rel < 1e-4, (diff, rel)


# ---------------------------------------------------------------------------------------------
# Named sizes: the published configurations, and their parameter counts
# ---------------------------------------------------------------------------------------------

_V11 = {"small": (512, 1024, 8, 6), "base": (768, 2048, 12, 12), "large": (1024, 2816, 24, 16),
        "xl": (2048, 5120, 24, 32), "xxl": (4096, 10240, 24, 64)}
# (d_model, d_ff, num_layers, num_heads), d_kv 64, gated-gelu, from google/<name>/config.json.
PUBLISHED = {
    **{f"mt5-{k}": (transformers.MT5Config, transformers.MT5EncoderModel, 250112, *v)
       for k, v in _V11.items()},
    **{f"umt5-{k}": (transformers.UMT5Config, transformers.UMT5EncoderModel, 256384, *v)
       for k, v in _V11.items() if k != "large"},
    "byt5-small": (transformers.T5Config, transformers.T5EncoderModel, 384, 1472, 3584, 12, 6),
    "byt5-base": (transformers.T5Config, transformers.T5EncoderModel, 384, 1536, 3968, 18, 12),
    "byt5-large": (transformers.T5Config, transformers.T5EncoderModel, 384, 1536, 3840, 36, 16),
    "byt5-xl": (transformers.T5Config, transformers.T5EncoderModel, 384, 2560, 6720, 36, 32),
    "byt5-xxl": (transformers.T5Config, transformers.T5EncoderModel, 384, 4672, 12352, 36, 64),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_named_size_parameter_count_matches_transformers(name):
    cfg_cls, model_cls, vocab, d_model, d_ff, layers, heads = PUBLISHED[name]
    ours = get_t5_config(name)
    assert (ours.vocab_size, ours.d_model, ours.d_ff, ours.num_layers, ours.num_heads,
            ours.d_kv, ours.feed_forward_proj) == (vocab, d_model, d_ff, layers, heads, 64,
                                                   "gated-gelu")
    assert ours.bias_per_layer == name.startswith("umt5")
    hf = cfg_cls(vocab_size=vocab, d_model=d_model, d_ff=d_ff, num_layers=layers,
                 num_heads=heads, d_kv=64, feed_forward_proj="gated-gelu")
    with torch.device("meta"):  # shapes only: the xxl sizes allocate nothing
        model = model_cls(hf)
    expected = sum(p.numel() for p in model.parameters())
    n = count_params(ours)  # jax.eval_shape
    print(f"\n{name}: {n:,} encoder parameters")
    assert n == expected
    # And config.json as transformers writes it names the same encoder.
    assert T5Config.from_hf(hf.to_dict()) == ours
