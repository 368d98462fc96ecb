"""Hugging Face T5 / mT5 / umT5 / ByT5 safetensors <-> Flax parameter trees, without torch.

One table (`param_map`) names, for every Flax leaf, the Hugging Face tensor it comes from and
the reshape/transpose between the two layouts; loading and the exporter both read it, so the two
directions cannot drift apart. PyTorch `nn.Linear` stores [out, in]; Flax Dense stores [in, out],
and attention projections are split per head here ([embed, heads, kv]).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open

from jaxt2i.text.t5 import T5Config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """One parameter: HF name, Flax path, HF shape, and the layout transforms between them."""

    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def param_map(cfg: T5Config) -> list[Entry]:
    """Every encoder parameter of `cfg`, in HF naming, with its Flax location."""
    D, H, K, F = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff
    ident = lambda a: a  # noqa: E731

    def qkv(a):  # HF [H*K, D] -> Flax [D, H, K]
        return a.T.reshape(D, H, K)

    def qkv_back(a):
        return a.reshape(D, H * K).T

    def out(a):  # HF [D, H*K] -> Flax [H, K, D]
        return a.T.reshape(H, K, D)

    def out_back(a):
        return a.reshape(H * K, D).T

    relpos = "0.SelfAttention.relative_attention_bias.weight"
    buckets = cfg.relative_attention_num_buckets
    entries = [
        Entry("shared.weight", ("token_embedding",), (cfg.vocab_size, D), ident, ident),
        Entry("encoder.final_layer_norm.weight", ("encoder_norm", "scale"), (D,), ident, ident),
    ]
    if not cfg.bias_per_layer:  # T5 / mT5 / ByT5: the first layer's table, shared
        entries.insert(1, Entry(f"encoder.block.0.layer.{relpos}", ("relpos_bias",),
                                (buckets, H), ident, ident))
    _, gated = cfg.activation
    for i in range(cfg.num_layers):
        hf, fx = f"encoder.block.{i}.layer.", f"layers_{i}"
        if cfg.bias_per_layer:  # umT5: every layer's own table
            entries.append(Entry(f"{hf}{relpos}", (fx, "relpos_bias"), (buckets, H), ident, ident))
        for p, name in (("q", "query"), ("k", "key"), ("v", "value")):
            entries.append(Entry(f"{hf}0.SelfAttention.{p}.weight", (fx, "attention", name, "kernel"),
                                 (H * K, D), qkv, qkv_back))
        entries.append(Entry(f"{hf}0.SelfAttention.o.weight", (fx, "attention", "out", "kernel"),
                             (D, H * K), out, out_back))
        entries.append(Entry(f"{hf}0.layer_norm.weight", (fx, "pre_attention_layer_norm", "scale"),
                             (D,), ident, ident))
        wis = ("wi_0", "wi_1") if gated else ("wi",)
        for w in wis:
            entries.append(Entry(f"{hf}1.DenseReluDense.{w}.weight", (fx, "mlp", w, "kernel"),
                                 (F, D), np.transpose, np.transpose))
        entries.append(Entry(f"{hf}1.DenseReluDense.wo.weight", (fx, "mlp", "wo", "kernel"),
                             (D, F), np.transpose, np.transpose))
        entries.append(Entry(f"{hf}1.layer_norm.weight", (fx, "pre_mlp_layer_norm", "scale"),
                             (D,), ident, ident))
    return entries


# Tensors of a full seq2seq checkpoint that the encoder legitimately does not use.
_IGNORED_PREFIXES = ("decoder.", "lm_head.")
_ALIASES = {"encoder.embed_tokens.weight": "shared.weight"}  # tied copy of the embedding


def _weight_files(model_dir: str, weights_name: str = SINGLE_FILE) -> list[str]:
    """The safetensors files of a HF model directory (single file or sharded index).

    ``weights_name`` is the single file's name; its index is that name + '.index.json'
    (transformers: model.safetensors; diffusers: diffusion_pytorch_model.safetensors).
    """
    single = os.path.join(model_dir, weights_name)
    index = single + ".index.json"
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [p for p in files if not os.path.exists(os.path.join(model_dir, p))]
        if missing:
            raise FileNotFoundError(
                f"{index} lists shards that are not in {model_dir}: {missing}; "
                "download every shard of the checkpoint")
        return [os.path.join(model_dir, p) for p in files]
    if os.path.exists(single):
        return [single]
    others = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []
    hint = (" (only PyTorch .bin weights found: re-save them with "
            "`save_pretrained(..., safe_serialization=True)`)"
            if any(n.endswith(".bin") for n in others) else "")
    raise FileNotFoundError(
        f"no {weights_name} or {weights_name}.index.json in {model_dir}{hint}")


_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
               "F8_E5M2": ml_dtypes.float8_e5m2}


def _read_raw(path: str, name: str) -> np.ndarray:
    """Reads a tensor whose dtype numpy lacks, straight from the safetensors layout."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
        info = header[name]
        start, end = info["data_offsets"]
        fh.seek(8 + header_len + start)
        buf = fh.read(end - start)
    return np.frombuffer(buf, dtype=_RAW_DTYPES[info["dtype"]]).reshape(info["shape"])


def read_hf_tensors(model_dir: str, wanted: Iterable[str] | None = None,
                    weights_name: str = SINGLE_FILE) -> tuple[dict, list[str]]:
    """Reads the encoder's tensors of a HF directory.

    Args:
      model_dir: directory with model.safetensors or a sharded index.
      wanted: names to read (others are listed but not read); None reads all.
      weights_name: the single weights file's name (its sharded index adds '.index.json').

    Returns:
      (tensors by HF name, every tensor name present in the checkpoint).
    """
    wanted = None if wanted is None else set(wanted)
    tensors, names = {}, []
    for path in _weight_files(model_dir, weights_name):
        try:
            with safe_open(path, framework="np") as f:
                for name in f.keys():
                    names.append(name)
                    key = _ALIASES.get(name, name)
                    if wanted is not None and key not in wanted:
                        continue
                    if key in tensors and key != name:
                        continue  # keep 'shared.weight' over its tied alias
                    dtype = f.get_slice(name).get_dtype()
                    tensors[key] = (_read_raw(path, name) if dtype in _RAW_DTYPES
                                    else f.get_tensor(name))
        except Exception as e:  # noqa: BLE001 - safetensors' own error types for a bad file
            if isinstance(e, (FileNotFoundError, MemoryError)):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path} is not a readable safetensors file ({first}); it may be "
                             "truncated: copy or download it again") from None
    return tensors, names


def hf_to_flax(tensors: dict, names: list[str], cfg: T5Config, dtype) -> dict:
    """Maps HF tensors to the Flax params tree, refusing missing/unexpected/misshaped tensors."""
    entries = param_map(cfg)
    expected = {e.hf_name for e in entries}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(
        n for n in names
        if _ALIASES.get(n, n) not in expected and not n.startswith(_IGNORED_PREFIXES)
    )
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        hint = "check that config.json belongs to these weights"
        if any(".relative_attention_bias." in n and not n.startswith("encoder.block.0.")
               for n in unexpected):
            hint = ("every layer has a relative_attention_bias, as in umT5: a umT5 checkpoint's "
                    "config.json says \"model_type\": \"umt5\"")
        raise ValueError(
            "checkpoint does not match its config.json T5 encoder: " + "; ".join(parts)
            + "; " + hint)
    bad = [f"{e.hf_name}: got {list(tensors[e.hf_name].shape)}, expected {list(e.hf_shape)}"
           for e in entries if tuple(tensors[e.hf_name].shape) != e.hf_shape]
    if bad:
        raise ValueError("checkpoint tensors have the wrong shape for its config.json: "
                         + "; ".join(bad))
    params: dict = {}
    for e in entries:
        node = params
        for k in e.path[:-1]:
            node = node.setdefault(k, {})
        node[e.path[-1]] = np.ascontiguousarray(e.to_flax(tensors[e.hf_name])).astype(dtype)
    return params


def flax_to_hf(params: dict, cfg: T5Config) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_flax`: HF names -> numpy arrays (PyTorch layouts)."""
    out = {}
    for e in param_map(cfg):
        node = params
        for k in e.path:
            node = node[k]
        out[e.hf_name] = np.ascontiguousarray(e.to_hf(np.asarray(node)))
    return out


_RAW_NAMES = {np.dtype(v): k for k, v in _RAW_DTYPES.items()}


def write_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict | None = None,
                      save_file=None) -> None:
    """Writes a safetensors file atomically (temp file + rename).

    numpy has no bfloat16, so `safetensors.numpy.save_file` cannot write ml_dtypes arrays;
    those files are laid out here by the format's spec (8-byte header size, JSON header,
    little-endian data), everything else goes through `save_file`.
    """
    if save_file is None:
        from safetensors.numpy import save_file
    tmp = path + ".tmp"
    try:
        if not any(np.dtype(a.dtype) in _RAW_NAMES for a in tensors.values()):
            save_file(tensors, tmp, metadata=metadata)
        else:
            std = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                   np.dtype(np.int32): "I32", np.dtype(np.int64): "I64",
                   np.dtype(np.uint8): "U8", np.dtype(bool): "BOOL"}
            header, offset, blobs = {}, 0, []
            for name in sorted(tensors):
                a = np.ascontiguousarray(tensors[name])
                code = _RAW_NAMES.get(a.dtype) or std[a.dtype]
                blob = a.tobytes()
                header[name] = {"dtype": code, "shape": list(a.shape),
                                "data_offsets": [offset, offset + len(blob)]}
                offset += len(blob)
                blobs.append(blob)
            if metadata:
                header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(tmp, "wb") as fh:
                fh.write(len(raw).to_bytes(8, "little"))
                fh.write(raw)
                for blob in blobs:
                    fh.write(blob)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a directory at `path`, ...: no stray temp file
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
