"""`python -m jaxt2i.export`: every format round-trips in the framework that consumes it.

The tiny cascade's params are perturbed first (its zero-initialised output heads would make
any comparison trivial).
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxt2i.cascade import load_cascade
from jaxt2i.checkpoint import export_params, load_exported
from jaxt2i.config import ConfigError
from jaxt2i.export import export_cascade
from jaxt2i.export.common import ExportError, config_hash, file_sha256

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cascade_dir(tiny_cascade_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("perturbed")
    rng = np.random.default_rng(0)
    for name in ("base", "sr"):
        params, config, step = load_exported(str(tiny_cascade_dir / name / "export"))
        params = jax.tree_util.tree_map(
            lambda p: (p + 0.05 * rng.standard_normal(p.shape)).astype(np.float32), params)
        export_params(params, config, str(root / name), step=step)
    with open(root / "cascade.json", "w") as f:
        json.dump({"stages": ["base", "sr"]}, f)
    return root


@pytest.fixture(scope="module")
def cascade(cascade_dir):
    return load_cascade(str(cascade_dir))


def _inputs(stage, prev_size, batch=3, text_len=32, seed=0):
    """Random denoiser inputs (NHWC) with a partly padded mask and one empty row."""
    rng = np.random.default_rng(seed)
    c = stage.unet_cfg
    mask = np.arange(text_len)[None, :] < np.array([5, 0, text_len])[:batch, None]
    out = {"x_t": rng.standard_normal((batch, c.image_size, c.image_size, c.channels)),
           "noise_level": rng.uniform(0.05, 0.95, (batch,)),
           "text_emb": rng.standard_normal((batch, text_len, c.text_dim)), "text_mask": mask}
    if c.is_sr:
        out["lowres"] = rng.uniform(-1, 1, (batch, prev_size, prev_size, c.channels))
        out["aug_level"] = rng.uniform(0, 0.5, (batch,))
    return {k: v if v.dtype == bool else v.astype(np.float32) for k, v in out.items()}


def _jax_outputs(cascade):
    """Each stage's inputs and JAX output; an SR stage's low-res input has the size its
    conditioning order gives the U-Net (the previous stage's, or its own when resizing first)."""
    outs = []
    for k, stage in enumerate(cascade.stages):
        x = _inputs(stage, stage.lowres_input_size)
        y = stage.model.apply({"params": stage.params}, **{k2: jnp.asarray(v)
                                                                 for k2, v in x.items()})
        outs.append((x, np.asarray(y)))
    return outs


def _check_manifest(out, fmt, cascade_dir):
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == fmt and m["versions"]["jax"] == jax.__version__
    cfg = json.loads((cascade_dir / "base" / "config.json").read_text())
    assert m["sources"][0]["config_sha256"] == config_hash(cfg["config"])
    assert m["sources"][0]["step"] == cfg["step"] == 2
    on_disk = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    assert {f["path"] for f in m["files"]} == on_disk - {"manifest.json"}
    for f in m["files"]:
        assert file_sha256(out / f["path"]) == f["sha256"]
    return m


def test_stablehlo_reproduces_the_images_in_a_fresh_process(cascade_dir, cascade, tmp_path):
    out = tmp_path / "hlo"
    export_cascade([str(cascade_dir)], "stablehlo", str(out), overrides={"steps": "3,2"})
    m = _check_manifest(out, "stablehlo", cascade_dir)
    assert [s["steps"] for s in m["settings"]] == [3, 2]
    names = m["cascade"]["stages"]
    assert names == ["stage0_base_16px", "stage1_sr_32px"]
    exp = jax.export.deserialize(bytearray((out / names[1] / "sampler.jax_exported").read_bytes()))
    assert set(exp.platforms) == {"cpu", "cuda", "tpu"}
    # lowres, init, inpaint_mask, strength (the batch stays symbolic)
    assert [str(a.shape) for a in exp.in_avals[-4:]] == [
        "(B, 16, 16, 3)", "(B, 32, 32, 3)", "(B, 32, 32, 1)", "()"]

    prompts = ["a red circle", "two green stars above a blue square", ""]
    settings = cascade.settings([{"steps": 3}, {"steps": 2}])
    want = cascade.sample(prompts, seed=5, settings=settings)
    code = ("import sys, numpy as np; from jaxt2i.export.stablehlo import run_exported; "
            "np.save(sys.argv[2], run_exported(sys.argv[1], sys.argv[3:], seed=5))")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "got.npy"), *prompts],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(tmp_path / "got.npy")
    assert got.shape == want.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(got, want)

    # The edit inputs: the exported base sampler inpaints with a negative prompt exactly as
    # the cascade's own compiled sampler does.
    from jaxt2i.export.stablehlo import load_params
    from jaxt2i.stage import Edit

    base = jax.export.deserialize(bytearray((out / names[0] / "sampler.jax_exported").read_bytes()))
    emb, mask = cascade.encode_ids(*cascade.encoder.tokenizer(prompts[:2]))
    u_emb, u_mask = cascade.encode_ids(*cascade.encoder.tokenizer(["a blue square"] * 2))
    init = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    keep = jnp.zeros((2, 16, 16, 1)).at[:, :8].set(1.0)
    key = jax.random.fold_in(jax.random.key(5), 0)
    got = base.call(load_params(str(out / names[0] / "params.safetensors")), emb, mask, u_emb,
                    u_mask, jax.random.key_data(key), init, keep, jnp.float32(0.7))
    want = cascade.stage_fn(0)(cascade.stages[0].params, emb, mask, u_emb, u_mask, key, None,
                               settings=settings[0], edit=Edit(init, keep, jnp.float32(0.7)))
    np.testing.assert_allclose(np.asarray(got), np.clip(np.asarray(want), -1, 1), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[:, 8:], np.asarray(init)[:, 8:])  # kept rows


def test_onnx_denoisers_and_encoder_match_jax(cascade_dir, cascade, tmp_path):
    pytest.importorskip("jax2onnx", reason="ONNX export is a test extra: pip install -e '.[test]'")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra")
    from jaxt2i.export.onnx_export import run_denoiser

    out = tmp_path / "onnx"
    export_cascade([str(cascade_dir)], "onnx", str(out))
    m = _check_manifest(out, "onnx", cascade_dir)
    for name, (x, want) in zip(m["cascade"]["stages"], _jax_outputs(cascade)):
        path = str(out / name / "denoiser.onnx")
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].shape[0] == "B"  # dynamic batch
        got = run_denoiser(path, x)
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        got1 = run_denoiser(path, {k: v[:1] for k, v in x.items()})  # another batch size
        np.testing.assert_allclose(got1, want[:1], atol=1e-4, rtol=0)
    enc = cascade.encoder
    ids, mask = enc.tokenizer(["a red circle above a blue square", ""])
    want = np.asarray(enc.encode_ids(ids, mask), np.float32)
    got = run_denoiser(str(out / "text_encoder" / "encoder.onnx"),
                       {"input_ids": np.asarray(ids, np.int32), "attention_mask": np.asarray(mask, bool)})
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_onnx_cli_exports_the_bundled_demo_in_a_fresh_process(tmp_path):
    """The README's `python -m jaxt2i.export --format=onnx --out=DIR` in a new process (no
    resize matrix cached by earlier JAX code: it crashed under jax2onnx's patched
    jax.image.resize); onnxruntime reproduces the demo stages' JAX outputs."""
    pytest.importorskip("jax2onnx", reason="ONNX export is a test extra: pip install -e '.[test]'")
    pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra")
    from jaxt2i.export.onnx_export import run_denoiser
    from jaxt2i.assets import demo_cascade_dir

    out = tmp_path / "export_onnx"
    r = subprocess.run([sys.executable, "-m", "jaxt2i.export", "--format=onnx", f"--out={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    record = json.loads((out / "cascade.json").read_text())
    assert record["stages"] == ["stage0_base_32px", "stage1_sr_128px"]
    demo = load_cascade(demo_cascade_dir())
    for name, (x, want) in zip(record["stages"], _jax_outputs(demo)):
        got = run_denoiser(str(out / name / "denoiser.onnx"), x)
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_onnx_denoiser_with_text_conv_matches_jax(tmp_path):
    """model.text_conv (a 1-D convolution over the text tokens) converts too; padded tokens
    are NaN in the feed and must not leak."""
    pytest.importorskip("jax2onnx", reason="ONNX export is a test extra: pip install -e '.[test]'")
    pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra")
    import flax.linen as nn
    from jaxt2i.export.onnx_export import (
        _save, convert, denoiser_fn, denoiser_inputs, run_denoiser)
    from jaxt2i.models import UNet, get_unet_config

    cfg = get_unet_config("tiny", text_conv=3)
    rng = np.random.default_rng(0)
    x = {"x_t": rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32),
         "noise_level": np.array([0.3, 0.8], np.float32),
         "text_emb": rng.standard_normal((2, 6, cfg.text_dim)).astype(np.float32),
         "text_mask": np.array([[1, 1, 1, 0, 0, 0], [1] * 6], bool)}
    model = UNet(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), **x)["params"])
    params = jax.tree_util.tree_map(  # random, so the zero-initialised layers do something
        lambda p: (0.2 * rng.standard_normal(p.shape)).astype(np.float32), params)
    want = np.asarray(model.apply({"params": params}, **x))
    names, specs = denoiser_inputs(cfg, 6, None)
    path = str(tmp_path / "denoiser.onnx")
    from jaxt2i.stage import Stage, StageConfig

    stage = Stage(StageConfig.from_dict({
        "model": cfg.to_dict(), "text": {"encoder": "bundled", "max_length": 6},
        "diffusion": {"schedule": "cosine"},
        "sample": {"sampler": "ddim", "steps": 4, "guidance": 1.0, "thresholding": "none",
                   "aug_level": 0.0}}), params)
    _save(convert(denoiser_fn(stage), specs, names, ["out"], "text_conv denoiser"), path)
    x["text_emb"][0, 3:] = np.nan
    got = run_denoiser(path, x)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_onnx_names_an_op_it_cannot_convert():
    pytest.importorskip("jax2onnx", reason="ONNX export is a test extra: pip install -e '.[test]'")
    from jax.extend.core import Primitive

    from jaxt2i.export.onnx_export import convert

    prim = Primitive("jaxt2i_test_unconvertible")
    prim.def_impl(lambda x: x)
    prim.def_abstract_eval(lambda x: x)
    with pytest.raises(ExportError, match="cannot convert the op 'jaxt2i_test_unconvertible'"):
        convert(lambda x: prim.bind(x) + 1, [jax.ShapeDtypeStruct((2,), jnp.float32)], ["x"],
                ["y"], "a test function")


def test_torch_export_loads_strict_and_matches(cascade_dir, cascade, tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch is a test extra: pip install -e '.[test]'")
    transformers = pytest.importorskip("transformers")
    from jaxt2i.export.torch_unet import TorchUNet

    out = tmp_path / "pt"
    export_cascade([str(cascade_dir)], "torch", str(out))
    m = _check_manifest(out, "torch", cascade_dir)
    for name, (x, want) in zip(m["cascade"]["stages"], _jax_outputs(cascade)):
        net = TorchUNet.from_pretrained(str(out / name)).eval()
        t = {k: torch.from_numpy(np.ascontiguousarray(
            v.transpose(0, 3, 1, 2) if v.ndim == 4 else v)) for k, v in x.items()}
        with torch.no_grad():
            got = net(**t).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    hf = transformers.T5EncoderModel.from_pretrained(str(out / "text_encoder")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(out / "text_encoder"))
    enc = cascade.encoder
    prompts = ["a red circle above a blue square", "two small green stars"]
    ids, mask = enc.tokenizer(prompts)
    batch = tok(prompts, padding="max_length", max_length=enc.max_length, return_tensors="pt")
    np.testing.assert_array_equal(batch["input_ids"].numpy(), ids)
    with torch.no_grad():
        got = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0].numpy()
    want = np.asarray(enc.encode_ids(ids, mask))
    np.testing.assert_allclose(got * mask[..., None], want * mask[..., None], atol=1e-4, rtol=0)

    half = tmp_path / "pt16"
    export_cascade([str(cascade_dir)], "torch", str(half), dtype="bfloat16", stages=1)
    net = TorchUNet.from_pretrained(str(half / "stage0_base_16px"))
    assert next(net.parameters()).dtype == torch.bfloat16
    assert json.loads((half / "manifest.json").read_text())["dtype"] == "bfloat16"


def test_output_directory_is_protected(cascade_dir, tmp_path, monkeypatch):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="is not empty; pass --overwrite"):
        export_cascade([str(cascade_dir)], "stablehlo", str(out))
    # --overwrite replaces only an earlier export (manifest.json), never a user's directory.
    with pytest.raises(ConfigError, match="is not an earlier export"):
        export_cascade([str(cascade_dir)], "stablehlo", str(out), overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    monkeypatch.chdir(out)
    with pytest.raises(ConfigError, match="holds the current directory"):
        export_cascade([str(cascade_dir)], "stablehlo", ".", overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    monkeypatch.chdir(tmp_path)

    out = tmp_path / "earlier"
    small = dict(stages=1, platforms=["cpu"], overrides={"steps": "1"})
    export_cascade([str(cascade_dir)], "stablehlo", str(out), **small)
    before = sorted(os.listdir(out))
    # A killed export's partial directory (a dead pid) is removed by the next export.
    stale = tmp_path / "earlier.partial-999999999"
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"0" * 1000)

    from jaxt2i.export import stablehlo

    def broken(cascade, settings, root, **kw):
        (open(os.path.join(root, "half-written"), "w")).close()
        raise RuntimeError("disk full")

    monkeypatch.setattr(stablehlo, "export_stablehlo", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_cascade([str(cascade_dir)], "stablehlo", str(out), overwrite=True)
    assert sorted(os.listdir(out)) == before  # the old export survives a failed one
    assert not [p for p in os.listdir(tmp_path) if p.startswith("earlier.")]  # no partial dir
    monkeypatch.undo()
    (out / "manifest.json").write_text(json.dumps({"format": "stablehlo", "marker": 1}))
    export_cascade([str(cascade_dir)], "stablehlo", str(out), overwrite=True, **small)
    assert "marker" not in json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("args,expected", [
    (["--format=stablehlo"], "--out"),
    (["--format=pdf", "--out=x"], "pdf"),
    (["--format=onnx", "--dtype=float16", "--out=x"], "applies to --format=torch only"),
])
def test_cli_errors(args, expected, cascade_dir, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, "-m", "jaxt2i.export", f"--checkpoint={cascade_dir}",
                        *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(re.escape(expected), lines[0]), r.stderr[-2000:]
