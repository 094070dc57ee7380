"""Safe image loading: EXIF orientation, RGB, a decompression-bomb limit, clear errors for bad files."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import CirfusionError

# Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we raise at the limit itself.
MAX_IMAGE_PIXELS = 64_000_000


class ImageLoadError(CirfusionError, OSError):
    """An image file that cannot be used. The message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, data: bytes | None = None) -> Image.Image:
    """Open an image fully decoded, EXIF-rotated, in RGB.

    ``data``: the file's bytes when the caller already read them (the feature cache hashes and decodes the same
    bytes); ``path`` then only names the image in errors.
    Raises :class:`ImageLoadError` for a missing, zero-byte, truncated, corrupt or oversized file.
    """
    p = Path(path)
    if data is None and not p.is_file():
        raise ImageLoadError(p, "file does not exist")
    if (len(data) if data is not None else p.stat().st_size) == 0:
        raise ImageLoadError(p, "file is empty (0 bytes)")
    # Truncated files must fail loudly, never decode to a half-grey picture.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p if data is None else io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageLoadError(p, f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode != "RGB":
                    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                        # Composite transparent images on white rather than on black garbage.
                        rgba = im.convert("RGBA")
                        bg = Image.new("RGB", rgba.size, (255, 255, 255))
                        bg.paste(rgba, mask=rgba.getchannel("A"))
                        im = bg
                    else:
                        im = im.convert("RGB")
                return im.copy()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageLoadError(p, f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(p, "not a recognised image format (corrupt or not an image)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(p, f"cannot decode image ({exc})") from exc
