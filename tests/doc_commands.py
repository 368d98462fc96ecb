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
