"""Pieces shared by every stage config: text encoder, data, training, mesh, sharding rules.

Stage files (base.py, sr.py) call `stage_config(...)` and override a few fields; a variant
(`:size=tiny`) picks a named U-Net size and the matching defaults.
"""

import ml_collections

from jaxt2i.models.unet import get_unet_config
from jaxt2i.parallel.sharding import DEFAULT_RULES


def stage_config(size: str) -> ml_collections.ConfigDict:
    """The full config of one cascade stage with the U-Net size `size`."""
    unet = get_unet_config(size)
    c = ml_collections.ConfigDict()
    c.model_size = size
    # Every UNetConfig field, so `--config.model.base_channels=64` works and the JSON beside a
    # checkpoint describes the model completely.
    c.model = ml_collections.ConfigDict(unet.to_dict())
    # A later field (to_dict leaves it out at its default), here so that it can be overridden.
    c.model.remat_policy = unet.remat_policy

    c.text = ml_collections.ConfigDict()
    c.text.encoder = "bundled"  # 'bundled' (the shapes encoder) or a HF T5 directory / hub id
    c.text.max_length = 32
    c.text.dtype = "float32"
    c.text.cache = ""  # directory of a precomputed text-embedding cache ('' = encode on the fly)

    c.diffusion = ml_collections.ConfigDict()
    # 'cosine' is the continuous log-SNR cosine clipped to +-20; the paper variants use
    # 'cosine_offset' (Nichol & Dhariwal's s = 0.008, log-SNR from 8.77), as Imagen cites.
    c.diffusion.schedule = "cosine"
    # min-SNR (Hang et al. 2023) for the small configs; Imagen trains an unweighted eps loss,
    # which the paper variants use.
    c.diffusion.loss_weighting = "min_snr"
    c.diffusion.min_snr_gamma = 5.0
    c.diffusion.cond_drop_prob = 0.1  # text dropped for classifier-free guidance
    c.diffusion.aug_schedule = "cosine"  # noise-conditioning augmentation (SR stages)
    # SR stages: upsample the low-res image to the stage's size, then noise-augment it (the
    # paper, imagen-pytorch); 'augment_first' augments at low resolution and lets the U-Net
    # resize (every stage exported before the field, the bundled demo's SR stage included).
    c.diffusion.aug_order = "resize_first"
    # Training draws the augmentation level from [0, aug_max_level), the paper's full range
    # (the bundled demo's SR stage was trained with 0.5).
    c.diffusion.aug_max_level = 1.0

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "dpmpp_2m"
    c.sample.steps = 25
    c.sample.guidance = 5.0
    c.sample.thresholding = "dynamic"
    c.sample.aug_level = 0.1  # SR stages: fixed noise-augmentation level at sampling
    c.sample.spacing = "default"  # step grid: the schedule's, 'karras' or 'logsnr'
    c.sample.churn = 0.0  # EDM's S_churn of the 'euler' / 'heun' samplers
    c.sample.guidance_rescale = 0.0  # Lin et al. 2023; 0 = plain guidance
    c.sample.guidance_t_min = 0.0  # guidance only for normalized t in [t_min, t_max]
    c.sample.guidance_t_max = 1.0
    c.sample.threshold_percentile = 99.5  # dynamic thresholding's p (Imagen)
    c.sample.inpaint_resample = 0  # RePaint jumps per step when inpainting

    c.data = ml_collections.ConfigDict()
    c.data.source = "shapes"  # 'shapes' (generated on the fly) or a TFDS data dir of a builder
    c.data.split = "train"
    c.data.num_examples = 100_000  # size of the on-the-fly shapes dataset
    # Scene-kind mix of the on-the-fly shapes world, e.g. 'single=0.1,relation=0.45,count=0.1,
    # and=0.35' (weights; kinds left out get none); '' is the world's default mix.
    c.data.shapes_kinds = ""
    # Caption language of the on-the-fly shapes world: 'en', 'zh' (Chinese) or 'both' (each
    # example's language drawn from a stream of its own, so the English examples are those of
    # an 'en' run). Chinese needs a text encoder that reads it (mT5 / umT5 / ByT5).
    c.data.caption_language = "en"
    c.data.random_crop = False
    c.data.seed = 0
    c.data.worker_count = 0

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # global batch (all processes)
    c.train.num_steps = 1000
    c.train.optimizer = "adamw"
    # Adafactor only: scale updates by each param's RMS (T5X's relative steps, for lr ~1e-2).
    # Off, lr is the update's size as for Adam, so the paper's lr 1e-4 moves every param,
    # zero-initialised ones included (an update of ~1e-7 a step otherwise).
    c.train.adafactor_param_scale = False
    c.train.lr = 1e-4
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.weight_decay = 0.0
    c.train.warmup_steps = 100
    c.train.schedule = "constant"
    c.train.end_lr_factor = 0.0
    c.train.grad_clip = 1.0
    c.train.grad_accum = 1  # micro-batches per update (batch_size must divide evenly)
    c.train.ema_decay = 0.9999
    c.train.max_skipped = 10  # consecutive non-finite updates before the run stops
    c.train.seed = 0
    # Start from an exported model's params (a stage export dir or a training workdir) with a
    # fresh optimizer: fine-tuning. Ignored when the workdir already holds a checkpoint.
    c.train.init_from = ""
    # init_from an export that lacks some of this model's params (a layer added since, e.g. a
    # zero-initialised model.text_conv): those keep their initialisation instead of an error.
    c.train.init_from_allow_new = False
    c.train.log_every = 10
    c.train.save_every = 500
    c.train.keep_checkpoints = 3
    c.train.sample_every = 0  # 0 = only at the end
    c.train.sample_prompts = (  # a tuple, so --config.train.sample_prompts="('a', 'b')" works
        "a red circle above a blue square",
        "two green triangles on a white background",
        "a yellow star left of a purple cross",
        "a large blue square on a black background",
    )

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = [list(r) for r in DEFAULT_RULES]
    return c


def tiny(c: ml_collections.ConfigDict) -> None:
    """Test-sized run: a handful of small steps, text from the bundled 128-wide encoder."""
    c.train.batch_size = 4
    c.train.num_steps = 20
    c.train.warmup_steps = 2
    c.train.log_every = 5
    c.train.save_every = 10
    c.sample.steps = 4
    c.model.text_dim = 128


def demo(c: ml_collections.ConfigDict, num_steps: int) -> None:
    """The shipped shapes demo, sized to train on a 2-core CPU in about an hour per stage:
    a higher learning rate with cosine decay and a faster EMA than the long-run defaults.

    v-prediction with an unweighted v loss: at low SNR the network predicts x0 directly (and the
    loss weighs x0 errors by SNR + 1 >= 1), which fixes the global colour of a sample. An eps
    model's x0 = (x_t - sigma eps) / alpha amplifies eps errors by 1 / alpha there (first demo:
    tinted backgrounds and grain).
    """
    c.model.objective = "v"
    c.diffusion.loss_weighting = "uniform"
    c.train.num_steps = num_steps
    c.train.lr = 5e-4
    c.train.schedule = "cosine"
    c.train.end_lr_factor = 0.1
    c.train.warmup_steps = 200
    c.train.ema_decay = 0.999
    c.train.save_every = 250
    c.train.sample_every = 1000


def paper(c: ml_collections.ConfigDict) -> None:
    """The paper's setup: frozen T5-XXL, batch 2048, 2.5M steps, 10k warmup, an unweighted eps
    loss, Nichol & Dhariwal's cosine schedule (with its offset), bfloat16 + remat (augmentation:
    the defaults, resize first, levels in [0, 1)).

    Mesh: data 4 x FSDP over the rest. Compiled for the paper's 256 TPU v4 chips (512 devices)
    at batch 2048, every paper stage and IF-I-XL prefer it to FSDP over all devices (XLA's
    roofline: base 247 vs 286 ms, 64->256 159 vs 170 ms, 256->1024 137 vs 191 ms; IF-I-XL fits
    only so on 128 chips; BENCHMARKS.md). On a small slice (it holds 4x more params per device)
    pass --config.mesh.data=1. Tensor parallelism stays off: the U-Nets' channels are too
    narrow for it to pay (v5p, 64->256: 78.9 ms with tensor 2, 64.9 ms without).

    Remat policy: `dots` (keep each block's matmul and convolution outputs, recompute the
    elementwise work). On that mesh it beats `full` in the compiler's roofline for the base
    (197 vs 247 ms, 3.9 vs 4.9 GiB per device) and the 64->256 stage (120 vs 159 ms, 2.4 vs
    2.3 GiB); BENCHMARKS.md. Pass --config.model.remat_policy=full where memory is short."""
    c.diffusion.schedule = "cosine_offset"
    c.diffusion.loss_weighting = "uniform"
    c.text.encoder = "google/t5-v1_1-xxl"
    c.text.max_length = 128
    c.text.dtype = "bfloat16"
    c.train.batch_size = 2048
    c.train.num_steps = 2_500_000
    c.train.warmup_steps = 10_000
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.remat_policy = "dots"
    c.mesh.fsdp = -1
    c.mesh.data = 4


def shapes_run(c: ml_collections.ConfigDict, *, b2: float, weight_decay: float,
               ema_decay: float) -> None:
    """The data, train, eval, mesh and sharding sections of a test-sized run of a model other
    than a U-Net stage (CLIP, the unCLIP prior) on the shapes world: AdamW with cosine decay,
    a few steps of batch 8, data-parallel over every device; eval on 32 scenes."""
    from jaxt2i.parallel.sharding import DEFAULT_RULES

    c.data = ml_collections.ConfigDict(dict(source="shapes", num_examples=100_000, seed=0,
                                            worker_count=0, shapes_kinds=""))
    c.train = ml_collections.ConfigDict(dict(
        batch_size=8, num_steps=6, optimizer="adamw", lr=1e-3, b1=0.9, b2=b2, eps=1e-6,
        weight_decay=weight_decay, warmup_steps=2, schedule="cosine", end_lr_factor=0.0,
        grad_clip=1.0, ema_decay=ema_decay, max_skipped=10, seed=0, log_every=1, save_every=3,
        keep_checkpoints=3, eval_every=0))  # eval_every 0: only at the end
    c.eval = ml_collections.ConfigDict(dict(num_scenes=32, seed=1))
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = [list(r) for r in DEFAULT_RULES]
