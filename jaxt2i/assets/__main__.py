"""`python -m jaxt2i.assets`: rebuild the bundled text encoder (deterministic)."""

from jaxt2i.assets import build_text_encoder

if __name__ == "__main__":
    print("wrote", build_text_encoder())
