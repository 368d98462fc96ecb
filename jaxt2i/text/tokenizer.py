"""Fixed-length tokenization for the frozen text encoder.

The tokenizer itself is transformers' (`AutoTokenizer`), loaded from a local directory; the
network is touched only when the user names a hub id. This wrapper pads / truncates every prompt
to the encoder's fixed text length and returns the mask, reporting truncation once. An empty
prompt is valid: it is the unconditional prompt of classifier-free guidance (just `</s>`).
"""

from __future__ import annotations

import logging
import os
import re
import string
from typing import Sequence

import numpy as np

log = logging.getLogger("jaxt2i")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """True when `path` is not a local path but looks like 'org/name' on the Hugging Face hub."""
    return not os.path.exists(path) and bool(_HUB_ID.match(path))


def resolve_model_dir(path: str, allow_patterns: Sequence[str] | None = None) -> str:
    """Returns a local directory for `path`, downloading only when it is an explicit hub id."""
    if os.path.isdir(path):
        return path
    if is_hub_id(path):
        from huggingface_hub import snapshot_download  # network: only on explicit request

        log.info("downloading %s from the Hugging Face hub", path)
        return snapshot_download(path, allow_patterns=list(allow_patterns) if allow_patterns else None)
    raise FileNotFoundError(
        f"text encoder {path!r} is not a directory; pass a local Hugging Face model directory "
        "(config.json + model.safetensors + tokenizer files) or a hub id such as google/flan-t5-xxl")


class Tokenizer:
    """Pads/truncates prompts to `max_length` token ids plus a mask.

    Attributes:
      hf: the underlying transformers tokenizer.
      max_length: fixed text length L.
    """

    def __init__(self, hf_tokenizer, max_length: int):
        if max_length < 2:
            raise ValueError(f"text max_length must be at least 2 (one token + </s>), got {max_length}")
        if hf_tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; T5 tokenizers use <pad> (id 0)")
        self.hf = hf_tokenizer
        self.max_length = int(max_length)
        self._warned = False

    def lengths(self, prompts: Sequence[str]) -> list[int]:
        """Untruncated token counts (including </s>) of each prompt."""
        return [len(ids) for ids in self.hf(list(prompts), add_special_tokens=True)["input_ids"]]

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes a batch.

        Args:
          prompts: list of strings ('' is the unconditional prompt).

        Returns:
          (ids [B, L] int32, mask [B, L] bool).
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt]")
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is {type(p).__name__} ({p!r}), not a string")
        if not prompts:
            raise ValueError("no prompts given")
        enc = self.hf(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                      add_special_tokens=True, return_tensors="np")
        ids = enc["input_ids"].astype(np.int32)
        mask = enc["attention_mask"].astype(bool)
        if not self._warned and mask[:, -1].any():
            long = [(p, n) for p, n in zip(prompts, self.lengths(prompts)) if n > self.max_length]
            if long:
                self._warned = True
                log.warning(
                    "%d prompt(s) longer than the text length %d were truncated (e.g. %d tokens: "
                    "%r); raise the text max_length to keep them whole (reported once)",
                    len(long), self.max_length, long[0][1], long[0][0][:80])
        return ids, mask


def load_tokenizer(path: str, max_length: int) -> Tokenizer:
    """Loads a transformers tokenizer from a local directory (or an explicit hub id)."""
    from transformers import AutoTokenizer

    local = os.path.isdir(path)
    try:
        hf = AutoTokenizer.from_pretrained(resolve_model_dir(path) if not local else path,
                                           local_files_only=local)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"no usable tokenizer in {path!r} ({str(e).splitlines()[0]}); save one there with "
            "tokenizer.save_pretrained(dir), or pass tokenizer=DIR") from None
    return Tokenizer(hf, max_length)


def build_word_tokenizer(words: Sequence[str], out_dir: str | None = None):
    """A T5-style (Unigram, SentencePiece conventions) tokenizer for a closed vocabulary.

    Each word of `words` is one token; any other text falls back to single characters, so no
    prompt maps to <unk> silently. Ids follow T5: <pad>=0, </s>=1, <unk>=2.

    Args:
      words: the whole-word vocabulary.
      out_dir: if given, the tokenizer is saved there (`save_pretrained`).

    Returns:
      The transformers tokenizer.
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    seen = {v for v, _ in vocab}
    for w in sorted(set(words)):
        piece = "\u2581" + w
        if piece not in seen:
            vocab.append((piece, -1.0))
            seen.add(piece)
    for c in string.ascii_letters + string.digits + string.punctuation:
        for piece in (c, "\u2581" + c):
            if piece not in seen:
                vocab.append((piece, -8.0))
                seen.add(piece)
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok
