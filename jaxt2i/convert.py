"""`python -m jaxt2i.convert` (console script `jaxt2i-convert`): other projects' checkpoints
<-> jaxt2i cascades. Today: DeepFloyd IF in diffusers' layout.

    # diffusers IF pipeline directories (stage I, optionally stage II) -> a jaxt2i cascade
    python -m jaxt2i.convert --from=diffusers IF-I-XL-v1.0 IF-II-L-v1.0 --out=if-cascade
    python -m jaxt2i.sample --checkpoint=if-cascade --prompt "a red panda reading a book"

    # a jaxt2i cascade of IF stages -> diffusers pipeline directories (out/stage_I, stage_II)
    python -m jaxt2i.convert --to=diffusers if-cascade --out=if-diffusers

    # LoRA adapters (a LoRA run's export/lora.safetensors) merged into a stage export
    python -m jaxt2i.convert --merge_lora=runs/if-lora/export/lora.safetensors \
        if-cascade/stage_I --out=stage_I-merged

--out must be new or empty; it is written beside and renamed into place when complete, so a
failed conversion leaves nothing behind. The work is `jaxt2i.pipelines.deepfloyd_if`.
"""

from __future__ import annotations

from absl import flags

from jaxt2i.cli import run_app
from jaxt2i.config import ConfigError

FORMATS = ("diffusers",)


def main(argv) -> None:
    from jaxt2i.pipelines import deepfloyd_if

    F = flags.FLAGS
    src_format, dst_format, sources = F["from"].value, F.to, argv[1:]
    if F.merge_lora:
        return _merge_lora(F, sources)
    if (src_format is None) == (dst_format is None):
        raise ConfigError("pass exactly one of --from=diffusers (diffusers -> jaxt2i) and "
                          "--to=diffusers (jaxt2i -> diffusers)")
    for flag, value in (("--from", src_format), ("--to", dst_format)):
        if value is not None and value not in FORMATS:
            raise ConfigError(f"{flag}={value!r}; allowed: {', '.join(FORMATS)}")
    if not F.out:
        raise ConfigError("--out=DIR is required: the new directory to write")
    if not sources:
        raise ConfigError("no input given: python -m jaxt2i.convert --from=diffusers "
                          "PIPELINE_DIR [STAGE_II_DIR] --out=DIR, or --to=diffusers "
                          "CASCADE_DIR --out=DIR")
    say = lambda msg: print(msg, flush=True)  # noqa: E731  (stderr: only an error line)
    if src_format:
        record = deepfloyd_if.from_diffusers(sources, F.out, text_encoder=F.text_encoder,
                                             variant=F.variant, log=say)
        print(f"wrote the jaxt2i cascade {F.out} ({', '.join(record['stages'])} and "
              f"{record['text_encoder']}); sample it with python -m jaxt2i.sample "
              f"--checkpoint={F.out} --prompt TEXT", flush=True)
    else:
        if F.text_encoder or F.variant:
            raise ConfigError("--text_encoder and --variant apply to --from=diffusers only")
        record = deepfloyd_if.to_diffusers(sources if len(sources) > 1 else sources[0], F.out,
                                           log=say)
        print(f"wrote the diffusers pipelines {', '.join(record['pipelines'])} in {F.out}",
              flush=True)


def _merge_lora(F, sources) -> None:
    from jaxt2i.models import lora

    if F["from"].value or F.to or F.text_encoder or F.variant:
        raise ConfigError("--merge_lora takes a stage export and --out alone (no --from, --to, "
                          "--text_encoder or --variant)")
    if len(sources) != 1 or not F.out:
        raise ConfigError("--merge_lora=ADAPTERS needs one stage export and --out: python -m "
                          "jaxt2i.convert --merge_lora=lora.safetensors STAGE_DIR --out=DIR")
    lora.merge_into_export(F.merge_lora, sources[0], F.out,
                           log=lambda msg: print(msg, flush=True))
    print(f"wrote the stage export {F.out}; sample it with python -m jaxt2i.sample "
          f"--checkpoint={F.out} --prompt TEXT", flush=True)


def _define_flags() -> None:
    flags.DEFINE_string("from", None, "Convert from this format into a jaxt2i cascade: "
                        "'diffusers' (the positional arguments are a DeepFloyd IF stage-I "
                        "pipeline directory and optionally a stage-II one).")
    flags.DEFINE_string("to", None, "Convert a jaxt2i cascade (the positional argument: a "
                        "cascade directory, or one stage export per stage) into this format: "
                        "'diffusers'.")
    flags.DEFINE_string("out", None, "The directory to write (new or empty).")
    flags.DEFINE_string("merge_lora", None, "LoRA adapters (a LoRA run's export/"
                        "lora.safetensors) to merge into the stage export given as the "
                        "positional argument (W + scale A B); writes a stage export.")
    flags.DEFINE_string("variant", None, "--from=diffusers: the weight variant to read, e.g. "
                        "fp16 (diffusion_pytorch_model.fp16.safetensors, model.fp16*.safetensors).")
    flags.DEFINE_string("text_encoder", None, "--from=diffusers: a transformers T5 directory "
                        "(with its tokenizer files) to use instead of the pipeline's "
                        "text_encoder/ and tokenizer/.")


def cli() -> None:
    """Console-script entry point (`jaxt2i-convert`)."""
    run_app(main, _define_flags)


if __name__ == "__main__":
    cli()
