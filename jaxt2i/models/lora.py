"""LoRA adapters (Hu et al. 2021) on a network's attention and projection kernels.

A kernel W of shape [*in, *out] (a dense [in, out], an attention projection [C, heads, hd], an
attention output [heads, hd, C]) is adapted as

    W' = W + scale * A @ B,   A [*in, rank] (random), B [rank, *out] (zero),  scale = alpha / rank

so W' = W at the start. In diffusers' / peft's torch layout (weight [out, in]) this is
W'^T = W^T + scale * B^T A^T: their lora_A is our A^T, their lora_B our B^T.

Training with adapters keeps the params as {'base': the frozen network params, 'lora': the
adapters}; `merge` gives the network's params, `masked` makes an optimizer that updates only
the adapters (the base has no optimizer state), the EMA averages the adapters alone
(`trainable`, `ema_tree`: the base is not held twice), and `export` writes a stage export of the
merged params plus the adapters alone (`ADAPTERS_FILE`, small) beside it. The adapters mirror
the base's module paths: lora['down_blocks_1']['attentions_0']['to_q'] = {'lora_a', 'lora_b'}.
Their in / out axes keep the kernel's logical axis names (the rank axis is never sharded), so
the sharding rules of `jaxt2i.parallel` apply to them as to the base.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxt2i import paths
from jaxt2i.config import ConfigError

# Module names that can carry adapters -> how many leading kernel axes are inputs.
TARGETS: dict[str, int] = {
    # attention (IF's added-KV attention and its text pooling)
    "to_q": 1, "to_k": 1, "to_v": 1, "add_k_proj": 1, "add_v_proj": 1, "to_out_0": 2,
    "q_proj": 1, "k_proj": 1, "v_proj": 1,
    # projections: text -> cross-attention width, pooled text, embeddings into resnets
    "encoder_hid_proj": 1, "proj": 1, "time_emb_proj": 1, "linear_1": 1, "linear_2": 1,
}
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "add_k_proj", "add_v_proj")
ADAPTERS_FILE = "lora.safetensors"
FORMAT = "jaxt2i-lora-1"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A `train.lora` section.

    Attributes:
      rank: the adapters' rank r (0: no adapters, full fine-tuning).
      alpha: scale = alpha / rank (0: alpha = rank, scale 1).
      targets: module names (`TARGETS`) whose kernels get adapters.
    """

    rank: int
    alpha: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"train.lora.rank={self.rank!r} must be a positive int (0 turns "
                              "LoRA off: full fine-tuning)")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ConfigError(f"train.lora.alpha={self.alpha!r} must be >= 0 (0: alpha = rank)")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"train.lora.targets={','.join(self.targets)!r}: {bad or 'empty'} "
                              f"not allowed; allowed module names: {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank

    @classmethod
    def from_config(cls, section: Any) -> "LoraConfig | None":
        """The adapters of a `train.lora` section (rank, alpha, targets as 'a,b' or a list);
        None when absent or rank 0."""
        if not section or not int(section.get("rank", 0) or 0):
            return None
        targets = section.get("targets") or DEFAULT_TARGETS
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        try:
            return cls(int(section["rank"]), float(section.get("alpha", 0.0) or 0.0),
                       tuple(targets))
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"train.lora: {e}") from None

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def _walk(tree, path=()):
    """(module path, kernel) of every leaf named 'kernel' in nested dicts."""
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _walk(v, path + (k,))
        elif k == "kernel":
            yield path, v


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def adapted(params, cfg: LoraConfig) -> list[tuple[tuple, int]]:
    """(module path, number of input axes) of each kernel of `params` (boxed or not) that gets
    an adapter. ConfigError when a target names no kernel of the model."""
    out, seen = [], set()
    for path, kernel in _walk(params):
        name = path[-1] if path else ""
        if name in cfg.targets and len(np.shape(nn.unbox(kernel))) in (2, 3):
            out.append((path, TARGETS[name]))
            seen.add(name)
    missing = [t for t in cfg.targets if t not in seen]
    if missing:
        raise ConfigError(f"train.lora.targets: {missing} name no dense kernel of this model; "
                          "drop them or pick others of: " + ", ".join(TARGETS))
    return out


def init(boxed_params, cfg: LoraConfig, rng):
    """Adapters for `boxed_params` (the network's init, with logical axis names): A ~ N(0, 1 /
    fan_in), B = 0. Returns the adapter tree, boxed with the kernels' axis names."""
    out: dict = {}
    for k, (path, n_in) in enumerate(adapted(boxed_params, cfg)):
        kernel = _get(boxed_params, path)["kernel"]
        shape = np.shape(nn.unbox(kernel))
        names = getattr(kernel, "names", (None,) * len(shape))
        fan_in = int(np.prod(shape[:n_in]))
        a = jax.random.normal(jax.random.fold_in(rng, k), (*shape[:n_in], cfg.rank),
                              jnp.float32) / math.sqrt(fan_in)
        b = jnp.zeros((cfg.rank, *shape[n_in:]), jnp.float32)
        _set(out, path, {"lora_a": nn.LogicallyPartitioned(a, (*names[:n_in], None)),
                         "lora_b": nn.LogicallyPartitioned(b, (None, *names[n_in:]))})
    return out


def delta(a, b):
    """A @ B over the rank axis: [*in, r] x [r, *out] -> [*in, *out]."""
    return jnp.tensordot(a, b, axes=1)


def merge(base, adapters, scale: float):
    """The network's params: every adapted kernel W -> W + scale * A @ B (traceable; numpy in,
    numpy out works too). `base` is not modified."""
    def walk(node, lora):
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v, lora.get(k, {}) if isinstance(lora, Mapping) else {})
               for k, v in node.items()}
        if isinstance(lora, Mapping) and "lora_a" in lora:
            out["kernel"] = node["kernel"] + scale * delta(lora["lora_a"], lora["lora_b"])
        return out

    return walk(base, adapters)


def is_lora_tree(params) -> bool:
    """Whether `params` is a LoRA training run's {'base', 'lora'} tree."""
    return isinstance(params, Mapping) and set(params) == {"base", "lora"}


def network_params(params, cfg: LoraConfig | None):
    """The network's params of a train state's params: merged for a LoRA run (the base
    stop-gradded: it is frozen), else `params` itself."""
    if cfg is None:
        return params
    return merge(jax.lax.stop_gradient(params["base"]), params["lora"], cfg.scale)


def trainable(params):
    """The adapters of a {'base', 'lora'} tree: what a LoRA run trains, and all its EMA holds
    (`jaxt2i.train_state.create_train_state(..., trainable=)`; the base is frozen, so it is its
    own average and is not held twice)."""
    return params["lora"]


def ema_tree(params, ema):
    """The params a run samples and exports from its state's (params, ema_params): the EMA; for
    a LoRA run, whose EMA holds the adapters alone, {'base': the frozen base, 'lora': the EMA
    adapters}. A LoRA checkpoint written when the EMA held the base too is read as it is."""
    if is_lora_tree(params) and not is_lora_tree(ema):
        return {"base": params["base"], "lora": ema}
    return ema


def masked(tx: optax.GradientTransformation, params) -> optax.GradientTransformation:
    """`tx` on the adapters of a {'base', 'lora'} `params` tree (arrays or their shapes) only;
    the base gets no update and holds no optimizer state."""
    labels = {"base": jax.tree_util.tree_map(lambda _: "frozen", params["base"]),
              "lora": jax.tree_util.tree_map(lambda _: "train", params["lora"])}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def export(params, config: dict, out_dir: str, step: int | None = None) -> str:
    """A stage export of `params` (`jaxt2i.checkpoint.export_params`); a LoRA run's
    {'base', 'lora'} tree is exported merged, with its adapters alone in `ADAPTERS_FILE`."""
    from jaxt2i.checkpoint import export_params

    if not is_lora_tree(params):
        return export_params(params, config, out_dir, step)
    cfg = LoraConfig.from_config(config.get("train", {}).get("lora"))
    if cfg is None:
        raise ConfigError(f"the params to export to {out_dir} hold LoRA adapters but the "
                          "config has no train.lora.rank")
    export_params(merge(params["base"], params["lora"], cfg.scale), config, out_dir, step)
    save_adapters(params["lora"], cfg, paths.join(out_dir, ADAPTERS_FILE), step=step,
                  base=str(config.get("train", {}).get("init_from", "")))
    return out_dir


def save_adapters(adapters, cfg: LoraConfig, path: str, *, step: int | None = None,
                  base: str = "") -> None:
    """Writes the adapters (float32 safetensors, '/'-joined paths) with their rank, alpha,
    targets and base in the metadata. Only process 0 writes."""
    from jaxt2i.checkpoint import flatten, host_gather
    from jaxt2i.text.convert import write_safetensors

    flat = flatten(host_gather(adapters))
    if jax.process_index() == 0:
        meta = {"format": FORMAT, "lora": json.dumps(cfg.to_dict()), "base": base,
                "step": str(step if step is not None else -1)}
        with paths.local_file(path) as local:  # a URL: written locally, then uploaded
            write_safetensors({k: np.asarray(v, np.float32) for k, v in flat.items()}, local,
                              metadata=meta)


def load_adapters(path: str) -> tuple[dict, LoraConfig]:
    """(adapter tree of numpy arrays, its LoraConfig) from `save_adapters` output."""
    from safetensors import safe_open

    from jaxt2i.checkpoint import unflatten

    try:
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors' own errors for a bad file
        raise ConfigError(f"{path} is not a readable LoRA adapter file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a jaxt2i LoRA adapter file (metadata format "
                          f"{meta.get('format')!r}, expected {FORMAT!r})")
    return unflatten(tensors), LoraConfig.from_config(json.loads(meta["lora"]))


def merge_into_export(adapters_path: str, base_dir: str, out: str, log=print) -> str:
    """Writes a stage export to `out`: the stage export `base_dir` with the adapters of
    `adapters_path` (`save_adapters` output, e.g. a LoRA run's export/lora.safetensors) merged,
    W + scale A B. The base may be another stage than the one the adapters were trained on;
    its adapted kernels' shapes must fit. `out` must be new or empty (written beside and
    renamed when complete). A text encoder path relative to the base is made absolute.

    Raises ConfigError (one line) for an unreadable file or an adapter that does not fit."""
    import os

    from jaxt2i.checkpoint import export_params, flatten, load_exported
    from jaxt2i.export.common import staging_dir
    from jaxt2i.stage import resolve_export_dir

    adapters, cfg = load_adapters(adapters_path)
    base_dir = resolve_export_dir(base_dir)
    base, config, step = load_exported(base_dir)
    fb = flatten(base)
    for name, a in flatten(adapters).items():
        module, which = name.rsplit("/", 1)
        kernel = fb.get(f"{module}/kernel")
        n_in = TARGETS.get(module.rsplit("/", 1)[-1], 1)
        fits = kernel is not None and a.shape[-1 if which == "lora_a" else 0] == cfg.rank and (
            a.shape[:-1] == kernel.shape[:n_in] if which == "lora_a"
            else a.shape[1:] == kernel.shape[n_in:])
        if not fits:
            got = "no such kernel" if kernel is None else f"its kernel is {kernel.shape}"
            raise ConfigError(f"{adapters_path}: adapter {name} {a.shape} (rank {cfg.rank}) does "
                              f"not fit the stage {base_dir} ({got}); merge adapters into the "
                              "architecture they were trained on")
    text = config.get("text", {})
    beside = os.path.join(base_dir, str(text.get("encoder", "")))
    if text.get("encoder") and not os.path.isabs(text["encoder"]) and os.path.isdir(beside):
        config = {**config, "text": {**text, "encoder": os.path.abspath(beside)}}
    log(f"merging {len(flatten(adapters)) // 2} adapters (rank {cfg.rank}, scale "
        f"{cfg.scale:g}) into {base_dir}")
    merged = merge(base, jax.tree_util.tree_map(np.asarray, adapters), cfg.scale)
    with staging_dir(out, log=log) as root:
        export_params(merged, config, root, step)
    return out


__all__ = ["ADAPTERS_FILE", "DEFAULT_TARGETS", "LoraConfig", "TARGETS", "adapted", "delta",
           "ema_tree", "export", "init", "is_lora_tree", "load_adapters", "masked", "merge",
           "merge_into_export", "network_params", "save_adapters", "trainable"]
