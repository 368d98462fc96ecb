#!/usr/bin/env python
# Vendored unchanged from the team anchor ../shared/anchors/imagen_pytorch_bench.py (the measured
# imagen-pytorch baseline); `python -m jaxt2i.bench --vs-imagen-pytorch` runs it phase by phase.
"""CPU baseline for lucidrains/imagen-pytorch (anchor for the JAX/Flax Imagen port).

Setup:         python3 -m venv venv && venv/bin/pip install torch==2.13.0 \
                   imagen-pytorch==2.1.0 torchvision==0.28.0
One command:   venv/bin/python imagen_pytorch_bench.py
Options:       --threads N   (torch intra-op threads; default = torch default)
               --quick       (fewer iterations)
               --iters N     (measured iterations per phase, overrides defaults)
               --phases a,b  (subset of: params,train_base,train_sr,sample_base,sample_sr,
                             sample_cascade_e2e)

Each phase runs in its own subprocess so that peak RSS (ru_maxrss) is per phase.
The last line printed is one JSON object: {"bench": "imagen-pytorch-cpu", ...}.

Measured things
  train_base : Imagen.forward(unet_number=1) + backward + Adam.step, 64x64, batch 8
  train_sr   : Imagen.forward(unet_number=2) + backward + Adam.step, 64->256, batch 4
               (low-res conditioning made by imagen itself: resize 256->64->256, noise aug)
  sample_base: one Imagen.p_sample() step (ancestral, continuous-time, dynamic
               thresholding p=0.95) of the base unet at batch 4, 64x64, with
               classifier-free guidance cond_scale=5 (two unet forwards per step),
               and the same without guidance (cond_scale=1, one forward)
  sample_sr  : the same for the 64->256 SR unet at batch 4 (cond_scale=5)
  sample_cascade_e2e: public Imagen.sample() through both unets, 4 steps per stage,
               batch 4, cond_scale=5 (checks the whole path and its overhead)
Timings are wall-clock (perf_counter) medians after warmup; median_cpu_s is process CPU
time (helps spot contention on a shared machine: with 1 thread, wall ~= cpu when idle).

Offline notes (this machine has no HF hub access):
  * imagen_pytorch evaluates get_encoded_dim('google/t5-v1_1-base') as a default
    argument of Unet.__init__ at IMPORT time, which downloads the T5 config.
    We pre-seed imagen_pytorch.t5.T5_CONFIGS with T5Config(d_model=768) (the real
    value for t5-v1_1-base) before importing the package. T5 is never run: text
    conditioning is random precomputed `text_embeds` (dim 512, len 32) + masks.
  * the PyPI torchvision wheel is CUDA-linked and its custom ops fail to load against
    torch+cpu; imagen_pytorch only uses torchvision.transforms, so we stub the
    `torchvision._meta_registrations` module (registers meta kernels for nms etc).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

TEXT_EMBED_DIM = 512
MAX_TEXT_LEN = 32

BASE_UNET = dict(
    dim=64,
    cond_dim=128,
    dim_mults=(1, 2, 3, 4),
    num_resnet_blocks=2,
    layer_attns=(False, False, False, True),
    layer_cross_attns=(False, False, False, True),
    attn_heads=8,
    attn_dim_head=64,
    max_text_len=MAX_TEXT_LEN,
    memory_efficient=False,
)

SR_UNET = dict(
    dim=32,
    cond_dim=128,
    dim_mults=(1, 2, 4, 8),
    num_resnet_blocks=(2, 2, 2, 2),
    layer_attns=(False, False, False, True),
    layer_cross_attns=(False, False, False, True),
    attn_heads=8,
    attn_dim_head=64,
    max_text_len=MAX_TEXT_LEN,
    memory_efficient=True,
)

IMAGEN = dict(
    image_sizes=(64, 256),
    text_embed_dim=TEXT_EMBED_DIM,
    timesteps=1000,
    cond_drop_prob=0.1,
    noise_schedules=('cosine', 'cosine'),   # imagen-pytorch default for a 2-unet cascade
    pred_objectives='noise',
    lowres_noise_schedule='linear',
    lowres_sample_noise_level=0.2,
    dynamic_thresholding=True,
    dynamic_thresholding_percentile=0.95,
    min_snr_loss_weight=True,
    min_snr_gamma=5,
    loss_type='l2',
)

OPTIM = dict(lr=1e-4, betas=(0.9, 0.99), eps=1e-8)  # ImagenTrainer defaults (Adam)
CFG_SCALE = 5.0
BATCH = dict(train_base=8, train_sr=4, sample_base=4, sample_sr=4)
ITERS = dict(train_base=(2, 6), train_sr=(1, 3), sample_base=(2, 10), sample_sr=(1, 3))
QUICK_ITERS = dict(train_base=(1, 3), train_sr=(1, 2), sample_base=(1, 4), sample_sr=(1, 2))
ALL_PHASES = ['params', 'train_base', 'train_sr', 'sample_base', 'sample_sr', 'sample_cascade_e2e']


def import_imagen():
    """Import imagen_pytorch offline (see module docstring)."""
    import importlib.util
    import types
    sys.modules.setdefault('torchvision._meta_registrations',
                           types.ModuleType('torchvision._meta_registrations'))
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
    spec_pkg = importlib.util.find_spec('imagen_pytorch')
    t5_path = os.path.join(spec_pkg.submodule_search_locations[0], 't5.py')
    spec = importlib.util.spec_from_file_location('imagen_pytorch.t5', t5_path)
    t5 = importlib.util.module_from_spec(spec)
    sys.modules['imagen_pytorch.t5'] = t5
    spec.loader.exec_module(t5)
    from transformers import T5Config
    t5.T5_CONFIGS[t5.DEFAULT_T5_NAME] = dict(config=T5Config(d_model=768))
    import imagen_pytorch
    return imagen_pytorch


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def count_params(m):
    return sum(p.numel() for p in m.parameters())


def build(ip, torch):
    torch.manual_seed(0)
    base = ip.Unet(**BASE_UNET)
    sr = ip.Unet(**SR_UNET)
    imagen = ip.Imagen(unets=(base, sr), **IMAGEN)
    return imagen


def fake_text(torch, b):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(b, MAX_TEXT_LEN, TEXT_EMBED_DIM, generator=g)
    lens = torch.randint(8, MAX_TEXT_LEN + 1, (b,), generator=g)
    mask = torch.arange(MAX_TEXT_LEN)[None, :] < lens[:, None]
    emb = emb.masked_fill(~mask[..., None], 0.)   # like t5_encode_text: padding -> 0
    return emb, mask


def stats(times):
    return dict(median_s=statistics.median(times), mean_s=statistics.fmean(times),
                min_s=min(times), max_s=max(times), n=len(times))


def phase_params(ip, torch, args):
    imagen = build(ip, torch)
    out = dict(bench_base_unet=count_params(imagen.unets[0]),
               bench_sr_unet=count_params(imagen.unets[1]))
    # every Unet kwarg in effect after Imagen re-cast the unets (defaults included),
    # so another implementation can mirror the exact architecture
    out['effective_unet_kwargs'] = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in u._locals.items()
         if isinstance(v, (int, float, str, bool, tuple, list, type(None)))}
        for u in imagen.unets]
    # paper-size presets shipped by imagen-pytorch, counted on the meta device
    # (no memory). text_embed_dim=4096 = T5-XXL, as in the paper.
    with torch.device('meta'):
        for name in ('BaseUnet64', 'SRUnet256', 'SRUnet1024'):
            kls = getattr(ip, name)
            lowres = name != 'BaseUnet64'
            u = kls(text_embed_dim=4096, lowres_cond=lowres)
            out[f'preset_{name}_t5xxl'] = count_params(u)
    return dict(params=out)


def phase_train(ip, torch, args, which):
    unet_number = 1 if which == 'train_base' else 2
    b = BATCH[which]
    size = IMAGEN['image_sizes'][unet_number - 1]
    imagen = build(ip, torch)
    imagen.train()
    unet = imagen.get_unet(unet_number)
    opt = torch.optim.Adam(unet.parameters(), **OPTIM)
    g = torch.Generator().manual_seed(2)
    images = torch.rand(b, 3, size, size, generator=g)
    te, tm = fake_text(torch, b)
    rss_before = current_rss_mb()
    warm, iters = (QUICK_ITERS if args.quick else ITERS)[which]
    times, cpus, losses, warm_times = [], [], [], []
    for i in range(warm + iters):
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss = imagen(images, text_embeds=te, text_masks=tm, unet_number=unet_number)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        losses.append(float(loss.item()))
        if i >= warm:
            times.append(dt)
            cpus.append(dc)
        else:
            warm_times.append(round(dt, 3))
    r = stats(times)
    r['warmup_s'] = warm_times
    r['median_cpu_s'] = statistics.median(cpus)
    r['all_s'] = [round(x, 3) for x in times]
    r.update(batch=b, image_size=size, warmup=warm, params=count_params(unet),
             rss_after_build_mb=round(rss_before, 1), peak_rss_mb=round(rss_mb(), 1),
             images_per_s=b / r['median_s'], losses=[round(x, 4) for x in losses])
    return {which: r}


def phase_sample(ip, torch, args, which):
    unet_number = 1 if which == 'sample_base' else 2
    b = BATCH[which]
    size = IMAGEN['image_sizes'][unet_number - 1]
    imagen = build(ip, torch)
    imagen.eval()
    imagen.reset_unets_all_one_device()
    unet = imagen.unets[unet_number - 1]
    ns = imagen.noise_schedulers[unet_number - 1]
    te, tm = fake_text(torch, b)
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    lowres_kwargs = {}
    if unet_number > 1:
        low = torch.rand(b, 3, IMAGEN['image_sizes'][0], IMAGEN['image_sizes'][0], generator=g)
        lowres_noise_times = imagen.lowres_noise_schedule.get_times(
            b, IMAGEN['lowres_sample_noise_level'], device=torch.device('cpu'))
        lowres = imagen.normalize_img(imagen.resize_to(low, size))
        lowres, *_ = imagen.lowres_noise_schedule.q_sample(x_start=lowres, t=lowres_noise_times)
        lowres_kwargs = dict(lowres_cond_img=lowres, lowres_noise_times=lowres_noise_times)
    timesteps = ns.get_sampling_timesteps(b, device=torch.device('cpu'))
    rss_before = current_rss_mb()
    warm, iters = (QUICK_ITERS if args.quick else ITERS)[which]

    def run(cond_scale, remove_parallel):
        img = torch.randn(b, 3, size, size, generator=g)
        times, cpus, warm_times = [], [], []
        with torch.no_grad():
            for i in range(warm + iters):
                t, t_next = timesteps[i]
                c0 = time.process_time()
                t0 = time.perf_counter()
                img, _ = imagen.p_sample(
                    unet, img, t, t_next=t_next, noise_scheduler=ns,
                    text_embeds=te, text_mask=tm, cond_scale=cond_scale,
                    cfg_remove_parallel_component=remove_parallel,
                    pred_objective='noise', dynamic_threshold=True, **lowres_kwargs)
                dt = time.perf_counter() - t0
                dc = time.process_time() - c0
                if i >= warm:
                    times.append(dt)
                    cpus.append(dc)
                else:
                    warm_times.append(round(dt, 3))
        assert torch.isfinite(img).all()
        r = stats(times)
        r['warmup_s'] = warm_times
        r['median_cpu_s'] = statistics.median(cpus)
        r['all_s'] = [round(x, 3) for x in times]
        return r

    r = dict(batch=b, image_size=size, warmup=warm, params=count_params(unet),
             sampler='ancestral continuous-time (Imagen.p_sample), dynamic thresholding p=0.95',
             sampling_steps_default=IMAGEN['timesteps'])
    r['cfg5_standard'] = run(CFG_SCALE, False)   # eps_u + 5*(eps_c - eps_u), paper formula
    if unet_number == 1:
        r['cfg5_v210_default'] = run(CFG_SCALE, True)  # 2.1.0 sample() default: drop parallel comp.
        r['no_cfg'] = run(1.0, False)
    r['median_s_per_step'] = r['cfg5_standard']['median_s']
    r['est_full_sample_s'] = r['median_s_per_step'] * IMAGEN['timesteps']
    r['rss_after_build_mb'] = round(rss_before, 1)
    r['peak_rss_mb'] = round(rss_mb(), 1)
    return {which: r}


def phase_cascade(ip, torch, args, steps=4):
    """Public API end to end: Imagen.sample() through both unets, `steps` denoising
    steps per stage (the sampler uses noise_scheduler.num_timesteps steps), CFG 5,
    batch 4. Checks shapes and gives per-call overhead on top of per-step cost."""
    b = BATCH['sample_base']
    imagen = build(ip, torch)
    for ns in imagen.noise_schedulers:
        ns.num_timesteps = steps
    te, tm = fake_text(torch, b)
    torch.manual_seed(4)
    t0 = time.perf_counter()
    outs = imagen.sample(text_embeds=te, text_masks=tm, cond_scale=CFG_SCALE,
                         cfg_remove_parallel_component=False,
                         return_all_unet_outputs=True, use_tqdm=False)
    dt = time.perf_counter() - t0
    shapes = [list(o.shape) for o in outs]
    assert shapes == [[b, 3, 64, 64], [b, 3, 256, 256]], shapes
    return dict(sample_cascade_e2e=dict(batch=b, steps_per_stage=steps, cfg_scale=CFG_SCALE,
                                        total_s=dt, output_shapes=shapes,
                                        out_range=[float(outs[-1].min()), float(outs[-1].max())],
                                        peak_rss_mb=round(rss_mb(), 1)))


def child(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ip = import_imagen()
    import_s = time.perf_counter() - t0
    ph = args.phase
    if ph == 'params':
        res = phase_params(ip, torch, args)
    elif ph.startswith('train'):
        res = phase_train(ip, torch, args, ph)
    elif ph == 'sample_cascade_e2e':
        res = phase_cascade(ip, torch, args)
    else:
        res = phase_sample(ip, torch, args, ph)
    if ph != 'params':
        res[ph]['import_s'] = round(import_s, 2)
    res['_meta'] = dict(torch=torch.__version__, imagen_pytorch=ip.__version__,
                        threads=torch.get_num_threads(),
                        interop_threads=torch.get_num_interop_threads())
    print('CHILD_JSON ' + json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--phase')
    ap.add_argument('--phases', default=','.join(ALL_PHASES))
    ap.add_argument('--threads', type=int, default=0)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--iters', type=int, default=0, help='override measured iterations per phase')
    args = ap.parse_args()
    if args.iters:
        for k in ITERS:
            ITERS[k] = (ITERS[k][0], args.iters)
    if args.phase:
        return child(args)

    results, meta = {}, {}
    for ph in args.phases.split(','):
        cmd = [sys.executable, os.path.abspath(__file__), '--phase', ph]
        if args.threads:
            cmd += ['--threads', str(args.threads)]
        if args.quick:
            cmd.append('--quick')
        if args.iters:
            cmd += ['--iters', str(args.iters)]
        t0 = time.perf_counter()
        load0 = os.getloadavg()[0]
        env = dict(os.environ)
        if args.threads:
            env['OMP_NUM_THREADS'] = str(args.threads)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        load1 = os.getloadavg()[0]
        line = [l for l in p.stdout.splitlines() if l.startswith('CHILD_JSON ')]
        if p.returncode != 0 or not line:
            results[ph] = dict(error=(p.stderr or p.stdout)[-2000:])
        else:
            d = json.loads(line[-1][len('CHILD_JSON '):])
            meta = d.pop('_meta')
            d[ph]['loadavg1_before_after'] = [round(load0, 2), round(load1, 2)]
            results.update(d)
        print(f'# phase {ph} done in {time.perf_counter() - t0:.1f}s', file=sys.stderr, flush=True)

    cpu = ''
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except Exception:
        pass
    out = dict(bench='imagen-pytorch-cpu', **meta, quick=args.quick,
               host=dict(cpu=cpu, nproc=os.cpu_count(), python=platform.python_version()),
               config=dict(base_unet=BASE_UNET, sr_unet=SR_UNET, imagen=IMAGEN, optim=OPTIM,
                           cfg_scale=CFG_SCALE, text_embed_dim=TEXT_EMBED_DIM,
                           max_text_len=MAX_TEXT_LEN, batch=BATCH,
                           iters=(QUICK_ITERS if args.quick else ITERS)),
               results=results)
    print(json.dumps(out))


if __name__ == '__main__':
    main()
