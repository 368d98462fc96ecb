"""`python -m jaxt2i.encode`: prompts -> frozen T5 text embeddings (+ mask), as safetensors.

    python -m jaxt2i.encode --prompt "a red circle above a blue square" --prompt "" \
        --out embeddings.safetensors

Without --text-encoder, the small encoder bundled with the package is used (the one the demo
cascade is conditioned on); point --text-encoder at any Hugging Face T5 directory (v1.0, v1.1,
Flan) to use another.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import flags

from jaxt2i import assets
from jaxt2i.config import ConfigError, run_app

_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt to encode (repeatable; '' is the "
                                    "unconditional prompt).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A UTF-8 text file, one prompt per line.")
_TEXT_ENCODER = flags.DEFINE_string("text_encoder", None, "Hugging Face T5 directory (or hub id); "
                                    "default: the bundled shapes encoder.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Text length L (default: the encoder's).")
# Text encoders read ~128 tokens; far longer sequences only exhaust memory (attention is L^2).
MAX_LENGTH_LIMIT = 4096
_OUT = flags.DEFINE_string("out", None, "Write embeddings [B, L, D], mask [B, L] and the prompts "
                           "to this .safetensors file.")


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """Prompts from flags and/or a file; one clear error when there are none."""
    out = list(prompts)
    if prompts_file:
        try:
            with open(prompts_file, encoding="utf-8") as f:
                out += [line.rstrip("\n") for line in f if line.strip()]
        except FileNotFoundError:
            raise ConfigError(f"--prompts_file {prompts_file!r} does not exist") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompts_file {prompts_file!r} is not UTF-8 text ({e.reason} at "
                              f"byte {e.start})") from None
    if not out:
        raise ConfigError("no prompts: pass --prompt TEXT (repeatable) or --prompts_file FILE")
    return out


def encode_to_file(encoder, prompts: list[str], out: str | None) -> dict:
    """Encodes `prompts`, optionally saves them, and returns a summary per prompt."""
    from jaxt2i.text.convert import write_safetensors

    emb, mask = encoder.encode(prompts)
    emb = np.asarray(emb, np.float32)
    mask = np.asarray(mask)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        write_safetensors({"embeddings": emb, "mask": mask.astype(np.uint8)}, out,
                          metadata={"prompts": json.dumps(prompts),
                                    "max_length": str(encoder.max_length)})
    rows = []
    for i, p in enumerate(prompts):
        m = mask[i]
        rows.append({"prompt": p, "tokens": int(m.sum()),
                     "rms": float(np.sqrt(np.mean(emb[i][m] ** 2)))})
    return {"shape": list(emb.shape), "rows": rows}


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}; prompts go in --prompt \"TEXT\"")
    from jaxt2i.text import load_encoder

    prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
    if _MAX_LENGTH.value is not None and not 1 <= _MAX_LENGTH.value <= MAX_LENGTH_LIMIT:
        raise ConfigError(f"--max_length={_MAX_LENGTH.value} must be between 1 and "
                          f"{MAX_LENGTH_LIMIT} tokens (omit it for the encoder's own length)")
    out = _OUT.value
    if out:
        if os.path.isdir(out):
            raise ConfigError(f"--out={out} is a directory; give a file path, e.g. "
                              f"{os.path.join(out, 'embeddings.safetensors')}")
        from jaxt2i.workdir import check_writable

        check_writable(os.path.dirname(os.path.abspath(out)), "--out's directory")
    path = _TEXT_ENCODER.value or assets.text_encoder_dir()
    try:
        encoder = load_encoder(path, dtype=_DTYPE.value, max_length=_MAX_LENGTH.value)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    from jaxt2i.text.tokenizer import UnknownTextError

    try:
        summary = encode_to_file(encoder, prompts, _OUT.value)
    except UnknownTextError as e:  # the bundled encoder's closed vocabulary
        raise ConfigError(str(e)) from None
    print(f"embeddings {summary['shape']} ({_DTYPE.value}) from {path}")
    for row in summary["rows"]:
        print(f"  {row['tokens']:3d} tokens  rms {row['rms']:.3f}  {row['prompt']!r}")
    if _OUT.value:
        print(f"wrote {_OUT.value}")
    sys.stdout.flush()


if __name__ == "__main__":
    run_app(main)
