"""Images in and out: [-1, 1] floats <-> uint8, and PNG grids (plain, or labelled per image).

Training writes plain grids of its samples (`save_grid`); `python -m jaxt2i.sample` and
`python -m jaxt2i.eval` write grids with each prompt under its image (`labelled_grid`). Both
place cells with `_layout`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def to_uint8(x) -> np.ndarray:
    """[-1, 1] float images -> uint8."""
    import jax.numpy as jnp

    x = jnp.clip((jnp.asarray(x, jnp.float32) + 1) * 127.5 + 0.5, 0, 255)
    return np.asarray(x).astype(np.uint8)


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1]."""
    return img.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1)


def _layout(n: int, cols: int | None, cell_w: int, cell_h: int,
            pad: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Grid of `n` cells of `cell_w` x `cell_h` px, `pad` px apart and from the border.

    Args:
      n: number of cells.
      cols: cells per row (default: a square grid, ceil(sqrt(n))).
      cell_w, cell_h: cell size in px.
      pad: gap between cells and around the grid in px.

    Returns:
      ((width, height) of the grid, [(x, y) of each cell's top-left corner]).
    """
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    size = (cols * (cell_w + pad) + pad, rows * (cell_h + pad) + pad)
    origins = [(pad + q * (cell_w + pad), pad + r * (cell_h + pad))
               for r, q in (divmod(i, cols) for i in range(n))]
    return size, origins


def save_grid(images: np.ndarray, path: str, cols: int | None = None) -> np.ndarray:
    """Writes [N, H, W, C] uint8 images as one PNG grid (2 px white gaps); returns the grid."""
    from PIL import Image

    n, h, w, c = images.shape
    (gw, gh), origins = _layout(n, cols, w, h, pad=2)
    grid = np.full((gh, gw, c), 255, np.uint8)
    for img, (x0, y0) in zip(images, origins):
        grid[y0:y0 + h, x0:x0 + w] = img
    from jaxt2i import paths

    if paths.dirname(path):
        paths.makedirs(paths.dirname(path))
    with paths.local_file(path) as local:  # a URL: written here, then uploaded
        Image.fromarray(grid).save(local, format="PNG")
    return grid


def labelled_grid(images: np.ndarray, labels: Sequence[str], path: str, cols: int | None = None,
                  min_cell: int = 128) -> None:
    """Writes [N, H, W, 3] uint8 images as a PNG grid with each label under its image.

    Images smaller than `min_cell` px are upscaled (nearest neighbour) so labels fit.
    """
    from PIL import Image, ImageDraw, ImageFont

    n, h, w, _ = images.shape
    scale = max(1, -(-min_cell // w))  # nearest-neighbour upscaling of tiny images
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    chars = max(4, cw // 6)
    wrapped = ["\n".join(lab[i:i + chars] for i in range(0, max(len(lab), 1), chars))
               for lab in labels]
    text_h = 12 * max(t.count("\n") + 1 for t in wrapped) + 4
    size, origins = _layout(n, cols, cw, ch + text_h, pad=4)
    grid = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(grid)
    for img, text, (x0, y0) in zip(images, wrapped, origins):
        grid.paste(Image.fromarray(img).resize((cw, ch), Image.NEAREST), (x0, y0))
        draw.multiline_text((x0, y0 + ch + 2), text, fill="black", font=font, spacing=2)
    grid.save(path)


__all__ = ["labelled_grid", "save_grid", "to_float", "to_uint8"]


def read_image(path: str, *, what: str, mask: bool = False) -> np.ndarray:
    """One image file at its own size: [H, W, 3] uint8 RGB, or [H, W] uint8 with `mask`.

    Raises ConfigError (one line naming the file and `what`, the flag it came from) for a
    missing or unreadable file.
    """
    from PIL import Image, UnidentifiedImageError

    from jaxt2i.config import ConfigError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L" if mask else "RGB"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path!r} is a directory; give an image file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"{what} {path!r} is not an image PIL can read ({e})") from None


def read_images(paths: Sequence[str], count: int, size: int, *, what: str,
                mask: bool = False) -> np.ndarray:
    """Reads one image for all `count` images or one per image, resized to size x size.

    Args:
      paths: image files (PNG, JPEG, ... anything PIL opens).
      count: how many images the batch has (one path is repeated).
      size: side of the returned images (Lanczos resize; non-square images are stretched).
      what: the flag the paths came from, for errors (e.g. '--init_image').
      mask: read as one channel (white = 1) instead of RGB.

    Returns:
      [count, size, size, 3] uint8, or [count, size, size] float32 in [0, 1] for masks.

    Raises ConfigError (one line naming the file) for a missing or unreadable file or a wrong
    number of paths.
    """
    from PIL import Image

    from jaxt2i.config import ConfigError

    paths = list(paths)
    if len(paths) not in (1, count):
        raise ConfigError(f"{len(paths)} {what} files for {count} images; give one for all or "
                          "one per image (prompts x --num_images)")
    out = [np.asarray(Image.fromarray(read_image(p, what=what, mask=mask)).resize(
        (size, size), Image.LANCZOS)) for p in paths]
    a = np.stack(out * count if len(out) == 1 else out)
    return a.astype(np.float32) / 255.0 if mask else a
