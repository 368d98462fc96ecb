"""Fixed-length tokenization for the frozen text encoder.

The tokenizer itself is transformers' (`AutoTokenizer`), loaded from a local directory; the
network is touched only when the user names a hub id. SentencePiece vocabularies (T5, mT5,
umT5) come with their model file; ByT5's byte tokenizer needs none (`is_byte_level`); CLIP's BPE
comes as vocab.json + merges.txt or tokenizer.json. This wrapper pads / truncates every prompt
to the encoder's fixed text length and returns the mask, reporting truncation once. An empty
prompt is valid: it is the unconditional prompt of classifier-free guidance (just `</s>`).

Text the tokenizer maps to `<unk>` (characters outside its vocabulary) is never silent: for a
closed-vocabulary tokenizer (the bundled demo encoder's) it is an `UnknownTextError`, for any
other (a real T5 SentencePiece vocabulary) a warning naming the prompt and the characters.
"""

from __future__ import annotations

import json
import logging
import functools
import os
import re
import string
from typing import Sequence

import numpy as np

log = logging.getLogger("jaxt2i")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files one of which a tokenizer directory has (fast tokenizers, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model",
                   "vocab.json", "vocab.txt")
CLOSED_VOCABULARY_KEY = "jaxt2i_closed_vocabulary"  # config.json flag of a closed vocabulary
_MAX_UNKNOWN_WARNINGS = 10


_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")


def demo_vocabulary_hint(prompt: str, reads_chinese: bool = True) -> str:
    """What the bundled demo can draw and how to go further, with an example prompt in the
    prompt's language (Chinese when it has Han characters): the tail of the one-line error for
    text its closed vocabulary does not know. `reads_chinese`: the closed vocabulary has the
    shapes world's Chinese words (today's bundled encoder; not an English-only copy of it)."""
    if not reads_chinese:  # the English-only bundled encoder (copied into older exports)
        if _HAN.search(prompt):
            return ("the bundled demo encoder knows only the shapes-world English vocabulary: "
                    "the demo draws coloured shapes on plain backgrounds from English prompts "
                    "such as 'a red circle above a blue square' and cannot read Chinese yet (the "
                    "shapes world's Chinese captions, e.g. '一个红色的圆形在一个蓝色的正方形上面', "
                    "need a model trained on them); for other prompts sample a real model "
                    "(--checkpoint=DIR), for Chinese one trained with a multilingual text "
                    "encoder: mT5, umT5 or ByT5 (see docs/text-encoder.md)")
        return ("the bundled demo encoder knows only the shapes-world English vocabulary: the "
                "demo draws coloured shapes on plain backgrounds, so write the prompt in plain "
                "English, e.g. 'a red circle above a blue square' or 'two green triangles'; for "
                "other prompts sample a real model (--checkpoint=DIR, see docs/text-encoder.md)")
    if _HAN.search(prompt):
        return ("the bundled demo encoder knows only the shapes world's words: the demo draws "
                "coloured shapes on plain backgrounds, from Chinese prompts such as "
                "'一个红色的圆形在一个蓝色的正方形上面' or '白色背景上的两个绿色的三角形' (or "
                "English ones); for other prompts sample a real model (--checkpoint=DIR) with "
                "a multilingual text encoder: mT5, umT5 or ByT5 (see docs/text-encoder.md)")
    return ("the bundled demo encoder knows only the shapes world's words: the demo draws "
            "coloured shapes on plain backgrounds, so write the prompt in plain English, e.g. "
            "'a red circle above a blue square' or 'two green triangles' (or in Chinese, e.g. "
            "'两个绿色的三角形'); for other prompts sample a real model (--checkpoint=DIR, see "
            "docs/text-encoder.md)")


class UnknownTextError(ValueError):
    """A prompt has text a closed-vocabulary tokenizer cannot represent (one-line message)."""


def _short(prompt: str, limit: int = 60) -> str:
    return prompt if len(prompt) <= limit else prompt[:limit] + "..."


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
      closed_vocabulary: text mapped to <unk>, and words that are not one token of the
        vocabulary, raise `UnknownTextError` (the bundled demo encoder's tokenizer) instead of a
        warning.
    """

    def __init__(self, hf_tokenizer, max_length: int, closed_vocabulary: bool = False):
        if max_length < 2:
            raise ValueError(f"text max_length must be at least 2 (one token + </s>), got {max_length}")
        if hf_tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; T5 tokenizers use <pad> (id 0)")
        self.hf = hf_tokenizer
        self.max_length = int(max_length)
        self.closed_vocabulary = bool(closed_vocabulary)
        self._warned = False
        self._unknown_warned: set[str] = set()  # prompts already named in a warning
        self._known_words: dict[str, bool] = {}  # closed vocabulary: word -> one token

    @functools.cached_property
    def reads_chinese(self) -> bool:
        """The vocabulary has Chinese words (the bundled encoder's closed vocabulary does)."""
        return any(_HAN.search(p) for p in self.hf.get_vocab())

    def unknown_text(self, prompt: str) -> tuple[list[str], list[str]]:
        """(characters, words) of `prompt` that the tokenizer maps to <unk>, each once, in order.

        A word is a whitespace-separated part of the prompt; a character is listed when it alone
        tokenizes to <unk>.
        """
        unk = self.hf.unk_token_id
        if unk is None:
            return [], []

        def bad(parts):
            if not parts:
                return []
            ids = self.hf(parts, add_special_tokens=False)["input_ids"]
            return [p for p, i in zip(parts, ids) if unk in i]

        return (bad(list(dict.fromkeys(c for c in prompt if not c.isspace()))),
                bad(list(dict.fromkeys(prompt.split()))))

    def _describe_unknown(self, prompt: str) -> str:
        chars, words = self.unknown_text(prompt)
        shown = ", ".join(repr(c) for c in chars[:12]) + (", ..." if len(chars) > 12 else "")
        if not chars:  # only in context (e.g. after normalisation): name the words
            shown = ", ".join(repr(_short(w, 20)) for w in words[:6]) or "some of its text"
        elif words and words != [prompt.strip()]:
            shown += " (in " + ", ".join(repr(_short(w, 20)) for w in words[:6]) + (
                ", ...)" if len(words) > 6 else ")")
        return f"prompt {_short(prompt)!r} has text the tokenizer does not know: {shown}"

    def check_unknown(self, prompts: Sequence[str], ids: np.ndarray, mask: np.ndarray) -> None:
        """Raises `UnknownTextError` (closed vocabulary) or warns for prompts with <unk> tokens.

        Args:
          prompts: the B prompts; ids: their [B, L] tokenization; mask: [B, L] the positions
            of the prompts' own text (padding and added special tokens excluded).
        """
        unk = self.hf.unk_token_id
        if unk is None:
            return
        rows = np.flatnonzero(((ids == unk) & mask).any(axis=1))
        if not rows.size and self.closed_vocabulary:
            self._check_words(prompts)
        if not rows.size:
            return
        first = prompts[rows[0]]
        more = f" (and {rows.size - 1} more prompt(s))" if rows.size > 1 else ""
        if self.closed_vocabulary:
            raise UnknownTextError(f"{self._describe_unknown(first)}{more}; "
                                   f"{demo_vocabulary_hint(first, self.reads_chinese)}")
        if len(self._unknown_warned) >= _MAX_UNKNOWN_WARNINGS:
            return
        fresh = [prompts[i] for i in rows if prompts[i] not in self._unknown_warned]
        if not fresh:
            return
        self._unknown_warned.add(fresh[0])
        last = (f"; no further prompts with unknown text are reported (this is the "
                f"{_MAX_UNKNOWN_WARNINGS}th)" if len(self._unknown_warned) == _MAX_UNKNOWN_WARNINGS
                else "")
        log.warning("%s%s; the tokenizer encodes it as <unk>, so the model cannot tell such "
                    "text apart%s", self._describe_unknown(fresh[0]), more, last)

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` (runs of letters and digits) that are not one token of the
        vocabulary, each once, in order: a closed vocabulary can spell 'cat' out of pieces, but
        the model never saw the word. Chinese text has no spaces to find words by: it is
        known when every character is in a vocabulary word (no <unk>)."""
        out = []
        for w in dict.fromkeys(re.findall(r"\w+", _HAN.sub(" ", prompt))):
            if w not in self._known_words:
                self._known_words[w] = len(self.hf.tokenize(w)) == 1
            if not self._known_words[w]:
                out.append(w)
        return out

    def _check_words(self, prompts: Sequence[str]) -> None:
        """Raises `UnknownTextError` for the first prompt with a word outside the vocabulary."""
        bad = [(p, w) for p in prompts for w in [self.unknown_words(p)] if w]
        if bad:
            (first, words), more = bad[0], len(bad) - 1
            shown = ", ".join(repr(_short(w, 20)) for w in words[:6]) + (
                ", ..." if len(words) > 6 else "")
            raise UnknownTextError(
                f"prompt {_short(first)!r} has words the tokenizer does not know: {shown}"
                f"{f' (and {more} more prompt(s))' if more else ''}; "
                f"{demo_vocabulary_hint(first, self.reads_chinese)}")

    def lengths(self, prompts: Sequence[str]) -> list[int]:
        """Untruncated token counts (including </s>) of each prompt: what `max_length` bounds.

        For a byte-level (ByT5) tokenizer a token is a UTF-8 byte: an ASCII letter is 1, a
        Chinese character 3, most emoji 4.
        """
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
                      add_special_tokens=True, return_special_tokens_mask=True,
                      return_tensors="np")
        ids = enc["input_ids"].astype(np.int32)
        mask = enc["attention_mask"].astype(bool)
        # Only the prompt's own text can be unknown: CLIP's <unk> is its end-of-text token.
        self.check_unknown(prompts, ids, mask & ~enc["special_tokens_mask"].astype(bool))
        if not self._warned and mask[:, -1].any():
            long = [(p, n) for p, n in zip(prompts, self.lengths(prompts)) if n > self.max_length]
            if long:
                self._warned = True
                log.warning(
                    "%d prompt(s) longer than the text length %d were truncated (e.g. %d tokens: "
                    "%r); raise the text max_length to keep them whole (reported once)",
                    len(long), self.max_length, long[0][1], long[0][0][:80])
        return ids, mask


BYTE_TOKENIZER = "ByT5Tokenizer"  # transformers' byte-level tokenizer: no vocabulary file


def is_byte_level(model_dir: str) -> bool:
    """True when a directory's tokenizer is ByT5's byte tokenizer (named by `tokenizer_class`
    in tokenizer_config.json or, as on the hub's google/byt5-*, in config.json).

    Its ids are the UTF-8 bytes of the prompt plus 3 (<pad>=0, </s>=1, <unk>=2 come first), so
    it needs no vocabulary file, and its lengths count bytes: a Chinese character is 3.
    """
    for name in ("tokenizer_config.json", "config.json"):
        f = os.path.join(model_dir, name)
        if os.path.exists(f):
            try:
                with open(f, encoding="utf-8") as fh:
                    cls = json.load(fh).get("tokenizer_class")
            except (OSError, ValueError, AttributeError):
                continue
            if cls:
                return cls == BYTE_TOKENIZER
    return False


def load_tokenizer(path: str, max_length: int,
                   closed_vocabulary: bool | None = None) -> Tokenizer:
    """Loads a transformers tokenizer from a local directory (or an explicit hub id).

    Args:
      path: the directory (a hub id downloads).
      max_length: fixed text length L.
      closed_vocabulary: unknown text is an error rather than a warning; default: the
        `jaxt2i_closed_vocabulary` flag of the directory's config.json (the bundled encoder's).

    Raises FileNotFoundError (one line) when the directory has no tokenizer files: transformers
    would build an empty T5 tokenizer there that maps every word to <unk>. A ByT5 directory
    needs none: its `tokenizer_class` (`is_byte_level`) is enough.
    """
    from transformers import AutoTokenizer

    local = os.path.isdir(path)
    d = path if local else resolve_model_dir(path, allow_patterns=["*.json", "*.model", "*.txt"])
    files = set(os.listdir(d))
    if (not files & set(TOKENIZER_FILES) and not any(f.endswith(".model") for f in files)
            and not is_byte_level(d)):
        raise FileNotFoundError(
            f"no tokenizer files in {path!r} (none of {', '.join(TOKENIZER_FILES)}); copy this "
            "encoder's tokenizer there (tokenizer.save_pretrained(dir)) or pass tokenizer=DIR")
    try:
        hf = AutoTokenizer.from_pretrained(d, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"no usable tokenizer in {path!r} ({str(e).splitlines()[0]}); save one there with "
            "tokenizer.save_pretrained(dir), or pass tokenizer=DIR") from None
    if closed_vocabulary is None:
        cfg = os.path.join(d, "config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                closed_vocabulary = bool(json.load(f).get(CLOSED_VOCABULARY_KEY, False))
    return Tokenizer(hf, max_length, closed_vocabulary=bool(closed_vocabulary))


def build_word_tokenizer(words: Sequence[str], out_dir: str | None = None,
                         unspaced_words: Sequence[str] = ()):
    """A T5-style (Unigram, SentencePiece conventions) tokenizer for a closed vocabulary.

    Each word of `words` is one token; other words of ASCII letters, digits and punctuation fall
    back to single characters. Any other character is <unk>, which a `Tokenizer` with
    `closed_vocabulary=True` refuses. Ids follow T5: <pad>=0, </s>=1, <unk>=2.

    Args:
      words: the whole-word vocabulary.
      out_dir: if given, the tokenizer is saved there (`save_pretrained`).
      unspaced_words: words of a language written without spaces (Chinese): one token each,
        found inside a run of text by the fewest pieces; their ids come after every other
        token's, so adding them changes no id of a tokenizer built without them.

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
    for w in unspaced_words:
        if w not in seen:
            vocab.append((w, -1.0))
            seen.add(w)
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok
