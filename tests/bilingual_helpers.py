"""The bundled text encoder as it was before it had Chinese words (issue #28): the reference
English encodings are checked against, and the encoder older exports carry a copy of."""

from jaxt2i import assets
from jaxt2i.text import get_t5_config, init_encoder, save_encoder
from jaxt2i.text.tokenizer import Tokenizer, build_word_tokenizer


def english_only_encoder(out_dir=None):
    """That encoder (saved to `out_dir` when given)."""
    tok = Tokenizer(build_word_tokenizer(assets.vocabulary()), assets.TEXT_MAX_LENGTH,
                    closed_vocabulary=True)
    enc = init_encoder(get_t5_config("shapes"), tok, seed=assets.TEXT_SEED)
    if out_dir is not None:
        save_encoder(enc, str(out_dir))
    return enc
