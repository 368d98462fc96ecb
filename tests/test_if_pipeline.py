"""DeepFloyd IF as jaxt2i stages against diffusers' IF pipelines, on a tiny random pipeline
made here (tiny IF U-Nets, a tiny T5 and a SentencePiece tokenizer trained in the test).

The pipelines are saved with `save_pretrained` and converted by `python -m jaxt2i.convert` in a
fresh process; then our reverse processes (stage I, and stage II from a given low-res image)
must equal diffusers' IF loop run by hand with the same start, step and augmentation noise
(unet + DDPMScheduler.step, guidance as the pipelines do it), `python -m jaxt2i.sample` runs
the converted cascade, and `--to=diffusers` writes pipelines diffusers loads.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from diffusers import (DDPMScheduler, IFPipeline, IFSuperResolutionPipeline,  # noqa: E402
                       UNet2DConditionModel)

from doc_commands import bash_block  # noqa: E402
from jaxt2i.data import shapes  # noqa: E402
from jaxt2i.models.if_unet import SIZES  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "deepfloyd-if.md")
SIZE_I, SIZE_II = 16, 32
# IF's pipelines lower-case and strip prompts (without clean_caption); these already are.
PROMPTS = ["a red circle above a blue square", "a photo of a cat"]
CORPUS = PROMPTS + ["two green triangles on a white background", "a red panda reading a book",
                    "three yellow stars left of an orange hexagon"]
# IF's DDPMScheduler (IF-I-XL-v1.0 / IF-II-L-v1.0 scheduler/scheduler_config.json).
IF_SCHEDULER = dict(beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                    thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
                    clip_sample=True, prediction_type="epsilon", num_train_timesteps=1000)


# The networks agree to ~1e-5 of their output (float32: XLA's and torch's convolutions); each
# guided step scales that difference by about 2w - 1 (13 at IF's w = 7) before the sampler.
GUIDED_TOL = 1e-3


def _run(*args, check=True):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, (args, r.stderr[-3000:])
    return r


def _unet(config, seed):
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config.to_diffusers()).eval()
    with torch.no_grad():  # perturb every tensor: unit norms and zero biases are tested too
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _shapes_captions(n):
    out = []
    for i in range(n):
        rng = np.random.default_rng([1, i])
        out.append(shapes.caption(shapes.sample_scene(rng, shapes.SPLITS[i % 3]), rng))
    return out


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Stage-I and stage-II diffusers pipeline directories and their live objects."""
    root = tmp_path_factory.mktemp("if")
    spiece = root / "spiece"
    spiece.mkdir()
    # Whole words (as split by spaces), the shapes world's among them: its captions
    # (fine-tuning and the shapes evaluator in test_if_train) stay well under IF's 77 tokens.
    (spiece / "corpus.txt").write_text("\n".join(CORPUS * 10 + _shapes_captions(300)))
    spm.SentencePieceTrainer.train(
        input=str(spiece / "corpus.txt"), model_prefix=str(spiece / "spiece"), vocab_size=80,
        model_type="word", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2)
    (spiece / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                              "extra_ids": 0}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(spiece), local_files_only=True)
    unet_i = dataclasses.replace(SIZES["tiny"], sample_size=SIZE_I)
    unet_ii = dataclasses.replace(SIZES["tiny-ii"], sample_size=SIZE_II)
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=-(-len(tokenizer) // 8) * 8, d_model=unet_i.text_dim, d_kv=8, d_ff=64,
        num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=16,
        relative_attention_max_distance=20, dropout_rate=0.0, decoder_start_token_id=0)).eval()
    common = dict(safety_checker=None, feature_extractor=None, watermarker=None,
                  requires_safety_checker=False)
    one = IFPipeline(tokenizer=tokenizer, text_encoder=t5, unet=_unet(unet_i, 1),
                     scheduler=DDPMScheduler(**IF_SCHEDULER), **common)
    two = IFSuperResolutionPipeline(
        tokenizer=tokenizer, text_encoder=t5, unet=_unet(unet_ii, 2),
        scheduler=DDPMScheduler(**IF_SCHEDULER),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), **common)
    one.save_pretrained(root / "IF-I")
    two.save_pretrained(root / "IF-II")
    return dict(root=root, one=one, two=two, src_i=root / "IF-I", src_ii=root / "IF-II")


@pytest.fixture(scope="module")
def converted(pipelines):
    """`python -m jaxt2i.convert --from=diffusers` in a fresh process, loaded as a cascade."""
    from jaxt2i.cascade import load_cascade

    out = pipelines["root"] / "cascade"
    r = _run("jaxt2i.convert", "--from=diffusers", pipelines["src_ii"], pipelines["src_i"],
             f"--out={out}")
    assert "stage_I: writing stage_I/params.safetensors" in r.stdout, r.stdout
    return dict(out=out, cascade=load_cascade(str(out)))


# ----------------------------------------------------------------- the reverse processes
from diffusers.schedulers.scheduling_ddpm import randn_tensor as _RANDN  # noqa: E402


def _nchw(a):
    return torch.tensor(np.asarray(a)).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def _diffusers_loop(pipe, x_T, noises, steps, guidance, emb, neg, monkeypatch,
                    upscaled=None, noise_level=None):
    """IF's denoising loop (pipeline_if[_superresolution].__call__ step 7/8) by hand, with our
    start noise and our step noise in place of diffusers' draws."""
    from diffusers.schedulers import scheduling_ddpm

    draws = iter(noises)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: _nchw(next(draws)))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    x = _nchw(x_T)
    text = torch.cat([neg, emb])
    with torch.no_grad():
        for t in sched.timesteps:
            inp = x if upscaled is None else torch.cat([x, _nchw(upscaled)], dim=1)
            kw = {} if noise_level is None else {
                "class_labels": torch.tensor([noise_level] * 2 * x.shape[0])}
            out = pipe.unet(torch.cat([inp] * 2), t, encoder_hidden_states=text, **kw).sample
            uncond, cond = out.chunk(2)
            uncond, _ = uncond.split(3, dim=1)
            cond, variance = cond.split(3, dim=1)
            out = torch.cat([uncond + guidance * (cond - uncond), variance], dim=1)
            x = sched.step(out, t, x, return_dict=False)[0]
    return _nhwc(x)


@pytest.mark.parametrize("thresholding", [False, True])
def test_learned_range_ddpm_step_matches_diffusers(thresholding):
    """Every step of a 10-step 'leading' grid: our DDPM(variance='learned_range') step from a
    given model output (eps, v) and noise equals DDPMScheduler.step's (Nichol & Dhariwal
    eq. 15), with IF's dynamic thresholding (95, max 1.5) or without."""
    from diffusers.schedulers import scheduling_ddpm

    from jaxt2i import diffusion
    from jaxt2i.diffusion.loop import _point_after

    sched = DDPMScheduler(**dict(IF_SCHEDULER, thresholding=thresholding, clip_sample=False))
    steps = 10
    sched.set_timesteps(steps)
    ours = diffusion.get_schedule("discrete_squaredcos_cap_v2", spacing="leading")
    threshold = diffusion.Thresholding("dynamic" if thresholding else "none", 95.0, 1.5)
    rng = np.random.default_rng(0)
    worst = 0.0
    for i, t in enumerate(sched.timesteps):
        x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
        eps = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
        v = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
        noise = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
        s, s_time = diffusion.grid_point(ours, "default", i, steps)
        assert float(s_time) == int(t)
        nxt, _ = _point_after(ours, "default", i, steps)
        x0 = threshold((x - s.sigma * eps) / s.alpha)
        step = diffusion.DDPM(variance="learned_range").update(
            {"x": x}, diffusion.Denoised(x0, eps, v), s, nxt, noise)["x"]
        scheduling_ddpm.randn_tensor = lambda *a, **k: _nchw(noise)  # noqa: B023
        try:
            ref = sched.step(_nchw(np.concatenate([eps, v], -1)), t, _nchw(x),
                             return_dict=False)[0]
        finally:
            scheduling_ddpm.randn_tensor = _RANDN
        err = float(np.max(np.abs(np.asarray(step) - _nhwc(ref))))
        worst = max(worst, err)
    print(f"learned-range DDPM step, thresholding={thresholding}: max error {worst:.2e}")
    # ~1e-6 at every step but the one into timestep 0 (1.7e-5): there diffusers' float32
    # 1 - alpha_bar_0 (4e-5) keeps 3 digits; ours comes from float64 tables.
    assert worst < 3e-5


def _embeddings(pipe, cascade, prompts):
    """(ours: emb, mask, uncond; diffusers': emb, negative emb), and their largest difference."""
    ids, mask = cascade.encoder.tokenizer(prompts)
    emb, mask = cascade.encode_ids(ids, mask)
    with torch.no_grad():
        ref, neg = pipe.encode_prompt(prompts, do_classifier_free_guidance=True,
                                      clean_caption=False)
    err = max(float(np.max(np.abs(np.asarray(emb) - ref.numpy()))),
              float(np.max(np.abs(np.asarray(cascade.uncond[0][0]) - neg[0].numpy()))))
    return emb, mask, ref, neg, err


def _relative(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def test_converted_config_and_encoder(pipelines, converted):
    from jaxt2i.models.if_family import IFModelConfig

    c = converted["cascade"]
    s1, s2 = c.stages
    assert s1.config.model_family == s2.config.model_family == "if"
    assert isinstance(s1.unet_cfg, IFModelConfig) and s1.learned_variance
    assert (s1.unet_cfg.image_size, s2.unet_cfg.lowres_size, s2.unet_cfg.image_size) == (
        SIZE_I, SIZE_I, SIZE_II)
    st = s1.config.sample
    assert (st.sampler, st.steps, st.guidance, st.thresholding, st.threshold_percentile,
            st.threshold_max_value) == ("ddpm", 100, 7.0, "dynamic", 95.0, 1.5)
    assert (s2.config.sample.steps, s2.config.sample.guidance, s2.config.sample.aug_level) == (
        50, 4.0, 0.25)
    assert s1.config.diffusion.timestep_spacing == "leading" and c.max_length == 77
    ids, _ = c.encoder.tokenizer(PROMPTS)
    ref = pipelines["one"].tokenizer(PROMPTS, padding="max_length", max_length=77).input_ids
    np.testing.assert_array_equal(ids, ref)
    with open(converted["out"] / "cascade.json") as f:
        assert json.load(f)["kind"] == "deepfloyd_if"


def test_stage_one_reverse_process_matches_diffusers(pipelines, converted, monkeypatch):
    """4 DDPM steps (learned-range variance, dynamic thresholding 95 / 1.5, guidance 7 on eps
    with the conditional variance kept) from the same noise: float32 agreement (`GUIDED_TOL`)."""
    cascade, pipe = converted["cascade"], pipelines["one"]
    stage = cascade.stages[0]
    emb, mask, ref, neg, emb_err = _embeddings(pipe, cascade, PROMPTS)
    print(f"T5 embeddings: max |ours - transformers| = {emb_err:.2e}")
    assert emb_err < 1e-4
    steps, guidance = 4, 7.0
    settings = stage.config.sample.replace(steps=steps, guidance=guidance)
    rng = jax.random.key(3)
    ours = cascade.stage_fn(0)(stage.params, emb, mask, *cascade.uncond, rng, None,
                               settings=settings)
    shape = (len(PROMPTS), SIZE_I, SIZE_I, 3)  # the loop's draws: `diffusion.sample`
    init_rng, step_rng = jax.random.split(rng)
    x_T = jax.random.normal(init_rng, shape)
    noises = [jax.random.normal(jax.random.fold_in(step_rng, i), shape) for i in range(steps)]
    theirs = _diffusers_loop(pipe, x_T, noises, steps, guidance, ref, neg, monkeypatch)
    err = _relative(ours, theirs)
    print(f"stage I, {steps} DDPM steps: max |ours - diffusers| / max |diffusers| = {err:.2e}")
    assert err < GUIDED_TOL


def test_stage_two_augmentation_and_reverse_process_match_diffusers(pipelines, converted,
                                                                    monkeypatch):
    """The low-res image upscaled (bilinear, align_corners) and noised at noise level 250
    (aug_level 0.25) as IFSuperResolutionPipeline does; one network evaluation with that
    input and class label; then 3 guided DDPM steps from the same noise."""
    import torch.nn.functional as F

    cascade, pipe = converted["cascade"], pipelines["two"]
    stage = cascade.stages[1]
    lowres = np.random.default_rng(0).uniform(-1, 1, (2, SIZE_I, SIZE_I, 3)).astype(np.float32)
    up = stage.upsample(jnp.asarray(lowres))
    ref_up = _nhwc(F.interpolate(_nchw(lowres), (SIZE_II, SIZE_II), mode="bilinear",
                                 align_corners=True))
    up_err = float(np.max(np.abs(np.asarray(up) - ref_up)))
    assert up_err < 1e-6, up_err

    rng = jax.random.key(5)
    low, level = stage.augment(jax.random.fold_in(rng, 1), jnp.asarray(lowres), level=0.25)
    np.testing.assert_array_equal(level, [0.25, 0.25])
    point = stage.config.diffusion.make_schedule(stage.config.diffusion.aug_schedule).point(250.0)
    noise = (np.asarray(low) - float(point.alpha) * np.asarray(up)) / float(point.sigma)
    ref_low = _nhwc(pipe.image_noising_scheduler.add_noise(
        _nchw(ref_up), _nchw(noise), torch.tensor([250, 250])))
    aug_err = float(np.max(np.abs(np.asarray(low) - ref_low)))
    print(f"stage II upscale / augmentation: max error {up_err:.2e} / {aug_err:.2e}")
    assert aug_err < 1e-5

    emb, mask, ref, neg, _ = _embeddings(pipe, cascade, PROMPTS)
    x_t = np.random.default_rng(1).standard_normal((2, SIZE_II, SIZE_II, 3)).astype(np.float32)
    t = np.array([500, 500])
    out = stage.network_output(stage.params, jnp.asarray(x_t), jnp.asarray(t, jnp.float32),
                               {"text_emb": emb, "text_mask": mask, "lowres": low,
                                "aug_level": level})
    with torch.no_grad():
        ref_out = _nhwc(pipe.unet(torch.cat([_nchw(x_t), _nchw(ref_low)], dim=1),
                                  torch.tensor(t), encoder_hidden_states=ref,
                                  class_labels=torch.tensor([250, 250])).sample)
    net_err = _relative(out, ref_out)
    print(f"stage II network: max |ours - diffusers| / max |diffusers| = {net_err:.2e}")
    assert net_err < 1e-4
    np.testing.assert_array_equal(stage.denoise(stage.params, jnp.asarray(x_t), t, {
        "text_emb": emb, "text_mask": mask, "lowres": low, "aug_level": level}), out[..., :3])

    steps, guidance = 3, 4.0
    settings = stage.config.sample.replace(steps=steps, guidance=guidance)
    ours = cascade.stage_fn(1)(stage.params, emb, mask, *cascade.uncond, rng,
                               jnp.asarray(lowres), settings=settings)
    shape = (2, SIZE_II, SIZE_II, 3)  # `Stage.sample`'s draws for an SR stage
    x_T = jax.random.normal(jax.random.split(rng)[0], shape)
    step_rng = jax.random.split(jax.random.fold_in(rng, 2))[1]
    noises = [jax.random.normal(jax.random.fold_in(step_rng, i), shape) for i in range(steps)]
    theirs = _diffusers_loop(pipe, x_T, noises, steps, guidance, ref, neg, monkeypatch,
                             upscaled=ref_low, noise_level=250)
    err = _relative(ours, theirs)
    print(f"stage II, {steps} DDPM steps: max |ours - diffusers| / max |diffusers| = {err:.2e}")
    assert err < GUIDED_TOL


# ----------------------------------------------------------------------- the commands
def _doc_commands():
    """The shell commands of docs/deepfloyd-if.md's "Convert and sample" section."""
    return [ln.split() for ln in bash_block("deepfloyd-if.md", "## Convert and sample")]


def test_doc_commands_convert_sample_and_convert_back(pipelines, tmp_path):
    """Every command of the docs' section, in a fresh process, on the tiny pipelines: convert,
    sample (writes the images), convert back; diffusers loads the pipelines written back and
    their U-Nets, schedulers and text encoder equal the originals."""
    import shlex

    names = {"IF-I-XL-v1.0": pipelines["src_i"], "IF-II-L-v1.0": pipelines["src_ii"],
             "if-cascade": tmp_path / "if-cascade", "if-diffusers": tmp_path / "if-diffusers",
             "samples": tmp_path / "samples"}
    commands = _doc_commands()
    assert [c[:3] for c in commands] == [["python", "-m", "jaxt2i.convert"],
                                         ["python", "-m", "jaxt2i.sample"],
                                         ["python", "-m", "jaxt2i.convert"]], commands
    for cmd in commands:
        args = shlex.split(" ".join(cmd))[2:]
        for old, new in names.items():
            args = [a.replace(f"={old}", f"={new}") if a.startswith("--") else
                    (str(new) if a == old else a) for a in args]
        r = _run(*args)
        print(r.stdout.strip().splitlines()[-1])
    with open(tmp_path / "samples" / "sample.json") as f:
        record = json.load(f)
    assert record["image_size"] == SIZE_II and len(record["images"]) == 1
    from PIL import Image

    assert Image.open(tmp_path / "samples" / "000.png").size == (SIZE_II, SIZE_II)

    back = tmp_path / "if-diffusers"
    one = IFPipeline.from_pretrained(back / "stage_I")
    two = IFSuperResolutionPipeline.from_pretrained(back / "stage_II")
    assert two.text_encoder is None and two.tokenizer is None
    for new, old in ((one, pipelines["one"]), (two, pipelines["two"])):
        state, ref = new.unet.state_dict(), old.unet.state_dict()
        assert state.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(state[k].numpy(), ref[k].numpy(), err_msg=k)
        for key in ("beta_schedule", "variance_type", "thresholding", "dynamic_thresholding_ratio",
                    "sample_max_value", "timestep_spacing", "prediction_type",
                    "num_train_timesteps"):
            assert new.scheduler.config[key] == old.scheduler.config[key], key
    assert two.image_noising_scheduler.config["beta_schedule"] == "squaredcos_cap_v2"
    for k, v in pipelines["one"].text_encoder.state_dict().items():
        np.testing.assert_array_equal(one.text_encoder.state_dict()[k].numpy(), v.numpy())
    assert one.tokenizer(PROMPTS).input_ids == pipelines["one"].tokenizer(PROMPTS).input_ids
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.standard_normal((1, 3, SIZE_I, SIZE_I)).astype(np.float32))
    text = torch.tensor(rng.standard_normal((1, 5, 48)).astype(np.float32))
    with torch.no_grad():  # equal weights; torch's kernels may differ between two instances
        np.testing.assert_allclose(one.unet(x, 10, text).sample.numpy(),
                                   pipelines["one"].unet(x, 10, text).sample.numpy(),
                                   rtol=1e-5, atol=1e-5)


def _one_error_line(r, needle):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    return lines[0]


def test_bad_inputs_are_one_error_line_and_leave_nothing(pipelines, tmp_path):
    """The command's error line (exit 2) for a missing unet/; the library's one-line errors
    for an unsupported value and a non-empty --out; nothing is left behind."""
    from jaxt2i.config import ConfigError
    from jaxt2i.pipelines import deepfloyd_if

    src = pipelines["src_i"]
    out = tmp_path / "out"
    no_unet = tmp_path / "no-unet"
    no_unet.mkdir()
    shutil.copy(src / "model_index.json", no_unet)
    print(_one_error_line(_run("jaxt2i.convert", "--from=diffusers", no_unet, f"--out={out}",
                               check=False), "has no unet/ folder"))

    bad = tmp_path / "bad"
    shutil.copytree(src, bad, ignore=shutil.ignore_patterns("*.safetensors"))
    path = bad / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(ConfigError, match=r"scheduler_config.json: prediction_type="
                       r"'v_prediction' is not supported by jaxt2i's IF stages"):
        deepfloyd_if.from_diffusers([str(bad)], str(out), log=lambda m: None)
    assert not out.exists() and not list(tmp_path.glob("out.partial-*"))

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        deepfloyd_if.from_diffusers([str(src)], str(out), log=lambda m: None)
    assert os.listdir(out) == ["keep.txt"]
    bad_t5 = tmp_path / "bad-t5"  # a failure after the writing began: the partial is removed
    shutil.copytree(src, bad_t5)
    (bad_t5 / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer"):
        deepfloyd_if.from_diffusers([str(bad_t5)], str(tmp_path / "new"), log=lambda m: None)
    assert not list(tmp_path.glob("new*"))


def test_unsupported_values_in_process(pipelines, tmp_path):
    """More refusals, each one line naming the file and field (no weights are read)."""
    from jaxt2i.config import ConfigError
    from jaxt2i.pipelines import deepfloyd_if

    src = pipelines["src_i"]
    cases = [("unet/config.json", "act_fn", "mish", "act_fn='mish'"),
             ("scheduler/scheduler_config.json", "variance_type", "fixed_small",
              "variance_type='fixed_small'"),
             ("scheduler/scheduler_config.json", "num_train_timesteps", 500,
              "num_train_timesteps=500")]
    for i, (name, key, value, needle) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(src, bad, ignore=shutil.ignore_patterns("*.safetensors"))
        path = bad / name
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
        with pytest.raises(ConfigError) as e:
            deepfloyd_if.from_diffusers([str(bad)], str(tmp_path / f"out{i}"), log=lambda m: None)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="stage-II .* pass the stage-I pipeline too"):
        deepfloyd_if.from_diffusers([str(pipelines["src_ii"])], str(tmp_path / "o"),
                                    log=lambda m: None)


def test_family_registry_reads_old_configs_and_refuses_unknown_families():
    """A config without model_family is an Efficient U-Net (every config written before the
    field); an 'if' model section parses into IFModelConfig; an unknown family, or an IF
    section of the wrong shape, is one line."""
    from jaxt2i.config import ConfigError
    from jaxt2i.models.if_family import IFModelConfig
    from jaxt2i.models.registry import get_family
    from jaxt2i.stage import StageConfig

    with open(os.path.join(ROOT, "jaxt2i", "assets", "demo_cascade", "sr", "config.json")) as f:
        old = json.load(f)["config"]
    assert "model_family" not in old
    cfg = StageConfig.from_dict(old)
    assert cfg.model_family == "efficient_unet" and "model_family" not in cfg.to_dict()
    with pytest.raises(ConfigError, match=r"^stage 'x': model_family='unet3d' is not a U-Net "
                       "family this jaxt2i knows; allowed: efficient_unet, if$"):
        StageConfig.from_dict(dict(old, model_family="unet3d"), where="stage 'x'")
    unet = dataclasses.replace(SIZES["tiny-ii"], sample_size=SIZE_II)
    model = IFModelConfig(unet=unet, image_size=SIZE_II, lowres_size=SIZE_I)
    assert IFModelConfig.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    assert get_family("if").count_params(model) > 0 and model.learned_variance
    with pytest.raises(ConfigError, match="unreadable model config .*unet.in_channels"):
        StageConfig.from_dict(dict({k: v for k, v in old.items() if k != "stage"},
                                   model_family="if", model=dict(model.to_dict(), lowres_size=0)),
                              where="stage 'x'")
