"""`python -m jaxt2i.assets [--out=DIR]`: rebuild the bundled text encoder (deterministic).

Without --out it rewrites the package's own `jaxt2i/assets/text_encoder/`; with --out it
writes the same files elsewhere (to compare them with the shipped ones).
"""

import argparse

from jaxt2i.assets import build_text_encoder

if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m jaxt2i.assets",
                                description="Rebuild the bundled shapes text encoder.")
    p.add_argument("--out", default=None, help="output directory (default: the package's own)")
    print("wrote", build_text_encoder(p.parse_args().out))
