"""The one safe way into an image: every file path, byte string and PIL image goes through :func:`load_image`.

What it guarantees, whatever the input:

- memory is bounded before any pixel is decoded: a byte cap on files (checked on the size, and the read itself
  stops at the cap), a pixel limit, and an aspect-ratio limit (a 1x60000 PNG is 200 bytes and 60,000 pixels, but
  scaling its short side to 224 px would make a 224x13.4M picture in any "resize then centre-crop" preprocessor,
  ours or a Hugging Face image processor);
- the format is known before a file is read in full (:func:`read_image_bytes` sniffs the header first);
- the result is EXIF-rotated RGB: transparency composited on white, 16-bit and float images rescaled to 8 bits
  (see :func:`to_8bit`) instead of clipped to pure white or black;
- every failure is an :class:`ImageLoadError` that names the file and what is wrong: missing file, dangling
  symlink, symlink loop, directory, empty, too big, not an image, truncated or corrupt.

With the aspect ratio capped, the intermediate picture of "resize the short side to S, then crop S x S" is at
most S x 100*S, whichever preprocessor does it: memory is bounded by the output size for every accepted input.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import Path
from typing import IO, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import CirfusionError

# Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we raise at the limit itself.
MAX_IMAGE_PIXELS = 64_000_000
# The largest file we read. A 64-megapixel RGB image is 192 MB even stored raw (BMP, uncompressed TIFF).
MAX_IMAGE_BYTES = 256 * 2**20
# Long side / short side. Real photos, panoramas and banners stay far below; past it, an image is a memory bomb
# for every preprocessor that scales the short side first (memory grows with the ratio, not the file).
MAX_ASPECT_RATIO = 100

# A path, the bytes of an image file, or an image already in memory.
ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, Image.Image]

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageLoadError(CirfusionError, OSError):
    """An image file that cannot be used. The message names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


# ---------------------------------------------------------------------------------------------- files


def check_image_file(path: str | os.PathLike[str], max_bytes: int = MAX_IMAGE_BYTES) -> int:
    """The size in bytes of the regular file ``path``, or :class:`ImageLoadError` saying why it cannot be one:
    missing, a dangling symlink (and where it points), a symlink loop, not a regular file, empty or over
    ``max_bytes``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageLoadError(path, _why_unreachable(path, exc)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(path, "is a directory, not an image file" if stat.S_ISDIR(st.st_mode) else "not a regular file")
    if st.st_size == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)")
    if st.st_size > max_bytes:
        raise ImageLoadError(path, f"file is {st.st_size:,} bytes, above the limit of {max_bytes:,} for an image")
    return st.st_size


def _why_unreachable(path: str | os.PathLike[str], exc: OSError) -> str:
    """Why ``os.stat(path)`` failed, telling a dangling symlink and a symlink loop from a missing file."""
    if exc.errno == errno.ELOOP:
        return "symlink loop (the link points back to itself through other links)"
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return f"dangling symlink: it points to {os.readlink(path)!s}, which does not exist"
        parent = Path(path).parent
        if any(os.path.islink(p) and not p.exists() for p in (parent, *parent.parents)):
            return "dangling symlink among its folders"
        return "file does not exist"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot read file ({exc.strerror or exc})"


def read_image_bytes(path: str | os.PathLike[str], max_bytes: int = MAX_IMAGE_BYTES,
                     max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
    """The bytes of an image file (to hash and then decode with ``load_image(path, data=...)``), read only after
    its header says it is an image within the pixel and aspect limits, and never more than ``max_bytes``."""
    check_image_file(path, max_bytes)
    try:
        with open(path, "rb") as f:
            _open_checked(f, path, max_pixels)  # header only: format and size (closing it would close f)
            f.seek(0)
            data = f.read(max_bytes + 1)  # the file may have grown since the stat
    except ImageLoadError:
        raise
    except OSError as exc:
        raise ImageLoadError(path, _why_unreachable(path, exc)) from None
    if len(data) > max_bytes:
        raise ImageLoadError(path, f"file is over the limit of {max_bytes:,} bytes for an image")
    return data


# ---------------------------------------------------------------------------------------------- decoding


def check_image_size(name: str | os.PathLike[str], size: tuple[int, int], max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse an empty image, one over ``max_pixels``, or one past :data:`MAX_ASPECT_RATIO`."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageLoadError(name, f"image is {w}x{h}: it has no pixels")
    if w * h > max_pixels:
        raise ImageLoadError(name, f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageLoadError(name, f"image is {w}x{h}: its aspect ratio {max(w, h) / min(w, h):,.0f}:1 is above the "
                                   f"limit of {MAX_ASPECT_RATIO}:1 (scaling its short side would need "
                                   "memory out of all proportion to the file)")


def _open_checked(fp: str | os.PathLike[str] | IO[bytes], name: str | os.PathLike[str],
                  max_pixels: int) -> Image.Image:
    """``Image.open`` (header only) with the size limits checked before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageLoadError(name, f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(name, "not a recognised image format (corrupt or not an image)") from exc
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(name, f"cannot read the image header ({exc})") from exc
    try:
        check_image_size(name, im.size, max_pixels)
    except ImageLoadError:
        im.close()
        raise
    return im


def load_image(path: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS, data: bytes | None = None, *,
               max_bytes: int = MAX_IMAGE_BYTES, name: str | None = None) -> Image.Image:
    """Decode an image fully, EXIF-rotated, in 8-bit RGB, within the limits in the module docstring.

    ``path``: a file path, the bytes of an image file, or a PIL image (not modified; the result is a new image).
    ``data``: the file's bytes when the caller already read them (the feature cache hashes and decodes the same
    bytes); ``path`` then only names the image in errors. ``name``: how errors name a bytes or PIL input.
    Raises :class:`ImageLoadError` for a missing, zero-byte, truncated, corrupt or oversized file.
    """
    if isinstance(path, Image.Image):
        label = name or "<PIL image>"
        check_image_size(label, path.size, max_pixels)
        return _finish(path, label)
    if isinstance(path, (bytes, bytearray)):
        data, path = bytes(path), name or "<image bytes>"
    label = name or str(path)
    if data is None:
        check_image_file(path, max_bytes)
        source: str | os.PathLike[str] | IO[bytes] = path
    else:
        if len(data) == 0:
            raise ImageLoadError(label, "file is empty (0 bytes)")
        if len(data) > max_bytes:
            raise ImageLoadError(label, f"file is {len(data):,} bytes, above the limit of {max_bytes:,} for an image")
        source = io.BytesIO(data)
    # Truncated files must fail loudly, never decode to a half-grey picture.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with _open_checked(source, label, max_pixels) as im:
            return _finish(im, label)
    except OSError as exc:
        if isinstance(exc, ImageLoadError):
            raise
        if data is None and not os.path.isfile(path):  # vanished or unreadable between the check and the read
            raise ImageLoadError(label, _why_unreachable(path, exc)) from None
        raise ImageLoadError(label, f"cannot decode image ({exc})") from exc


def _finish(im: Image.Image, label: str) -> Image.Image:
    """Decode, EXIF-rotate and convert to 8-bit RGB; always a new image (the input is left as it was)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
        out = ImageOps.exif_transpose(im)
        if out is None or out is im:
            out = im.copy()
        if out.mode in _WIDE_MODES:
            out = to_8bit(out, label)
        if out.mode == "RGB":
            return out
        if out.mode in _ALPHA_MODES or (out.mode == "P" and "transparency" in out.info):
            # Composite transparent images on white rather than on black garbage.
            rgba = out.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            return bg
        return out.convert("RGB")
    except ImageLoadError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageLoadError(label, f"decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(label, f"cannot decode image ({exc})") from exc


def to_8bit(im: Image.Image, label: str = "<image>") -> Image.Image:
    """A 16-bit or float grey image (``I;16*``, ``I``, ``F``) as an 8-bit ``L`` image, mapping a range to 0..255.

    Which range (Pillow's own ``convert`` clips instead, so such images came out pure white or black):

    - ``I;16*``: 0..65535, the mode's own range, so a dark 16-bit photo stays dark;
    - ``I`` and ``F`` have no range of their own (Pillow opens 16-bit PNG/TIFF/PGM files as ``I``, NumPy arrays
      of any scale become ``I`` or ``F``): the smallest standard range that holds every value, out of 0..1
      (``F`` only), 0..255 and 0..65535, so brightness keeps its meaning; when none does (depth maps, signed
      data), the image's own min..max.

    A float image with NaN or infinite values is refused rather than guessed at.
    """
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ImageLoadError(label, f"{im.mode} image holds NaN or infinite values")
        vmin, vmax = float(a.min()), float(a.max())
        ranges = ((0.0, 1.0),) if im.mode == "F" else ()
        lo, hi = next(((lo, hi) for lo, hi in (*ranges, (0.0, 255.0), (0.0, 65535.0)) if lo <= vmin and vmax <= hi),
                      (vmin, vmax))
    if hi <= lo:  # a constant image outside every standard range
        return Image.new("L", im.size, 0)
    scaled = np.clip((a.astype(np.float64) - lo) * (255.0 / (hi - lo)), 0, 255)
    out = Image.fromarray(np.rint(scaled).astype(np.uint8), "L")
    out.info.update(im.info)
    return out
