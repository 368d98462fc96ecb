"""Tiny multilingual encoders made in a test: a `tokenizers` Unigram (umT5's hub format) trained
on the test's own text, and random tiny mT5 / umT5 models saved with it as a Hugging Face
directory. Shared by tests/test_text_multilingual.py (parity against transformers) and
tests/test_train_multilingual.py (the training docs' commands)."""

import torch
import transformers


def small_config(cfg_cls, **kw):
    """A tiny transformers config (3 layers, width 32, 16 buckets up to distance 20)."""
    return cfg_cls(d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                   relative_attention_num_buckets=16, relative_attention_max_distance=20,
                   dropout_rate=0.0, decoder_start_token_id=0, **kw)


def unigram_tokenizer(corpus, vocab_size=150):
    """A `tokenizers` Unigram (tokenizer.json) trained on `corpus` (a list of texts), with
    <pad>=0, </s>=1, <unk>=2 and </s> appended, as umT5's."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    tok = RustTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = TemplateProcessing(single="$A </s>",
                                            special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return tok


def save_unigram_tokenizer(raw, out):
    """Writes the Unigram `raw` to directory `out` as transformers' fast tokenizer files."""
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>",
                                                eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out))
    return out


def save_with_tokenizer(model, tok_dir, out, **kw):
    """Saves `model` to `out` with the tokenizer of directory `tok_dir` beside it."""
    model.save_pretrained(str(out), **kw)
    transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True) \
        .save_pretrained(str(out))
    return out


def umt5(vocab, cls=None):
    """A random tiny umT5 encoder (or `cls`, e.g. UMT5ForConditionalGeneration), seed 0."""
    torch.manual_seed(0)
    cfg = small_config(transformers.UMT5Config, vocab_size=vocab, feed_forward_proj="gated-gelu")
    return (cls or transformers.UMT5EncoderModel)(cfg).eval()
