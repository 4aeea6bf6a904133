"""Reading an image file as 8-bit RGB with its values kept, whatever its PIL mode, or refusing it
in one line; and the cheap check of a file that runs before training (exists, header decodes)."""
from __future__ import annotations

import os
from typing import Optional

from ..errors import TokenTuneError

#: colour shown under transparent pixels (RGBA, LA, PA, and palette/grey/RGB images with a
#: transparency key): white, what an image viewer or a web page shows them on
ALPHA_BACKGROUND = (255, 255, 255)
_PIL_TO_RGB = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")   # PIL's own conversion is right
_ALPHA = ("RGBA", "RGBa", "LA", "PA")
_GREY16 = ("I;16", "I;16L", "I;16B", "I;16N")
#: PIL modes :func:`to_rgb` converts; any other (LAB, La, ...) is refused
SUPPORTED_MODES = _PIL_TO_RGB + _ALPHA + _GREY16 + ("I", "F")


def _unsupported(mode: str) -> TokenTuneError:
    return TokenTuneError(f"image mode {mode} is not supported (supported: {', '.join(SUPPORTED_MODES)}); "
                          "convert the image to 8-bit RGB")


def _grey16_to_8(img):
    """16-bit grey -> 8 bits by the high byte (v >> 8), as PIL reads 16-bit RGB(A) PNGs."""
    import numpy as np

    values = np.asarray(img)
    if img.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise TokenTuneError(f"32-bit integer image (mode I) with values from {values.min()} to {values.max()}, "
                             "outside the 16-bit range 0..65535 that tokentune reads; save it with 8 or 16 bits")
    return (values >> 8).astype(np.uint8)


def _float_to_8(img):
    """Float grey in [0, 1] -> 8 bits (x 255, rounded); other values have no fixed meaning: refused."""
    import numpy as np

    values = np.asarray(img, dtype=np.float64)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
        raise TokenTuneError(f"float image (mode F) with values from {np.nanmin(values):g} to {np.nanmax(values):g}, "
                             "not within [0, 1]; scale it to [0, 1] or save it with 8 or 16 bits")
    return np.round(values * 255.0).astype(np.uint8)


def _on_background(img):
    from PIL import Image

    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def to_rgb(img):
    """An upright 8-bit RGB copy of the PIL image ``img`` that keeps what its pixels mean.

    ``img.convert("RGB")`` alone clips 16-bit and float values to 0..255 (a 16-bit scan becomes
    almost black and white) and drops alpha, so each kind of image has its rule:

    * EXIF orientation is applied first (``ImageOps.exif_transpose``): photos come upright;
    * ``1``, ``L``, ``P``, ``RGBX``, ``YCbCr`` (JPEG's full-range BT.601), ``HSV`` and ``CMYK``
      (no ICC profile: R = (255 - C)(255 - K) / 255, likewise G, B): PIL's conversion;
    * 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, and mode ``I`` with values in
      0..65535, which is how PIL opens some 16-bit PNG/TIFF files): the high byte, ``v >> 8``,
      the same scaling PIL applies to 16-bit RGB(A) PNGs, which it opens as 8-bit RGB/RGBA;
      ``I`` values outside 0..65535 have no fixed range and are refused;
    * float (``F``): values in [0, 1] become ``round(255 v)``; any other range is refused (a
      per-image min-max stretch would change the brightness from image to image);
    * transparency (``RGBA``, ``RGBa``, ``LA``, ``PA``, and ``P``/``L``/``RGB``/``1`` images with a
      transparency key): composited on :data:`ALPHA_BACKGROUND` (white), so what is hidden under
      transparent pixels never reaches the model;
    * any other mode (e.g. ``LAB``, ``La``): a :class:`TokenTuneError` naming the mode.

    Raises:
        TokenTuneError: unsupported mode or value range (the message names neither file nor line:
            :func:`load_image` adds them).
    """
    from PIL import Image, ImageOps

    mode = img.mode
    if mode not in SUPPORTED_MODES:
        raise _unsupported(mode)
    img = ImageOps.exif_transpose(img)
    if mode in _GREY16 or mode == "I":
        return Image.fromarray(_grey16_to_8(img)).convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_to_8(img)).convert("RGB")
    if mode in _ALPHA or "transparency" in img.info:
        return _on_background(img)
    return img.convert("RGB")


def _reason(exc: BaseException, path: str) -> str:
    text = str(exc).replace(repr(path), "").replace(path, "")      # the message names the file already
    return " ".join(text.split()) or type(exc).__name__


def describe_location(path: str, origin: str = "") -> str:
    return f"{path} (listed at {origin})" if origin and origin != path else path


def load_image(path: str, where: str = ""):
    """Open ``path`` as an RGB PIL image (see :func:`to_rgb`); any problem is one clear error.

    Args:
        path: the image file.
        where: where it was listed (``file:line``), named in the error.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except TokenTuneError as exc:
        raise TokenTuneError(f"cannot use image {describe_location(path, where)}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
        raise TokenTuneError(f"cannot read image {describe_location(path, where)}: {_reason(exc, path)}; the file is missing or "
                             "corrupt, re-extract the dataset or remove the file/line") from None


def image_problem(path: str) -> Optional[str]:
    """Why the image file ``path`` cannot be used (None if it can), cheaply.

    Checks that the file exists, that PIL identifies it and its mode is supported, and
    ``verify()`` (for PNG: the chunk checksums); pixels are not decoded, so damage deep inside a
    file still shows only when it is read. Mode ``I`` and ``F`` images are decoded, because their
    value range decides whether :func:`to_rgb` accepts them.
    """
    from PIL import Image

    if not os.path.isfile(path):
        return "does not exist"
    try:
        with Image.open(path) as img:
            if img.mode in ("I", "F"):
                to_rgb(img)
            elif img.mode not in SUPPORTED_MODES:
                raise _unsupported(img.mode)
            else:
                img.verify()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
        return _reason(exc, path)
    return None
