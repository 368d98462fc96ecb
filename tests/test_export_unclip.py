"""`python -m jaxt2i.export` of an unCLIP cascade: the prior, the CLIP and the image-embedding
decoder, each checked in the framework that consumes it (PyTorch: TorchPrior, transformers'
CLIPModel, TorchUNet; ONNX: onnxruntime) against the JAX models on the same inputs.

The cascade is the tiny random one of `unclip_helpers` (prior, 16 px decoder, 16 -> 32 px SR)
on the bundled demo CLIP.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxt2i.config import ConfigError
from jaxt2i.export import export_cascade
from jaxt2i.export.common import file_sha256

from unclip_helpers import ROOT, pipe, unclip_dir  # noqa: F401 (fixtures)

TOL = 1e-4  # float32 max abs error (the U-Net tests' tolerance); outputs are O(0.1 - 1)
PROMPTS = ["a red circle above a blue square", "two small green stars", ""]


@pytest.fixture(scope="module")
def clip():
    from jaxt2i.prior_stage import load_frozen_clip

    return load_frozen_clip("bundled")


def _cli(unclip_dir, fmt, out):
    """docs/export.md's command, in a fresh process: (output dir, completed process)."""
    r = subprocess.run([sys.executable, "-m", "jaxt2i.export", f"--checkpoint={unclip_dir}",
                        f"--format={fmt}", f"--out={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    return out, r


@pytest.fixture(scope="module")
def torch_export(unclip_dir, tmp_path_factory):
    return _cli(unclip_dir, "torch", tmp_path_factory.mktemp("pt") / "export_pt")


def _prior_inputs(config, text_len, batch=4, seed=0):
    """Random prior inputs: a partly padded, a full, an empty caption and a dropped one."""
    rng = np.random.default_rng(seed)
    mask = np.arange(text_len)[None] < np.array([5, text_len, 0, 7])[:batch, None]
    tokens = rng.standard_normal((batch, text_len, config.text_dim)).astype(np.float32)
    tokens[~mask] = np.nan  # padding must not leak, even when non-finite
    return {"x_t": rng.standard_normal((batch, config.clip_dim)).astype(np.float32),
            "noise_level": rng.uniform(0.05, 0.95, batch).astype(np.float32),
            "text_tokens": tokens, "text_mask": mask,
            "text_embed": rng.standard_normal((batch, config.clip_dim)).astype(np.float32),
            "keep": np.array([True, True, True, False])[:batch]}


def _jax_prior(prior, x):
    return np.asarray(jax.jit(prior.model.apply)(prior.params, **x))


def _decoder_inputs(stage, text_len, batch=3, seed=1):
    """Random decoder inputs (NHWC) with an image embedding; the last row's is zero (the null
    condition of guidance)."""
    rng = np.random.default_rng(seed)
    c = stage.unet_cfg
    mask = np.arange(text_len)[None] < np.array([6, 0, text_len])[:batch, None]
    z = rng.standard_normal((batch, c.image_embed_dim)).astype(np.float32)
    z[-1] = 0.0
    return {"x_t": rng.standard_normal((batch, c.image_size, c.image_size, c.channels)
                                       ).astype(np.float32),
            "noise_level": rng.uniform(0.05, 0.95, batch).astype(np.float32),
            "text_emb": rng.standard_normal((batch, text_len, c.text_dim)).astype(np.float32),
            "text_mask": mask, "image_embed": z}


def _jax_unet(stage, x):
    return np.asarray(jax.jit(stage.model.apply)({"params": stage.params}, **x))


def test_torch_cli_writes_every_piece_in_a_fresh_process(torch_export, unclip_dir):
    out, r = torch_export
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "exported the prior, the CLIP and 2 stage(s) as torch" in r.stdout
    record = json.loads((out / "cascade.json").read_text())
    assert record["kind"] == "unclip" and record["prior"] == "prior" and record["clip"] == "clip"
    assert record["stages"] == ["stage0_decoder_16px", "stage1_sr_32px"]
    for f in ("prior/model.safetensors", "prior/config.json", "clip/model.safetensors",
              "clip/config.json", "clip/tokenizer.json", "text_encoder/model.safetensors",
              "stage0_decoder_16px/model.safetensors", "stage1_sr_32px/model.safetensors"):
        assert (out / f).is_file(), f
    m = json.loads((out / "manifest.json").read_text())
    assert [s["stage"] for s in m["sources"]] == ["prior", "base", "sr"]
    assert m["sources"][0]["path"] == os.path.abspath(unclip_dir / "prior")
    for f in m["files"]:
        assert file_sha256(out / f["path"]) == f["sha256"]
    prior_cfg = json.loads((out / "prior" / "config.json").read_text())
    assert prior_cfg["prior"]["clip_dim"] == 128 and prior_cfg["schedule"] == "cosine"
    assert prior_cfg["sample_defaults"]["num_candidates"] == 2


def test_torch_prior_matches_jax(torch_export, pipe):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from jaxt2i.export.torch_prior import TorchPrior

    out, r = torch_export
    assert r.returncode == 0, r.stderr[-3000:]
    net = TorchPrior.from_pretrained(str(out / "prior")).eval()
    x = _prior_inputs(pipe.prior.config, 32)
    want = _jax_prior(pipe.prior, x)
    assert np.isfinite(want).all() and np.abs(want).max() > 0.05
    with torch.no_grad():
        got = net(**{k: torch.from_numpy(v) for k, v in x.items()}).numpy()
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # keep left out (all kept) and a shorter text
    short = {k: (v[:2, :10] if k in ("text_tokens", "text_mask") else v[:2])
             for k, v in x.items() if k != "keep"}
    with torch.no_grad():
        got = net(**{k: torch.from_numpy(v) for k, v in short.items()}).numpy()
    np.testing.assert_allclose(got, _jax_prior(pipe.prior, short), atol=TOL, rtol=0)


def test_torch_prior_bfloat16_and_load_errors(pipe, tmp_path):
    torch = pytest.importorskip("torch")
    from jaxt2i.export.torch_convert import save_prior_pretrained
    from jaxt2i.export.torch_prior import TorchPrior

    save_prior_pretrained(str(tmp_path / "bf16"), pipe.prior.params, pipe.prior.config,
                          dtype="bfloat16")
    net = TorchPrior.from_pretrained(str(tmp_path / "bf16")).eval()
    assert next(net.parameters()).dtype == torch.bfloat16
    x = _prior_inputs(pipe.prior.config, 32)
    want = _jax_prior(pipe.prior, x)
    with torch.no_grad():
        got = net(**{k: torch.from_numpy(v) for k, v in x.items()})
    assert got.dtype == torch.float32
    err = np.abs(got.numpy() - want).max() / np.abs(want).max()
    assert err < 0.05, err  # bfloat16 weights and activations: ~1e-2 relative
    with pytest.raises(FileNotFoundError, match="not a TorchPrior export"):
        TorchPrior.from_pretrained(str(tmp_path))
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({"unet": {}}))
    with pytest.raises(ValueError, match="has no 'prior' entry"):
        TorchPrior.from_pretrained(str(tmp_path / "bf16"))


def test_transformers_clip_matches_ours(torch_export, clip):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    out, r = torch_export
    assert r.returncode == 0, r.stderr[-3000:]
    hf = transformers.CLIPModel.from_pretrained(str(out / "clip")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out / "clip"))
    ids, mask = clip.tokenize(PROMPTS)
    batch = tok(PROMPTS, padding="max_length", max_length=ids.shape[1], return_tensors="pt")
    np.testing.assert_array_equal(batch["input_ids"].numpy(), ids)
    states, _, embeds = (np.asarray(a) for a in clip.encode_text_ids(ids, mask))
    with torch.no_grad():
        t = hf.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        t_embeds = hf.text_projection(t.pooler_output).numpy()
    assert np.abs(embeds).max() > 0.1
    np.testing.assert_allclose(t_embeds, embeds, atol=TOL, rtol=0)
    m = mask[..., None]
    np.testing.assert_allclose(t.last_hidden_state.numpy() * m, states * m, atol=TOL, rtol=0)

    size = clip.config.vision.image_size
    pixels = np.random.default_rng(2).standard_normal((2, size, size, 3)).astype(np.float32)
    want = np.asarray(clip.encode_image(pixels, preprocess=False).embeds)
    with torch.no_grad():
        got = hf.get_image_features(pixel_values=torch.from_numpy(
            pixels.transpose(0, 3, 1, 2).copy()))
    got = getattr(got, "pooler_output", got).numpy()  # a tensor, or an output object
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(hf.logit_scale.item(), float(clip.params["logit_scale"]),
                               rtol=1e-6)


def test_torch_decoder_and_sr_match_jax(torch_export, pipe):
    torch = pytest.importorskip("torch")
    from jaxt2i.export.torch_unet import TorchUNet

    out, r = torch_export
    assert r.returncode == 0, r.stderr[-3000:]
    decoder, sr = pipe.stages
    net = TorchUNet.from_pretrained(str(out / "stage0_decoder_16px")).eval()
    x = _decoder_inputs(decoder, 32)
    want = _jax_unet(decoder, x)
    assert np.abs(want).max() > 0.05
    t = {k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2) if v.ndim == 4 else v))
         for k, v in x.items()}
    with torch.no_grad():
        got = net(**t).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # the embedding matters (a different one changes the output), and is required
    with torch.no_grad():
        other = net(**{**t, "image_embed": -t["image_embed"]}).numpy().transpose(0, 2, 3, 1)
        assert np.abs(other[:2] - got[:2]).max() > 1e-3
        with pytest.raises(ValueError, match="needs image_embed of shape"):
            net(**{k: v for k, v in t.items() if k != "image_embed"})
    srnet = TorchUNet.from_pretrained(str(out / "stage1_sr_32px")).eval()
    rng = np.random.default_rng(3)
    c = sr.unet_cfg
    xs = {"x_t": rng.standard_normal((2, 32, 32, 3)).astype(np.float32),
          "noise_level": np.array([0.2, 0.7], np.float32),
          "text_emb": rng.standard_normal((2, 32, c.text_dim)).astype(np.float32),
          "text_mask": np.arange(32)[None] < np.array([[4], [32]]),
          "lowres": rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),
          "aug_level": np.array([0.1, 0.3], np.float32)}
    with torch.no_grad():
        got = srnet(**{k: torch.from_numpy(np.ascontiguousarray(
            v.transpose(0, 3, 1, 2) if v.ndim == 4 else v)) for k, v in xs.items()})
    np.testing.assert_allclose(got.numpy().transpose(0, 2, 3, 1), _jax_unet(sr, xs),
                               atol=TOL, rtol=0)


@pytest.mark.slow  # the ONNX export in a fresh process: ~40 s of CPU, ~90 s on a loaded machine
def test_onnx_prior_clip_and_decoder_match_jax(unclip_dir, pipe, clip, tmp_path):
    pytest.importorskip("jax2onnx", reason="ONNX export is a test extra: pip install -e '.[test]'")
    pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra")
    from jaxt2i.export.onnx_export import run_denoiser

    out, r = _cli(unclip_dir, "onnx", tmp_path / "export_onnx")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "exported the prior, the CLIP and 2 stage(s) as onnx" in r.stdout
    m = json.loads((out / "manifest.json").read_text())
    record = m["cascade"]
    assert record["kind"] == "unclip" and record["clip_text"] == "clip/text.onnx"
    assert [s["stage"] for s in m["sources"]] == ["prior", "base", "sr"]

    x = _prior_inputs(pipe.prior.config, record["clip_text_length"])
    want = _jax_prior(pipe.prior, x)
    np.testing.assert_allclose(run_denoiser(str(out / "prior" / "denoiser.onnx"), x), want,
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(  # another batch size (B is dynamic)
        run_denoiser(str(out / "prior" / "denoiser.onnx"), {k: v[:1] for k, v in x.items()}),
        want[:1], atol=TOL, rtol=0)

    import onnxruntime as ort

    ids, mask = clip.tokenize(PROMPTS)
    sess = ort.InferenceSession(str(out / "clip" / "text.onnx"),
                                providers=["CPUExecutionProvider"])
    states, embeds = sess.run(None, {"input_ids": ids.astype(np.int32),
                                     "attention_mask": mask.astype(bool)})
    w_states, _, w_embeds = (np.asarray(a) for a in clip.encode_text_ids(ids, mask))
    np.testing.assert_allclose(embeds, w_embeds, atol=TOL, rtol=0)
    np.testing.assert_allclose(states * mask[..., None], w_states * mask[..., None], atol=TOL,
                               rtol=0)
    size = record["clip_image_size"]
    pixels = np.random.default_rng(4).standard_normal((3, size, size, 3)).astype(np.float32)
    got = run_denoiser(str(out / "clip" / "vision.onnx"), {"pixel_values": pixels})
    np.testing.assert_allclose(got, np.asarray(clip.encode_image(pixels, preprocess=False)
                                               .embeds), atol=TOL, rtol=0)

    decoder = pipe.stages[0]
    x = _decoder_inputs(decoder, record["max_length"])
    got = run_denoiser(str(out / "stage0_decoder_16px" / "denoiser.onnx"), x)
    np.testing.assert_allclose(got, _jax_unet(decoder, x), atol=TOL, rtol=0)
    cfg = json.loads((out / "stage0_decoder_16px" / "config.json").read_text())
    assert cfg["inputs"][-1] == "image_embed"


@pytest.mark.parametrize("fmt, kwargs, expected", [
    ("torch", {"text_encoder": "bundled"}, "--text_encoder does not apply"),
    ("stablehlo", {"text_encoder": "bundled"}, "--text_encoder does not apply"),
])
def test_refusals_are_one_line(unclip_dir, tmp_path, fmt, kwargs, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        export_cascade([str(unclip_dir)], fmt, str(tmp_path / "x"), **kwargs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()
