"""The Flax CLIP against transformers' PyTorch CLIPModel, on tiny checkpoints made here.

A CLIP BPE tokenizer is trained in the test (the `tokenizers` library, CLIP's normaliser and
pre-tokeniser, byte alphabet + merges + the two special tokens last, as OpenAI's vocabulary is
laid out); nothing is downloaded. Parameter counts of the named sizes are checked against
transformers' CLIPModel built on the meta device (no memory).
"""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.text import clip_convert
from jaxt2i.text.clip import (CLIPConfig, CLIPModel, SIZES, count_params, eos_positions,
                              get_clip_config, init_clip, preprocess_images)
from jaxt2i.text.clip_convert import init_clip_model, load_clip, save_clip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

PROMPTS = [
    "a photo of a cat",
    "two dogs playing in the snow next to a red circle above a blue square, drawn small",
    "",
    "The quick brown fox!",
]
CORPUS = PROMPTS + ["a red circle above a blue square", "the lazy dog sleeps in the sun",
                    "a diagram of a cat and a dog"]
TEXT_LENGTH = 16


def _rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A CLIP tokenizer trained here: CLIPTokenizer over a BPE vocabulary of our own."""
    from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(
        vocab_size=200, end_of_word_suffix="</w>", show_progress=False))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {}
    for t in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]:
        vocab.setdefault(t, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the largest id, as in OpenAI's vocabulary
    d = tmp_path_factory.mktemp("clip_tok")
    transformers.CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def vocab(tok_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return len(tok), tok.eos_token_id


def _text_config(vocab, act="quick_gelu", eos=None):
    n, eos_id = vocab
    return dict(vocab_size=n, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, hidden_act=act,
                eos_token_id=eos_id if eos is None else eos, bos_token_id=n - 2, pad_token_id=n - 1,
                projection_dim=24)


# image 36 with patch 8: a 4 x 4 grid, the last 4 pixels unused (as by the convolution)
VISION = dict(image_size=36, patch_size=8, hidden_size=40, intermediate_size=56,
              num_hidden_layers=2, num_attention_heads=5, projection_dim=24)


def _perturb(model, seed):
    """Random values in every parameter (LayerNorms and logit_scale included)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _hf_clip(vocab, act="quick_gelu", seed=0):
    cfg = transformers.CLIPConfig(text_config=_text_config(vocab, act),
                                  vision_config=dict(VISION, hidden_act=act),
                                  projection_dim=24, logit_scale_init_value=2.0)
    torch.manual_seed(seed)
    return _perturb(transformers.CLIPModel(cfg), seed)


def _save(model, tok_dir, out, **kw):
    model.save_pretrained(str(out), **kw)
    transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True) \
        .save_pretrained(str(out))
    return out


def _pixels(n=3, size=36, seed=0):
    """Normalised pixels [n, size, size, 3] (NHWC) and the same as a torch NCHW tensor."""
    px = np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)
    return px, torch.tensor(px.transpose(0, 3, 1, 2))


def _torch_ids(ids, mask):
    return torch.tensor(np.asarray(ids)).long(), torch.tensor(np.asarray(mask)).long()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_transformers_float32(act, vocab, tok_dir, tmp_path):
    model = _hf_clip(vocab, act)
    clip = load_clip(str(_save(model, tok_dir, tmp_path / "m")))
    assert clip.config.text.activation == act and clip.tokenizer.max_length == TEXT_LENGTH
    text = clip.encode_text(PROMPTS)
    assert text.states.shape == (4, TEXT_LENGTH, 32) and text.embeds.shape == (4, 24)
    assert text.mask[2].sum() == 2 and text.mask[1].all()  # '' is start + end; [1] truncated
    ids, mask = clip.tokenize(PROMPTS)
    px, px_t = _pixels()
    image = clip.encode_image(px, preprocess=False)
    logits = jax.jit(clip.module.apply)({"params": clip.params}, ids, mask, px)
    with torch.no_grad():
        t_ids, t_mask = _torch_ids(ids, mask)
        ref_text = model.text_model(input_ids=t_ids, attention_mask=t_mask)
        ref_text_embeds = model.get_text_features(input_ids=t_ids,
                                                  attention_mask=t_mask).pooler_output
        ref_vision = model.vision_model(pixel_values=px_t)
        ref_image_embeds = model.get_image_features(pixel_values=px_t).pooler_output
        ref = model(input_ids=t_ids, attention_mask=t_mask, pixel_values=px_t)
    errors = {
        "text states": _rel_err(text.states, ref_text.last_hidden_state),  # padding too
        "text pooled": _rel_err(text.pooled, ref_text.pooler_output),
        "text embeds": _rel_err(text.embeds, ref_text_embeds),
        "vision pooled": _rel_err(image.pooled, ref_vision.pooler_output),
        "image embeds": _rel_err(image.embeds, ref_image_embeds),
        "logits_per_image": _rel_err(logits["logits_per_image"], ref.logits_per_image),
        "logits_per_text": _rel_err(logits["logits_per_text"], ref.logits_per_text),
        "normalised text embeds": _rel_err(logits["text_embeds"], ref.text_embeds),
    }
    print(f"\n{act}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < 1e-4, errors
    np.testing.assert_allclose(float(clip.params["logit_scale"]), model.logit_scale.item(),
                               rtol=1e-7)


def test_eos_pooling_rule_both_conventions(vocab, tmp_path):
    ids = jnp.array([[5, 9, 3, 7, 3], [1, 3, 8, 8, 0]])
    np.testing.assert_array_equal(eos_positions(ids, 3), [2, 1])  # first eos
    np.testing.assert_array_equal(eos_positions(ids, 2), [1, 2])  # legacy: largest id, first
    np.testing.assert_array_equal(eos_positions(ids, 4), [0, 0])  # absent: position 0 (as HF)
    # Both rules against transformers' text model (here a CLIPTextModelWithProjection
    # directory: the text-only load path), on ids where the two rules disagree.
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 60, size=(3, 10))
    ids[:, 4] = 7  # eos for the new rule; larger ids elsewhere
    ids[1, 6] = 7
    mask = np.ones_like(ids, bool)
    mask[2, 8:] = False
    for eos in (2, 7):
        cfg = transformers.CLIPTextConfig(**_text_config((64, 63), eos=eos))
        torch.manual_seed(eos)
        model = _perturb(transformers.CLIPTextModelWithProjection(cfg), eos)
        model.save_pretrained(str(tmp_path / f"eos{eos}"))
        clip = load_clip(str(tmp_path / f"eos{eos}"))
        assert clip.config.vision is None and clip.config.text.eos_token_id == eos
        assert clip.tokenizer is None
        states, pooled, embeds = clip.encode_text_ids(ids, mask)
        with torch.no_grad():
            ref = model(*_torch_ids(ids, mask))
        assert _rel_err(states, ref.last_hidden_state) < 1e-4
        assert _rel_err(embeds, ref.text_embeds) < 1e-4
        expect = np.asarray(states)[np.arange(3), ids.argmax(-1) if eos == 2 else 4]
        np.testing.assert_array_equal(np.asarray(pooled), expect)
        with pytest.raises(ValueError, match="no vision tower"):
            clip.encode_image(np.zeros((1, 36, 36, 3), np.uint8))
        with pytest.raises(ValueError, match="no tokenizer"):
            clip.encode_text(["a cat"])


def test_vision_only_directory_and_text_only_load_of_a_full_clip(vocab, tok_dir, tmp_path):
    cfg = transformers.CLIPVisionConfig(**VISION)
    torch.manual_seed(3)
    vmodel = _perturb(transformers.CLIPVisionModelWithProjection(cfg), 3)
    vmodel.save_pretrained(str(tmp_path / "vision"))
    clip = load_clip(str(tmp_path / "vision"))
    assert clip.config.text is None
    px, px_t = _pixels(2, seed=1)
    with torch.no_grad():
        ref = vmodel(pixel_values=px_t).image_embeds
    assert _rel_err(clip.encode_image(px, preprocess=False).embeds, ref) < 1e-4
    with pytest.raises(ValueError, match="no text tower"):
        clip.module.apply({"params": clip.params}, jnp.zeros((1, 4), jnp.int32),
                          jnp.ones((1, 4), bool), method="encode_text")

    full = _save(_hf_clip(vocab), tok_dir, tmp_path / "full")
    text_only = load_clip(str(full), towers=["text"])
    assert text_only.config.vision is None and set(text_only.params) == {
        "text_model", "text_projection"}
    both = load_clip(str(full))
    np.testing.assert_array_equal(np.asarray(text_only.encode_text(PROMPTS).embeds),
                                  np.asarray(both.encode_text(PROMPTS).embeds))
    with pytest.raises(ValueError, match="no text tower"):
        load_clip(str(tmp_path / "vision"), towers=["text"])
    with pytest.raises(ValueError, match="towers must name"):
        load_clip(str(full), towers=["audio"])


def test_round_trip_through_transformers(vocab, tok_dir, tmp_path):
    model = _hf_clip(vocab, "gelu", seed=5)
    clip = load_clip(str(_save(model, tok_dir, tmp_path / "m")))
    out = tmp_path / "export"
    save_clip(clip, str(out))
    text_cfg = json.loads((out / "config.json").read_text())["text_config"]
    assert (text_cfg["bos_token_id"], text_cfg["pad_token_id"]) == (vocab[0] - 2, vocab[1])
    back = transformers.CLIPModel.from_pretrained(str(out)).eval()
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)
    ids, mask = clip.tokenize(PROMPTS)
    px, px_t = _pixels(2, seed=2)
    ours = jax.jit(clip.module.apply)({"params": clip.params}, ids, mask, px)
    t_ids, t_mask = _torch_ids(ids, mask)
    with torch.no_grad():
        ref = back(input_ids=t_ids, attention_mask=t_mask, pixel_values=px_t)
    assert _rel_err(ours["logits_per_image"], ref.logits_per_image) < 1e-4
    again = load_clip(str(out))  # and our own export loads back, tokenizer included
    assert again.config == clip.config and again.tokenizer.max_length == TEXT_LENGTH
    np.testing.assert_array_equal(np.asarray(again.encode_text(PROMPTS).embeds),
                                  np.asarray(clip.encode_text(PROMPTS).embeds))

    # A randomly initialised CLIP exports too, and transformers agrees with it.
    fresh = init_clip_model(get_clip_config("tiny"))
    save_clip(fresh, str(tmp_path / "fresh"))
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "fresh")).eval()
    ids = np.array([[126, 5, 6, 127, 127], [126, 127, 127, 127, 127]])  # tiny's eos: 127
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
    t_ids, t_mask = _torch_ids(ids, mask)
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output
    assert _rel_err(fresh.encode_text_ids(ids, mask)[2], ref) < 1e-4


def test_sharded_and_bfloat16_checkpoints(vocab, tok_dir, tmp_path):
    model = _hf_clip(vocab)
    d = _save(model, tok_dir, tmp_path / "sharded", max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) > 2
    ref = load_clip(str(_save(model, tok_dir, tmp_path / "single")))
    clip = load_clip(str(d))
    np.testing.assert_array_equal(np.asarray(clip.encode_text(PROMPTS).embeds),
                                  np.asarray(ref.encode_text(PROMPTS).embeds))
    bf = _save(model.to(torch.bfloat16), tok_dir, tmp_path / "bf16")
    clip16 = load_clip(str(bf), dtype="bfloat16")
    assert clip16.params["logit_scale"].dtype == jnp.bfloat16
    px, _ = _pixels(2)
    emb16 = clip16.encode_image(px, preprocess=False).embeds
    assert emb16.dtype == jnp.bfloat16
    # bfloat16 keeps ~3 significant digits; 2 layers accumulate to a few percent.
    assert _rel_err(emb16, ref.encode_image(px, preprocess=False).embeds) < 5e-2


def _rewrite(path, fn):
    from safetensors.numpy import load_file, save_file
    save_file(fn(load_file(str(path))), str(path), metadata={"format": "pt"})


def test_bad_inputs_give_clear_errors(vocab, tok_dir, tmp_path):
    model = _hf_clip(vocab)
    clip = load_clip(str(_save(model, tok_dir, tmp_path / "ok")))
    with pytest.raises(ValueError,
                       match=r"\[B, 36, 36, 3\].*got \(2, 32, 32, 3\).*preprocess_images"):
        clip.encode_image(np.zeros((2, 32, 32, 3), np.float32), preprocess=False)
    with pytest.raises(ValueError, match="text length 20 exceeds the 16 positions"):
        clip.encode_text_ids(np.zeros((1, 20), np.int32), np.ones((1, 20), bool))
    with pytest.raises(ValueError, match="max_length 77 does not fit.*16 positions"):
        load_clip(str(tmp_path / "ok"), max_length=77)
    with pytest.raises(FileNotFoundError, match="CLIP .* is not a directory"):
        load_clip(str(tmp_path / "nowhere"))

    name = "vision_model.encoder.layers.1.mlp.fc1.weight"
    d = _save(model, tok_dir, tmp_path / "shape")
    _rewrite(d / "model.safetensors", lambda t: {**t, name: t[name][:, :-1].copy()})
    with pytest.raises(ValueError,
                       match=rf"tensor {name} has shape \[56, 39\], expected \[56, 40\]"):
        load_clip(str(d))
    d = _save(model, tok_dir, tmp_path / "missing")
    _rewrite(d / "model.safetensors", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=rf"lacks 1 tensor\(s\).*{name}"):
        load_clip(str(d))
    d = _save(model, tok_dir, tmp_path / "extra")
    _rewrite(d / "model.safetensors", lambda t: {**t, "text_model.extra.weight": np.zeros(2)})
    with pytest.raises(ValueError, match=r"1 tensor\(s\) a CLIP .* does not: text_model\.extra"):
        load_clip(str(d))
    (d / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="model_type 't5' is not a CLIP"):
        load_clip(str(d))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_clip(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown CLIP size 'ViT-Z/1'"):
        get_clip_config("ViT-Z/1")
    with pytest.raises(ValueError, match=r"width \(30\) must be divisible by text.heads \(4\)"):
        get_clip_config("tiny").text.__class__(width=30, heads=4)
    with pytest.raises(ValueError, match="activation 'swish'"):
        CLIPConfig.from_hf({"model_type": "clip_vision_model", "hidden_act": "swish"})


def test_tokenizer_fixed_length_and_no_false_unknown_warning(vocab, tok_dir, tmp_path, caplog):
    clip = load_clip(str(_save(_hf_clip(vocab), tok_dir, tmp_path / "m")))
    with caplog.at_level(logging.WARNING, logger="jaxt2i"):
        ids, mask = clip.tokenize(PROMPTS)
    # CLIP's <unk> is its end-of-text token: that is not unknown text.
    assert not any("does not know" in r.message for r in caplog.records)
    assert sum("truncated" in r.message for r in caplog.records) == 1
    n, eos = vocab
    assert ids.shape == (4, TEXT_LENGTH) and (ids[:, 0] == n - 2).all()
    last = mask.sum(1) - 1
    assert (ids[np.arange(4), last] == eos).all()  # every prompt ends with end-of-text
    assert (ids[~mask] == eos).all()  # padded with <|endoftext|>, masked out
    default = load_clip(str(tmp_path / "m"), max_length=8)
    assert default.tokenize(["a cat"])[0].shape == (1, 8)


def test_preprocess_matches_transformers_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    exact = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    ref = proc(images=list(exact), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = preprocess_images(jnp.asarray(exact), 32)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)  # no resize: exact
    # Resized (48 x 40 -> 38 x 32 -> crop 32): PIL's bicubic differs a little from JAX's.
    smooth = np.kron(rng.integers(0, 256, size=(12, 10, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    ref = proc(images=[smooth], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = np.asarray(preprocess_images(jnp.asarray(smooth[None]), 32))
    assert ours.shape == ref.shape == (1, 32, 32, 3)
    err = np.abs(ours - ref)
    print(f"\npreprocess with resize: mean abs {err.mean():.3f}, max {err.max():.3f} "
          f"(normalised units; range {ref.max() - ref.min():.1f})")
    assert err.mean() < 0.05 * (ref.max() - ref.min())
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        preprocess_images(jnp.zeros((32, 32, 3)), 32)


@pytest.mark.parametrize("name", list(SIZES))
def test_named_size_counts_match_transformers_meta_device(name):
    ours = get_clip_config(name)
    hf = transformers.CLIPConfig.from_dict(ours.to_hf())
    with torch.device("meta"):  # shapes only: ViT-H allocates nothing
        model = transformers.CLIPModel(hf)
    expected = sum(p.numel() for p in model.parameters())
    n = count_params(ours)  # jax.eval_shape
    print(f"\n{name}: {n:,} parameters")
    assert n == expected
    # And config.json as transformers writes it names the same model.
    assert CLIPConfig.from_hf(hf.to_dict()) == ours


def test_logical_axes_and_config_round_trip():
    from flax import linen as nn

    cfg = get_clip_config("tiny")
    axes = nn.get_partition_spec(jax.eval_shape(lambda: init_clip(cfg, jax.random.key(0))))
    assert tuple(axes["text_model"]["token_embedding"]) == ("vocab", "embed")
    layer = axes["vision_model"]["layers_1"]
    assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(layer["self_attn"]["out_proj"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(layer["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(layer["fc2"]["kernel"]) == ("mlp", "embed")
    assert tuple(axes["vision_model"]["pre_layrnorm"]["scale"]) == ("norm",)
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    assert get_clip_config("ViT-L/14-336").vision.image_size == 336
    assert get_clip_config("ViT-H/14").text.activation == "gelu"
    # Old CLIPModel configs kept their towers in text_config_dict / vision_config_dict.
    old = CLIPConfig.from_hf({"model_type": "clip", "text_config_dict": {"hidden_size": 64,
                              "num_attention_heads": 4, "eos_token_id": 2},
                              "vision_config_dict": {"patch_size": 16}})
    assert old.text.width == 64 and old.text.eos_token_id == 2 and old.vision.patch_size == 16
    assert isinstance(CLIPModel(cfg), nn.Module) and clip_convert.param_map(cfg)


def test_docs_snippet_runs(vocab, tok_dir, tmp_path):
    """The Python example of docs/text-encoder.md's CLIP section, on a tiny checkpoint."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "text-encoder.md").read_text()
    section = doc[doc.index("## CLIP"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    d = _save(_hf_clip(vocab), tok_dir, tmp_path / "m")
    code = code.replace("/models/clip-vit-large-patch14", str(d))
    code = code.replace("(4, 480, 640, 3)", "(4, 48, 64, 3)")  # less to compile
    scope = {}
    exec(compile(code, "docs/text-encoder.md", "exec"), scope)
    assert scope["out"]["logits_per_image"].shape == (4, 2)
    assert scope["text"].states.shape == (2, TEXT_LENGTH, 32)


def test_runs_sharded_under_the_project_rules():
    """fsdp x tensor on the 4 simulated CPU devices: same outputs as unsharded."""
    from flax import linen as nn

    from jaxt2i.parallel.mesh import make_mesh
    from jaxt2i.parallel.sharding import DEFAULT_RULES, logical_shardings

    if jax.device_count() < 4:
        pytest.skip("needs 4 (simulated) devices")
    cfg = get_clip_config("tiny")
    mesh = make_mesh({"fsdp": 2, "tensor": 2}, jax.devices()[:4])
    boxed = jax.jit(lambda k: init_clip(cfg, k))(jax.random.key(1))
    shardings = logical_shardings(boxed, mesh)
    params = jax.device_put(nn.unbox(boxed), shardings)
    spec = shardings["text_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].spec
    assert tuple(spec) == ("fsdp", "tensor", None)  # embed -> fsdp, heads -> tensor
    ids = np.array([[126, 5, 9, 127, 127, 127], [126, 127, 127, 127, 127, 127]] * 2)
    mask = np.arange(6) <= np.array([[3], [1], [3], [1]])
    px = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    model = CLIPModel(cfg)
    run = jax.jit(lambda p, i, m, x: model.apply({"params": p}, i, m, x))
    ref = run(nn.unbox(boxed), ids, mask, px)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        out = run(params, ids, mask, px)
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-5)
