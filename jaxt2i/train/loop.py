"""The training loop of one stage: `train(cfg, workdir)`.

Locks the workdir, restores the newest checkpoint (or initialises, or fine-tunes from an
export), streams batches from the input pipeline, runs `Trainer.step`, and lets a `Cadence`
decide when to log, checkpoint and write sample grids; a finished run exports its EMA params.
SIGTERM saves at the next step boundary and exits 0.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxt2i import paths
from jaxt2i.checkpoint import host_gather, open_run
from jaxt2i.config import ConfigError, validate
from jaxt2i.images import save_grid, to_uint8
from jaxt2i.models import lora
from jaxt2i.models.unet import UNetConfig, resize_matrix
from jaxt2i.monitor import MetricWriter, StopSignal
from jaxt2i.text.tokenizer import UnknownTextError
from jaxt2i.train.trainer import Trainer
from jaxt2i.workdir import WorkdirLock, check_writable, disk_error, quiet_disk_errors

log = logging.getLogger("jaxt2i")
# Steps dispatched ahead of the oldest loss the loop reads: the host prepares the next batch
# while the device works, and at most this many steps' batches are queued on the device.
_IN_FLIGHT = 2


class TrainingStopped(RuntimeError):
    """Raised when training cannot go on (e.g. too many non-finite updates in a row)."""


def _source(trainer: Trainer, cfg):
    """The run's data source: the on-the-fly shapes world or the data directory named."""
    source = cfg.data.source
    kinds = cfg.data.get("shapes_kinds", "")
    if kinds and source != "shapes":
        raise ConfigError(f"data.shapes_kinds={kinds!r} applies only to data.source='shapes' "
                          f"(not {source!r}); unset it")
    if kinds and cfg.text.cache:
        raise ConfigError(f"data.shapes_kinds={kinds!r} changes the shapes captions, so the text "
                          f"cache {cfg.text.cache!r} (built from the default mix) cannot serve "
                          f"them; unset text.cache")
    language = cfg.data.get("caption_language", "en")
    if language != "en" and source != "shapes":
        raise ConfigError(f"data.caption_language={language!r} applies only to "
                          f"data.source='shapes' (not {source!r}); unset it")
    if language != "en" and cfg.text.cache:
        raise ConfigError(f"data.caption_language={language!r} changes the shapes captions, so "
                          f"the text cache {cfg.text.cache!r} (built from English captions) "
                          f"cannot serve them; unset text.cache")
    if source == "shapes":
        from jaxt2i.data.shapes import ShapesSource

        return ShapesSource(trainer.unet_cfg.image_size, cfg.data.num_examples, cfg.data.split,
                            cfg.data.seed, kinds=kinds or None, language=language)
    return source


def _text_cache(trainer: Trainer, cfg):
    """The run's text cache (None without one); one built at another length than
    text.max_length, or by an encoder of another width than model.text_dim, is refused in one
    line (its embeddings would not fit the compiled step)."""
    if not cfg.text.cache:
        return None
    from jaxt2i.data.text_cache import TextCache

    cache = TextCache(cfg.text.cache)
    want = (trainer.encoder.max_length, trainer.unet_cfg.text_dim)
    if (cache.max_length, cache.d_model) != want:
        raise ValueError(
            f"text cache {cfg.text.cache} holds embeddings of length {cache.max_length} and "
            f"width {cache.d_model}, but the stage takes length {want[0]} (text.max_length) "
            f"and width {want[1]} (model.text_dim); rebuild it with `python -m "
            f"jaxt2i.data.text_cache --encoder={cfg.text.encoder} --max_length={want[0]}`")
    return cache


def _pipeline(trainer: Trainer, cfg):
    from jaxt2i.data import pipeline as data_pipeline

    c = trainer.unet_cfg
    try:
        return data_pipeline.make_pipeline(
            _source(trainer, cfg), resolution=c.image_size, batch_size=cfg.train.batch_size,
            seed=cfg.data.seed, lowres=c.lowres_size or None, random_crop=cfg.data.random_crop,
            text_cache=_text_cache(trainer, cfg), worker_count=cfg.data.worker_count,
            tokenizer=None if cfg.text.cache else trainer.encoder.tokenizer,
            split=cfg.data.split)
    except (FileNotFoundError, ValueError) as e:  # a user's data / cache path or size
        raise ConfigError(f"data: {e}") from None


def _preview_inputs(trainer: Trainer, cfg) -> tuple[list[str], dict[str, Any]]:
    """What the sample grids show: (prompts, the conditions `Trainer.sample` takes beside them).

    A base stage samples `train.sample_prompts`; an SR stage upsamples the first examples of
    the run's own data (their captions and low-res inputs, as its input pipeline makes them),
    and an unCLIP decoder decodes their CLIP image embeddings, so the grid shows the data it
    learns from."""
    from jaxt2i.data import pipeline as data_pipeline

    prompts = list(cfg.train.sample_prompts)
    if not trainer.is_sr and trainer.clip is None:
        return prompts, {}
    c = trainer.unet_cfg
    try:
        with data_pipeline.make_pipeline(
                _source(trainer, cfg), resolution=c.image_size, batch_size=len(prompts),
                seed=cfg.data.seed, lowres=c.lowres_size or None, shuffle=False,
                process_index=0, process_count=1, split=cfg.data.split) as preview:
            batch = next(preview)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None
    captions = [str(t) for t in batch["caption"]]
    if trainer.is_sr:
        return captions, {"lowres": jnp.asarray(batch["lowres"])}
    images = (np.asarray(batch["image"], np.float32) + 1.0) / 2.0
    return captions, {"image_embed": trainer.clip.encode_image(images).embeds}


def _host_batch(trainer: Trainer, local: dict) -> dict:
    """Host-side preparation: the model's inputs, cropped for crop-trained SR stages."""
    out = {"image": local["image"]}
    if "lowres" in local:
        out["lowres"] = local["lowres"]
    c = trainer.unet_cfg
    if c.crop_size and c.crop_size < c.image_size:
        out = _random_crop_pair(out, c, np.asarray(local["index"]), trainer.cfg.data.seed,
                                upsample=trainer.host_upsamples_lowres)
    if "text_emb" in local:
        out["text_emb"], out["text_mask"] = local["text_emb"], local["text_mask"]
    else:  # tokenized by the input pipeline (in its workers, if any)
        out["ids"], out["mask"] = local["ids"], local["mask"]
    return out


def _random_crop_pair(batch: dict, c: UNetConfig, index: np.ndarray, seed: int, *,
                      upsample: bool = False) -> dict:
    """Aligned random crops of each high-res image and its low-res input (the 1024 stage).

    The crop of example `i` depends only on (seed, i), so resumed runs see the same crops.
    With `upsample` (diffusion.aug_order 'resize_first') the low-res input is the same crop of
    the whole low-res image upsampled by the U-Net's resize ([crop, crop] rows and columns of
    its interpolation matrices), [B, crop_size, crop_size, C]; else [B, crop / scale, ...].
    """
    scale = c.image_size // c.lowres_size
    low_crop = c.crop_size // scale
    m = resize_matrix(c.lowres_size, c.image_size, c.lowres_resize) if upsample else None
    images, lows = [], []
    for n, i in enumerate(index):
        y, x = np.random.default_rng([seed, int(i)]).integers(0, c.lowres_size - low_crop + 1, 2)
        ys = slice(y * scale, y * scale + c.crop_size)
        xs = slice(x * scale, x * scale + c.crop_size)
        images.append(batch["image"][n, ys, xs])
        if upsample:  # [crop, h] @ [h, w, C] @ [w, crop] (optimize: two BLAS products)
            low = np.asarray(batch["lowres"][n], np.float32)
            lows.append(np.einsum("Hh,hwc,Ww->HWc", m[ys], low, m[xs], optimize=True))
        else:
            lows.append(batch["lowres"][n, y:y + low_crop, x:x + low_crop])
    return {**batch, "image": np.stack(images), "lowres": np.stack(lows)}


def train(cfg: ml_collections.ConfigDict, workdir: str, *, encoder=None, devices=None,
          progress: bool | None = None) -> dict:
    """Trains one stage until `cfg.train.num_steps` updates (resuming from `workdir`).

    Args:
      cfg: a stage config (configs/base.py, configs/sr.py, configs/unclip_decoder.py), a CLIP
        config (configs/clip.py, `kind='clip'`: `jaxt2i.train.contrastive.train_clip`) or a
        prior config (configs/prior.py, `kind='prior'`: `jaxt2i.train.prior.train_prior`).
      workdir: run directory: checkpoints/, metrics.jsonl, tensorboard/, samples/, export/.
      encoder: an already loaded text encoder (tests); default: the config's.
      devices: devices of the mesh (default: all devices of all processes).
      progress: show a tqdm bar (default: when stderr is a terminal).

    Returns:
      Summary dict: final step, last loss, losses per step, stop reason.
    """
    if cfg.get("kind") == "clip":  # configs/clip.py: contrastive CLIP training
        from jaxt2i.train.contrastive import train_clip

        return train_clip(cfg, workdir, devices=devices, progress=progress)
    if cfg.get("kind") == "prior":  # configs/prior.py: unCLIP's diffusion prior
        from jaxt2i.train.prior import train_prior

        return train_prior(cfg, workdir, devices=devices, progress=progress)
    if cfg.get("kind") is not None:
        raise ConfigError(f"config kind={cfg.kind!r} is not one jaxt2i trains; use 'clip', "
                          "'prior' or no kind (a cascade stage)")
    validate(cfg)  # bad values are refused before the workdir is touched
    lock = None
    if jax.process_index() == 0:  # one lock per run, held by process 0 of a multi-host run
        check_writable(workdir, "--workdir", urls=True)
        lock = WorkdirLock(workdir, log=log.warning).acquire()
    try:
        with quiet_disk_errors():
            return _train_locked(cfg, workdir, encoder, devices, progress)
    except Exception as e:
        why = disk_error(e)
        if why is None:
            raise
        steps = _saved_steps(workdir)
        raise TrainingStopped(
            f"cannot write to {paths.abspath(workdir)}: {why}; "
            + (f"the newest saved checkpoint (step {steps[-1]}) is intact" if steps else
               "no checkpoint was saved yet")
            + "; free space (or fix the permissions) and rerun the same command to resume"
        ) from None
    finally:
        if lock is not None:
            lock.release()


def _saved_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints on disk (Orbax renames a step into place when done)."""
    root = paths.join(workdir, "checkpoints")
    try:
        return sorted(int(d) for d in paths.listdir(root) if d.isdigit())
    except OSError:
        return []


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the training loop logs, saves and samples: a pure function of the step count.

    Attributes:
      num_steps: the run's last step.
      log_every: log metrics (and check for non-finite updates) every this many steps.
      save_every: checkpoint every this many steps (0: only at the end).
      sample_every: write a sample grid every this many steps (0: only at the end).
    """

    num_steps: int
    log_every: int
    save_every: int = 0
    sample_every: int = 0

    @classmethod
    def from_config(cls, train_cfg) -> "Cadence":
        return cls(int(train_cfg.num_steps), int(train_cfg.log_every),
                   int(train_cfg.save_every), int(train_cfg.sample_every))

    def after_step(self, step: int, *, stopping: bool = False) -> tuple[str, ...]:
        """The actions due once `step` updates are done, in order: 'log'; then 'stop' (save
        and leave the loop) when a stop was requested, else 'save' and 'sample' when due."""
        actions = []
        if stopping or step >= self.num_steps or step % max(self.log_every, 1) == 0:
            actions.append("log")
        if stopping:
            return (*actions, "stop")
        if self.save_every and step % self.save_every == 0:
            actions.append("save")
        if self.sample_every and step % self.sample_every == 0:
            actions.append("sample")
        return tuple(actions)

    def at_end(self, step: int, *, saved_at: int | None, stopped: bool) -> tuple[str, ...]:
        """After the loop: 'save' unless step was just saved; a finished run (not stopped by a
        signal) also writes its final 'sample' grid and its 'export'."""
        actions = [] if saved_at == step else ["save"]
        return tuple(actions) if stopped else (*actions, "sample", "export")


class _Reporter:
    """Turns the metrics of logged steps into metrics.jsonl / TensorBoard rows and a line on
    the console (or the tqdm bar): rates are over the steps since the previous log."""

    def __init__(self, writer, bar, batch_size: int, num_steps: int):
        self.writer, self.bar = writer, bar
        self.batch_size, self.num_steps = batch_size, num_steps
        self.t_last, self.data_wait, self.steps = time.perf_counter(), 0.0, 0

    def stepped(self, data_wait: float) -> None:
        self.steps += 1
        self.data_wait += data_wait
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, m: dict) -> None:
        n = max(self.steps, 1)
        dt = time.perf_counter() - self.t_last
        line = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                "images_per_s": n * self.batch_size / dt, "step_time_s": dt / n,
                "data_wait_s": self.data_wait / n, "skipped_total": int(m["total_skipped"])}
        self.writer.scalars(step, line)
        msg = (f"loss {line['loss']:.4f} {line['images_per_s']:.1f} img/s "
               f"step {line['step_time_s'] * 1e3:.0f} ms data {line['data_wait_s'] * 1e3:.0f} ms")
        if self.bar is not None:
            self.bar.set_postfix_str(msg)
        elif jax.process_index() == 0:
            print(f"step {step}/{self.num_steps} {msg}", flush=True)
        self.t_last, self.data_wait, self.steps = time.perf_counter(), 0.0, 0


def _next_batch(trainer: Trainer, data) -> tuple[dict, float]:
    """The next global batch and the seconds spent waiting for it."""
    from jaxt2i.data.pipeline import to_global_array

    t0 = time.perf_counter()
    try:
        local = next(data)
    except UnknownTextError as e:  # a caption the closed-vocabulary encoder cannot read
        raise ConfigError(f"data: {e}; use a real T5 (text.encoder) for such captions") from None
    batch = to_global_array(_host_batch(trainer, local), trainer.mesh)
    return batch, time.perf_counter() - t0


def _train_locked(cfg, workdir: str, encoder, devices, progress) -> dict:
    trainer = Trainer(cfg, encoder, devices)
    tc = cfg.train
    # Checked before anything is written: a checkpoint of another model stops the run here.
    ckpt, config_dict, restored = open_run(cfg, workdir, trainer.abstract_state)
    data = _pipeline(trainer, cfg)
    preview = _preview_inputs(trainer, cfg)
    if restored is not None:
        it, state, data_state, _ = restored
        if data_state:
            data.set_state(data_state)
        log.warning("resumed from %s at step %d", ckpt.directory, it)
    elif tc.get("init_from"):
        it, state = 0, trainer.init_state_from(tc.init_from, tc.seed)
    else:
        it, state = 0, trainer.init_state(tc.seed)
    root_rng = jax.random.key(tc.seed + 1)
    writer = MetricWriter(workdir)
    log.warning("training %s stage: %s U-Net, %.2fM params, mesh %s, batch %d, steps %d..%d",
                "sr" if trainer.is_sr else "base", cfg.model_size, trainer.num_params / 1e6,
                dict(trainer.mesh.shape), tc.batch_size, it, tc.num_steps)
    show_bar = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if show_bar and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=tc.num_steps, initial=it, unit="step", dynamic_ncols=True)
    cadence = Cadence.from_config(tc)
    report = _Reporter(writer, bar, tc.batch_size, tc.num_steps)
    reason, failed, saved_at, metrics = "finished", False, None, None
    in_flight = collections.deque()  # losses of dispatched steps not known to be done
    with StopSignal() as stop:
        while it < tc.num_steps:
            batch, wait = _next_batch(trainer, data)
            state, metrics = trainer.step(state, batch, root_rng, it)
            in_flight.append(metrics["loss"])
            if len(in_flight) > _IN_FLIGHT:  # the host prepares the next batch while the
                jax.block_until_ready(in_flight.popleft())  # device works, never further ahead
            it += 1
            report.stepped(wait)
            actions = cadence.after_step(it, stopping=bool(stop.requested))
            if "log" in actions:
                m = jax.device_get(metrics)
                if int(m["skipped"]) >= tc.max_skipped:
                    reason = (f"stopped: {int(m['skipped'])} non-finite updates in a row "
                              f"(train.max_skipped={tc.max_skipped}); the last good checkpoint "
                              f"in {ckpt.directory} is intact; lower train.lr or check the data")
                    failed = True
                    break
                report.log(it, m)
            if "stop" in actions:
                ckpt.save(it, state, data.get_state(), config_dict, force=True)
                saved_at = it
                reason = f"stopped by {stop.requested}: checkpoint saved at step {it}"
                break
            if "save" in actions:
                ckpt.save(it, state, data.get_state(), config_dict)
                saved_at = it
            if "sample" in actions:
                _write_samples(trainer, state, it, workdir, writer, preview)
        if saved_at != it and it in ckpt.all_steps():  # resumed at the last step
            saved_at = it
        end = () if failed else cadence.at_end(it, saved_at=saved_at,
                                               stopped=bool(stop.requested))
        if "save" in end:
            ckpt.save(it, state, data.get_state(), config_dict, force=True)
        ckpt.wait()
    if bar is not None:
        bar.close()
    if "sample" in end:
        _write_samples(trainer, state, it, workdir, writer, preview)
    if "export" in end:
        # a LoRA run exports the merged params, and its adapters alone beside them
        lora.export(lora.ema_tree(state.params, state.ema_params), config_dict,
                    paths.join(workdir, "export"), step=it)
    writer.close()
    ckpt.close()
    data.close()
    if failed:
        raise TrainingStopped(reason)
    if jax.process_index() == 0:
        print(reason if stop.requested else f"finished at step {it}: {workdir}", flush=True)
    last_loss = float(jax.device_get(metrics)["loss"]) if metrics is not None else None
    return {"step": it, "reason": reason, "last_loss": last_loss}


def _write_samples(trainer: Trainer, state, step: int, workdir: str, writer, preview) -> None:
    """A grid of EMA samples of the preview prompts (SR: of the preview low-res inputs; a
    decoder: of the preview images' CLIP embeddings)."""
    prompts, conditions = preview
    images = trainer.sample(lora.ema_tree(state.params, state.ema_params), prompts,
                            jax.random.key(trainer.cfg.train.seed + 2), **conditions)
    images = to_uint8(host_gather(images))
    if jax.process_index() == 0:
        grid = save_grid(images, paths.join(workdir, "samples", f"step_{step:07d}.png"))
        writer.image(step, "samples", grid)
