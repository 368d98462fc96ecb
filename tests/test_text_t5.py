"""The Flax T5 encoder against transformers' PyTorch T5EncoderModel, on checkpoints made here."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.text import (T5Config, count_params, get_t5_config, init_encoder, load_encoder,
                         save_encoder)
from jaxt2i.text.t5 import relative_position_bucket

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

PROMPTS = [
    "a red circle above a blue square",
    "two green triangles on a white background, drawn very small in the corner of the image",
    "",
    "the quick brown fox jumps over the lazy dog while Imagen draws a purple star",
]
CORPUS = PROMPTS + [
    "un cercle rouge au-dessus d'un carré bleu", "three yellow stars left of an orange hexagon",
    "a photo of a cat sitting on a wooden table", "large text encoders understand prompts",
]


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    """A real SentencePiece T5 tokenizer trained here (no download)."""
    d = tmp_path_factory.mktemp("spiece")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 10))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "spiece"), vocab_size=80, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                         "extra_ids": 0}))
    return d


def _hf_model(ff: str, **kw):
    cfg = transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
        feed_forward_proj=ff, relative_attention_num_buckets=16,
        relative_attention_max_distance=kw.pop("max_distance", 20), dropout_rate=0.0,
        decoder_start_token_id=0, **kw)
    torch.manual_seed(0)
    return transformers.T5EncoderModel(cfg).eval()


def _save(model, spiece_dir, out, **kw):
    model.save_pretrained(out, **kw)
    tok = transformers.AutoTokenizer.from_pretrained(str(spiece_dir), local_files_only=True)
    tok.save_pretrained(out)
    return out


def _reference(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                    attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long))
    return out.last_hidden_state.numpy()


def _rel_err(a, b, mask):
    m = np.asarray(mask, bool)
    a, b = np.asarray(a, np.float32)[m], np.asarray(b, np.float32)[m]
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_matches_transformers_float32(ff, spiece_dir, tmp_path):
    model = _hf_model(ff)
    enc = load_encoder(str(_save(model, spiece_dir, tmp_path / "m")), max_length=24)
    emb, mask = enc.encode(PROMPTS)
    ids, _ = enc.tokenizer(PROMPTS)
    assert emb.shape == (4, 24, 32) and mask.shape == (4, 24)
    assert mask[2].sum() == 1  # the empty prompt is just </s>
    assert mask[1].all()  # the long prompt was truncated to the full length
    ref = _reference(model, ids, mask)
    assert _rel_err(emb, ref, mask) < 1e-4
    # Padding positions are computed too; they agree as well.
    assert _rel_err(emb, ref, np.ones_like(mask)) < 1e-4


def test_bfloat16_close_to_float32_reference(spiece_dir, tmp_path):
    model = _hf_model("gated-gelu")
    d = _save(model, spiece_dir, tmp_path / "m")
    enc = load_encoder(str(d), dtype="bfloat16", max_length=24)
    assert jax.tree_util.tree_leaves(enc.params)[0].dtype == jnp.bfloat16
    emb, mask = enc.encode(PROMPTS)
    assert emb.dtype == jnp.bfloat16
    ids, _ = enc.tokenizer(PROMPTS)
    # Documented bound: bfloat16 keeps ~3 significant digits; 3 layers accumulate to a few %.
    assert _rel_err(emb, _reference(model, ids, mask), mask) < 5e-2


def test_sharded_checkpoint_and_bfloat16_storage(spiece_dir, tmp_path):
    model = _hf_model("gated-gelu")
    d = _save(model, spiece_dir, tmp_path / "sharded", max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists()
    assert len(list(d.glob("*.safetensors"))) > 2
    enc = load_encoder(str(d), max_length=24)
    emb, mask = enc.encode(PROMPTS)
    ids, _ = enc.tokenizer(PROMPTS)
    assert _rel_err(emb, _reference(model, ids, mask), mask) < 1e-4

    # A checkpoint stored in bfloat16 (numpy cannot read it natively) loads too.
    bf = _save(model.to(torch.bfloat16), spiece_dir, tmp_path / "bf16")
    enc16 = load_encoder(str(bf), max_length=24)
    ref16 = _reference(model.to(torch.float32), ids, mask)
    assert _rel_err(enc16.encode(PROMPTS)[0], ref16, mask) < 5e-2


def test_full_seq2seq_checkpoint_loads_encoder(spiece_dir, tmp_path):
    cfg = _hf_model("gated-gelu").config
    torch.manual_seed(1)
    full = transformers.T5ForConditionalGeneration(cfg).eval()
    d = _save(full, spiece_dir, tmp_path / "full")
    enc = load_encoder(str(d), max_length=16)
    emb, mask = enc.encode(PROMPTS[:2])
    ids, _ = enc.tokenizer(PROMPTS[:2])
    with torch.no_grad():
        ref = full.encoder(input_ids=torch.tensor(ids).long(),
                           attention_mask=torch.tensor(mask).long()).last_hidden_state.numpy()
    assert _rel_err(emb, ref, mask) < 1e-4


def _rewrite(path, fn):
    from safetensors.numpy import load_file, save_file
    tensors = fn(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


def test_bad_checkpoints_give_clear_errors(spiece_dir, tmp_path):
    model = _hf_model("relu")
    name = "encoder.block.1.layer.1.DenseReluDense.wi.weight"

    d = _save(model, spiece_dir, tmp_path / "shape")
    _rewrite(str(d / "model.safetensors"), lambda t: {**t, name: t[name][:, :-1].copy()})
    with pytest.raises(ValueError, match=r"wrong shape.*block\.1\.layer\.1\.DenseReluDense\.wi"):
        load_encoder(str(d))

    d = _save(model, spiece_dir, tmp_path / "missing")
    _rewrite(str(d / "model.safetensors"), lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match="missing tensors.*DenseReluDense.wi.weight"):
        load_encoder(str(d))

    d = _save(model, spiece_dir, tmp_path / "extra")
    _rewrite(str(d / "model.safetensors"),
             lambda t: {**t, "encoder.block.0.layer.9.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensors.*layer\.9\.extra"):
        load_encoder(str(d))

    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_encoder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(str(tmp_path / "empty"))


def test_save_encoder_round_trips_through_transformers(spiece_dir, tmp_path):
    model = _hf_model("gated-gelu")
    enc = load_encoder(str(_save(model, spiece_dir, tmp_path / "m")), max_length=24)
    out = tmp_path / "export"
    save_encoder(enc, str(out))
    back = transformers.T5EncoderModel.from_pretrained(str(out)).eval()
    ids, mask = enc.tokenizer(PROMPTS)
    emb, _ = enc.encode(PROMPTS)
    assert _rel_err(emb, _reference(back, ids, mask), mask) < 1e-4
    assert load_encoder(str(out)).max_length == 24  # text length travels in config.json


def test_tokenizer_mask_truncation_reported_once(spiece_dir, tmp_path, caplog):
    model = _hf_model("relu")
    enc = load_encoder(str(_save(model, spiece_dir, tmp_path / "m")), max_length=8)
    with caplog.at_level(logging.WARNING, logger="jaxt2i"):
        ids, mask = enc.tokenizer(PROMPTS)
        enc.tokenizer(PROMPTS)
    assert sum("truncated" in r.message for r in caplog.records) == 1
    lengths = enc.tokenizer.lengths(PROMPTS)
    np.testing.assert_array_equal(mask.sum(1), np.minimum(lengths, 8))
    assert (ids[~mask] == 0).all() and ids[0, mask[0].sum() - 1] == 1  # pad 0, ends with </s>
    assert ids[1, -1] == 1  # a truncated prompt still ends with </s>
    with pytest.raises(TypeError, match="list of strings"):
        enc.tokenizer("one string")


def test_relative_position_buckets_match_transformers():
    rel = np.arange(-200, 201)[None, :]
    for buckets, dist in [(32, 128), (16, 20), (8, 7)]:
        ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            torch.tensor(rel), bidirectional=True, num_buckets=buckets, max_distance=dist).numpy()
        np.testing.assert_array_equal(relative_position_bucket(rel, buckets, dist), ref)


def _published_param_count(d_model, d_ff, layers, heads, d_kv, vocab, gated=True, buckets=32):
    attn = 4 * d_model * heads * d_kv
    ff = (3 if gated else 2) * d_model * d_ff
    return vocab * d_model + layers * (attn + ff + 2 * d_model) + d_model + buckets * heads


def test_xxl_parameter_count_by_eval_shape():
    n = count_params(get_t5_config("t5-v1_1-xxl"))
    expected = _published_param_count(4096, 10240, 24, 64, 64, 32128)
    assert n == expected
    assert abs(n - 4.76e9) / 4.76e9 < 0.01
    assert count_params(get_t5_config("flan-t5-xxl")) == n
    assert count_params(get_t5_config("t5-base")) == _published_param_count(
        768, 3072, 12, 12, 64, 32128, gated=False)


def test_config_errors_and_logical_axes():
    with pytest.raises(ValueError, match="unknown T5 size 'xxxl'"):
        get_t5_config("xxxl")
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-tanh'"):
        T5Config(feed_forward_proj="gated-tanh")
    with pytest.raises(ValueError, match="dtype 'float8'"):
        T5Config(dtype="float8")
    from flax import linen as nn

    from jaxt2i.text import T5Encoder
    cfg = get_t5_config("tiny")
    shapes = jax.eval_shape(lambda: T5Encoder(cfg).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool)))
    axes = nn.get_partition_spec(shapes)["params"]
    flat = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert all(isinstance(p, jax.sharding.PartitionSpec) and len(p) > 0 for p in flat)
    assert tuple(axes["token_embedding"]) == ("vocab", "embed")
    assert tuple(axes["layers_0"]["attention"]["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(axes["layers_1"]["mlp"]["wo"]["kernel"]) == ("mlp", "embed")


def test_init_encoder_is_usable_inside_jit(spiece_dir):
    from jaxt2i.text import load_tokenizer
    enc = init_encoder(get_t5_config("tiny", vocab_size=96), load_tokenizer(str(spiece_dir), 12))
    ids, mask = enc.tokenizer(PROMPTS)

    @jax.jit
    def pooled(params, ids, mask):
        emb = enc.module.apply({"params": params}, ids, mask)
        return (emb * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)

    out = pooled(enc.params, ids, mask)
    assert out.shape == (4, 32) and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(enc.encode(PROMPTS)[0]),
                               np.asarray(enc.encode_ids(ids, mask)), rtol=0, atol=0)
