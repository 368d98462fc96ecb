"""A CLIP-style BPE tokenizer trained on a caption corpus (the shapes world's by default).

CLIP's tokenizer is byte-level BPE with words ending in '</w>', a start and an end-of-text
token last in the vocabulary (OpenAI's layout). A CLIP trained here on the shapes world needs
no 49k-token vocabulary: BPE trained on its captions makes every word of the world one token,
and the byte alphabet keeps any other text readable (as pieces). The result is a
transformers `CLIPTokenizer`, so `save_clip` writes it and transformers and `load_clip` read it.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

# Enough merges for every shapes-world word to become one token (training stops earlier when
# no pair is left to merge).
DEFAULT_MERGES_LIMIT = 1000


def build_clip_tokenizer(corpus: Iterable[str], vocab_size: int = DEFAULT_MERGES_LIMIT,
                         out_dir: str | None = None):
    """Trains a CLIP BPE tokenizer on `corpus`.

    Args:
      corpus: caption strings.
      vocab_size: the BPE trainer's target size (the byte alphabet counts towards it).
      out_dir: if given, the tokenizer is saved there (`save_pretrained`).

    Returns:
      A transformers `CLIPTokenizer`: 256 byte symbols, their 256 '</w>' forms, the merged
      tokens, then <|startoftext|> and <|endoftext|> (the largest id, also the pad token).
    """
    import tokenizers
    import transformers
    from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers

    bpe = tokenizers.Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence([  # CLIP's word pattern, then bytes
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.train_from_iterator(list(corpus), trainers.BpeTrainer(
        vocab_size=vocab_size, end_of_word_suffix="</w>", show_progress=False))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
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


def shapes_corpus() -> Sequence[str]:
    """The shapes world's words (`shapes.vocabulary`: every word its caption templates use).

    BPE over the word list makes each of them one token; word frequencies would change only
    the order of the merges, not the tokens.
    """
    from jaxt2i.data import shapes

    return shapes.vocabulary(num_captions=300)


def shapes_clip_tokenizer(out_dir: str | None = None):
    """The shapes world's CLIP tokenizer (the same on every machine: a pure function)."""
    return build_clip_tokenizer(shapes_corpus(), out_dir=out_dir)
