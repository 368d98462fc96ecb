"""`python -m jaxt2i.encode` (console script `jaxt2i-encode`): prompts -> frozen T5 text
embeddings (+ mask), as safetensors (`jaxt2i.text.encoder.encode_to_file`).

    python -m jaxt2i.encode --prompt "a red circle above a blue square" --prompt "" \
        --out embeddings.safetensors

Without --text-encoder, the small encoder bundled with the package is used (the one the demo
cascade is conditioned on); point --text_encoder at any Hugging Face T5 directory (v1.0, v1.1,
Flan, mT5, umT5, ByT5) to use another.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from jaxt2i import assets
from jaxt2i.cli import read_prompts, run_app
from jaxt2i.config import ConfigError

# Text encoders read ~128 tokens; far longer sequences only exhaust memory (attention is L^2).
MAX_LENGTH_LIMIT = 4096


def main(argv):
    F = flags.FLAGS
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}; prompts go in --prompt \"TEXT\"")
    from jaxt2i.text import load_encoder
    from jaxt2i.text.encoder import encode_to_file

    prompts = read_prompts(F.prompt, F.prompts_file)
    if F.max_length is not None and not 1 <= F.max_length <= MAX_LENGTH_LIMIT:
        raise ConfigError(f"--max_length={F.max_length} must be between 1 and "
                          f"{MAX_LENGTH_LIMIT} tokens (omit it for the encoder's own length)")
    out = F.out
    if out:
        from jaxt2i import paths

        if paths.is_url(out):
            raise ConfigError(f"--out={out}: embeddings are written to a local file only; "
                              "pass a local path")
        if os.path.isdir(out):
            raise ConfigError(f"--out={out} is a directory; give a file path, e.g. "
                              f"{os.path.join(out, 'embeddings.safetensors')}")
        from jaxt2i.workdir import check_writable

        check_writable(os.path.dirname(os.path.abspath(out)), "--out's directory")
    path = F.text_encoder or assets.text_encoder_dir()
    try:
        encoder = load_encoder(path, dtype=F.dtype, max_length=F.max_length)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    from jaxt2i.text.tokenizer import UnknownTextError

    try:
        summary = encode_to_file(encoder, prompts, F.out)
    except UnknownTextError as e:  # the bundled encoder's closed vocabulary
        raise ConfigError(str(e)) from None
    print(f"embeddings {summary['shape']} ({F.dtype}) from {path}")
    for row in summary["rows"]:
        print(f"  {row['tokens']:3d} tokens  rms {row['rms']:.3f}  {row['prompt']!r}")
    if F.out:
        print(f"wrote {F.out}")
    sys.stdout.flush()


def _define_flags() -> None:
    flags.DEFINE_multi_string("prompt", [], "A prompt to encode (repeatable; '' is the "
                              "unconditional prompt).")
    flags.DEFINE_string("prompts_file", None, "A UTF-8 text file, one prompt a line (stripped; "
                        "blank lines skipped).")
    flags.DEFINE_string("text_encoder", None, "Hugging Face T5 / mT5 / umT5 / ByT5 directory (or "
                        "hub id); default: the bundled shapes encoder.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
    flags.DEFINE_integer("max_length", None, "Text length L (default: the encoder's).")
    flags.DEFINE_string("out", None, "Write embeddings [B, L, D], mask [B, L] and the prompts to "
                        "this .safetensors file.")


def cli() -> None:
    """Console-script entry point (`jaxt2i-encode`)."""
    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
