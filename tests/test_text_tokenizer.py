"""Unknown text, missing and mismatched tokenizers (issue #23): never silent.

Tokenizers are built in the test (transformers' T5Tokenizer from a word list, a Unigram trained
with the `tokenizers` library); nothing is downloaded.
"""

import json
import logging
import os
import shutil
import string

import numpy as np
import pytest

from jaxt2i import assets
from jaxt2i.text import get_t5_config, init_encoder, load_encoder, load_tokenizer, save_encoder
from jaxt2i.text.tokenizer import Tokenizer, UnknownTextError, build_word_tokenizer

WORDS = ["a", "red", "blue", "circle", "square", "above"]
KNOWN_CHARS = set(string.ascii_letters + string.digits + string.punctuation + " ")
CORPUS = ["a photo of a cat sitting on a wooden table", "large text encoders understand prompts",
          "three yellow stars left of an orange hexagon", "un cercle rouge au-dessus d'un carré"]


def _unknown(prompt):
    """The reference: characters outside a word tokenizer's alphabet, each once, in order."""
    return list(dict.fromkeys(c for c in prompt if c not in KNOWN_CHARS))


@pytest.fixture(scope="module")
def closed():
    return Tokenizer(build_word_tokenizer(WORDS), 64, closed_vocabulary=True)


def _unigram(specials=("<pad>", "</s>", "<unk>")):
    """A small Unigram tokenizer trained here (T5 ids by default: <pad>=0, </s>=1, <unk>=2)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = RustTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 20, trainers.UnigramTrainer(
        vocab_size=60, special_tokens=list(specials), unk_token="<unk>"))
    tok.post_processor = TemplateProcessing(single="$A </s>",
                                            special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("prompt", ["一只可爱的猫", "🐱🔴", "a red café",
                                    "naïve résumé above a square"])
def test_closed_vocabulary_refuses_unknown_characters(closed, prompt):
    with pytest.raises(UnknownTextError) as e:
        closed([prompt])
    msg = str(e.value)
    assert "\n" not in msg and repr(prompt) in msg
    assert "the bundled demo encoder knows only the shapes-world English vocabulary" in msg
    # what the demo draws, with an example in the prompt's language, and the way further
    assert "the demo draws coloured shapes on plain backgrounds" in msg
    assert "'a red circle above a blue square'" in msg and "--checkpoint=DIR" in msg
    chinese = "一个红色的圆形在一个蓝色的正方形上面"
    assert (chinese in msg) == ("猫" in prompt) and ("cannot read Chinese yet" in msg) == (
        "猫" in prompt)
    if "猫" in prompt:
        assert "mT5, umT5 or ByT5 (see docs/text-encoder.md)" in msg
    chars, _ = closed.unknown_text(prompt)
    assert chars == _unknown(prompt) and chars
    for c in chars:
        assert repr(c) in msg
    if " " in prompt:  # the words they are in are named too
        assert all(repr(w) in msg for w in prompt.split() if set(w) & set(chars))


def test_closed_vocabulary_accepts_known_text_and_shortens_long_prompts(closed):
    ids, mask = closed(["a red circle above a blue square", "", "a blue square, above."])
    assert (ids[mask] != closed.hf.unk_token_id).all()
    long = "a red circle " * 10 + "猫"
    with pytest.raises(UnknownTextError) as e:
        closed(["a red circle", long, "🐱"])
    msg = str(e.value)
    assert repr(long[:60] + "...") in msg and long not in msg and "'猫'" in msg
    assert "(and 1 more prompt(s))" in msg


@pytest.mark.parametrize("prompt, words", [("a cat", "'cat'"),
                                           ("a green star above a red circle", "'green', 'star'")])
def test_closed_vocabulary_refuses_words_it_can_only_spell(closed, prompt, words):
    """'cat' has no <unk> (its letters are tokens) but the demo never saw the word: refused."""
    with pytest.raises(UnknownTextError) as e:
        closed(["a red circle", prompt])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"prompt {prompt!r} has words the tokenizer does not know: {words};")
    assert "'a red circle above a blue square'" in msg and "--checkpoint=DIR" in msg
    assert closed.unknown_words(prompt + ", a blue square.") == eval(f"[{words}]")


def test_other_tokenizers_warn_naming_the_prompt_once(caplog):
    tok = Tokenizer(_unigram(), 16)
    prompt = "一只猫 on a table"
    with caplog.at_level(logging.WARNING, logger="jaxt2i"):
        ids, mask = tok([prompt, "a cat"])
        tok([prompt])
    warnings = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert repr(prompt) in warnings[0] and "'一', '只', '猫' (in '一只猫')" in warnings[0]
    assert (ids[0] == tok.hf.unk_token_id).any()  # still encoded (as <unk>)
    assert not (ids[1][mask[1]] == tok.hf.unk_token_id).any()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxt2i"):
        for i in range(12):  # bounded: a dataset full of unknown text does not flood the log
            tok([f"{i} 猫"])
    warnings = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert len(warnings) == 9 and "no further prompts" in warnings[-1]


def test_the_bundled_encoder_is_closed_and_an_export_copy_keeps_it(tmp_path):
    enc = load_encoder(assets.text_encoder_dir())
    assert enc.tokenizer.closed_vocabulary
    with pytest.raises(UnknownTextError, match=r"know: '只', '可', '爱', '猫';"):
        enc.encode(["一只可爱的猫"])  # 一 and 的 are shapes words (issue #28)
    save_encoder(enc, str(tmp_path / "copy"))  # what the exports ship as text_encoder/
    assert load_tokenizer(str(tmp_path / "copy"), 8).closed_vocabulary
    with pytest.raises(UnknownTextError):
        load_encoder(str(tmp_path / "copy")).encode(["🐱🔴"])


def test_missing_tokenizer_files_are_one_error(tmp_path):
    d = tmp_path / "no_tokenizer"
    d.mkdir()
    src = assets.text_encoder_dir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(src, f), d / f)
    for load in (lambda: load_tokenizer(str(d), 8), lambda: load_encoder(str(d))):
        with pytest.raises(FileNotFoundError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and "no tokenizer files" in msg and str(d) in msg
        assert "tokenizer.json" in msg and "tokenizer=DIR" in msg


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    """A tiny T5 (72-row embedding table) saved with its own ~55-token Unigram tokenizer."""
    root = tmp_path_factory.mktemp("tiny_t5")
    enc = init_encoder(get_t5_config("tiny", vocab_size=72), Tokenizer(_unigram(), 8))
    save_encoder(enc, str(root / "fits"))
    return root / "fits"


def test_a_tokenizer_that_does_not_fit_the_encoder_is_one_error(tiny_encoder_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    fits = tiny_encoder_dir
    assert len(load_encoder(str(fits)).tokenizer.hf) <= 72
    big = tmp_path / "big"  # the same model with a 4096-row table: a 55-token tokenizer is foreign
    shutil.copytree(fits, big)
    cfg = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps(dict(cfg, vocab_size=4096)))
    tensors = load_file(str(big / "model.safetensors"))
    tensors["shared.weight"] = np.zeros((4096, cfg["d_model"]), np.float32)
    save_file(tensors, str(big / "model.safetensors"), metadata={"format": "pt"})
    shuffled = tmp_path / "shuffled_ids"  # <pad> and </s> at other ids
    _unigram(specials=("<unk>", "<pad>", "</s>")).save_pretrained(str(shuffled))
    for path, kwargs, expected in [
            (fits, {"tokenizer": assets.text_encoder_dir()},
             "tokenizer has 338 tokens but the encoder's embedding table has vocab_size 72 rows"),
            (big, {}, "tokenizer has only [0-9]+ tokens for the encoder's vocab_size of 4096"),
            (fits, {"tokenizer": str(shuffled)},
             "tokenizer's pad_token_id is 1 but the encoder's config.json says 0")]:
        with pytest.raises(ValueError, match=expected) as e:
            load_encoder(str(path), **kwargs)
        assert "\n" not in str(e.value) and "is not this encoder's" in str(e.value)


def test_encode_cli_refuses_unknown_text_in_one_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "emb.safetensors"
    r = subprocess.run([sys.executable, "-m", "jaxt2i.encode", "--prompt", "a red circle",
                        "--prompt", "🐱🔴", f"--out={out}"], cwd=root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith("error: prompt '🐱🔴'") and "'🐱', '🔴'" in lines[0]
    assert not out.exists()
