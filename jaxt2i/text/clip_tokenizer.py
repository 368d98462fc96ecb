"""A CLIP-style BPE tokenizer trained on a caption corpus (the shapes world's by default).

CLIP's tokenizer is byte-level BPE with words ending in '</w>', a start and an end-of-text
token last in the vocabulary (OpenAI's layout). A CLIP trained here on the shapes world needs
no 49k-token vocabulary: merges that join each word of the world into one token suffice,
and the byte alphabet keeps any other text readable (as pieces). The result is a
transformers `CLIPTokenizer`, so `save_clip` writes it and transformers and `load_clip` read it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

def build_clip_tokenizer(words: Iterable[str], out_dir: str | None = None):
    """A CLIP BPE tokenizer in which each of `words` is one token.

    The merges are written, not trained: for each word (sorted) the left-to-right chain that
    joins its bytes into one token (`tokenizers`' BPE trainer breaks ties between equally
    frequent pairs differently from one process to the next, and a resumed run must tokenize
    as the run it resumes). Any other text falls back to byte pieces.

    Args:
      words: lowercase words (what CLIP's pre-tokeniser splits captions into).
      out_dir: if given, the tokenizer is saved there (`save_pretrained`).

    Returns:
      A transformers `CLIPTokenizer`: 256 byte symbols, their 256 '</w>' forms, the merged
      tokens, then <|startoftext|> and <|endoftext|> (the largest id, also the pad token).
    """
    import transformers
    from tokenizers import pre_tokenizers

    byte_map = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        # The pieces the merges so far leave, joined left to right by new (lower-priority)
        # merges: words already one token keep their merges, so they stay one token.
        pieces = _apply_merges(symbols, ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks[(left, right)] = len(merges)
            merges.append((left, right))
            left += right
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for t in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]:
        vocab.setdefault(t, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def _apply_merges(symbols: list[str], ranks: dict) -> list[str]:
    """BPE: repeatedly join the leftmost adjacent pair of the lowest merge rank."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = zip(symbols, symbols[1:])
        rank, i = min((ranks.get(p, len(ranks)), i) for i, p in enumerate(pairs))
        if rank == len(ranks):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 byte values, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(
        range(ord("\u00ae"), ord("\u00ff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def shapes_corpus() -> Sequence[str]:
    """The shapes world's words (`shapes.vocabulary`: every word its caption templates use).

    Each becomes one token of the tokenizer.
    """
    from jaxt2i.data import shapes

    return shapes.vocabulary(num_captions=300)


def shapes_clip_tokenizer(out_dir: str | None = None):
    """The shapes world's CLIP tokenizer (the same on every machine: a pure function)."""
    return build_clip_tokenizer(shapes_corpus(), out_dir=out_dir)
