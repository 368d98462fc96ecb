"""The shell commands a docs page shows, read from its markdown, so that a test runs what the
docs say and the two cannot drift apart."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bash_block(doc: str, heading: str, index: int = 0) -> list[str]:
    """The commands of the `index`-th ```bash block after `heading` (the heading's own line,
    e.g. '## Fine-tune') in docs/`doc`: continuation lines joined, comments and blank lines
    dropped, one string per command, as a shell would read it."""
    with open(os.path.join(ROOT, "docs", doc), encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end >= 0 else len(text)]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[index]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [ln.strip() for ln in joined.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


# Appended to each training / evaluation command of a docs recipe: the same run, a few steps
# of small batches (`shortened`).
SHORT = {"jaxt2i.train": ["--config.train.num_steps=2", "--config.train.batch_size=4",
                          "--config.train.warmup_steps=1", "--config.train.save_every=2",
                          "--config.train.log_every=1"],
         "configs/prior.py": ["--config.eval.num_scenes=4", "--config.sample.steps=4"],
         "jaxt2i.eval": ["--num_prompts=1", "--splits=held_out"]}


def shortened(cmd: str) -> str:
    """`cmd` with the `SHORT` flags of every key it contains appended (later flags win)."""
    if re.search(r"\s#", cmd):  # the flags would land inside the comment: the full-length run
        raise ValueError(f"a docs command to shorten ends in a comment (move it to the prose or a "
                         f"line of its own): {cmd}")
    extra = [f for key, flags in SHORT.items() if key in cmd for f in flags]
    return " ".join([cmd, *extra])


def workspace(tmp_path):
    """A directory where the docs' relative paths (configs/..., jaxt2i/assets/...) resolve to
    this checkout and the runs the commands write stay out of it."""
    for name in ("configs", "jaxt2i"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    return tmp_path
