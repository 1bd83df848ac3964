"""Image decoding and the one preprocessing function shared by training and serving.

`preprocess_image` (decode → RGB → EXIF-transpose → resize → VGG19 `preprocess_input`)
is the only way pixels reach the backbone, in training and in serving alike, so
there is no train/serve skew. Untrusted bytes are decoded by Pillow with an
allow-list of formats sniffed from the bytes and a pixel limit checked before any
pixel is decoded; resizing uses OpenCV, which is several times faster than Pillow.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from training.errors import ImageError, UnsupportedImageError
from training.settings import Settings

# Formats sniffed from the bytes; a filename or Content-Type is never trusted.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# How files of the allowed formats start (WEBP and BMP are checked in `_signature`).
_SIGNATURES = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",), "GIF": (b"GIF87a", b"GIF89a"),
               "TIFF": (b"II*\x00", b"MM\x00*")}
# MAX_IMAGE_PIXELS' default: one source for the settings, ingest's limits and this module.
DEFAULT_MAX_PIXELS = Settings.max_image_pixels
# Bumped whenever the pixels this module produces change, so cached features
# computed by an older version are not reused.
PREPROCESSING_VERSION = "1"
PREPROCESSING = f"pillow-decode,exif-transpose,rgb-on-white,cv2-inter-area,vgg19-caffe,v{PREPROCESSING_VERSION}"

# Truncated files are errors, never half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _signature(data: bytes) -> str | None:
    """The allowed format whose signature the bytes start with, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and data[6:10] == bytes(4):  # "BM", file size, then four reserved zero bytes
        return "BMP"
    return next((kind for kind, heads in _SIGNATURES.items() if data.startswith(heads)), None)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open bytes as one of the allowed formats and check the pixel count before decoding."""
    if not data:
        raise ImageError("empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        kind = _signature(data)
        if kind:  # An allowed format whose header is cut or broken: a bad image (400), not another type (415).
            raise ImageError(f"cannot read image: the {kind} header is truncated or corrupt") from None
        raise UnsupportedImageError(
            f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except Image.DecompressionBombError:
        raise ImageError(f"image has more than {max_pixels} pixels") from None
    except Exception as exc:  # Pillow raises many types for malformed headers.
        raise ImageError(f"cannot read image: {exc}") from None
    width, height = image.size
    # Pillow only warns below twice its own limit; ours is a hard error.
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height}, over the limit of {max_pixels} pixels")
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB; transparent areas become white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's convert would clip 16-bit values at 255; scale the range instead.
        array = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode untrusted bytes to an upright RGB image (first frame of animations).

    `draft_size` lets JPEG decode at a reduced scale that is still at least that
    many pixels on each side, which is much faster for large photos.
    """
    image = _open(data, max_pixels)
    try:
        image.seek(0)
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image has more than {max_pixels} pixels") from None
    except Exception as exc:  # Truncated data, bad CRCs, broken EXIF...
        raise ImageError(f"cannot decode image: {exc}") from None


def resize_rgb(rgb: np.ndarray, image_size: int) -> np.ndarray:
    """Resize an HxWx3 uint8 array to image_size x image_size (squash, no crop)."""
    if rgb.shape[:2] == (image_size, image_size):
        return rgb
    return cv2.resize(rgb, (image_size, image_size), interpolation=cv2.INTER_AREA)


def vgg19_preprocess(batch: np.ndarray) -> np.ndarray:
    """Apply VGG19's `preprocess_input` (RGB→BGR, ImageNet mean subtraction) to RGB uint8/float pixels."""
    from keras.applications import vgg19

    return vgg19.preprocess_input(np.asarray(batch, dtype=np.float32))


def decode_resized(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image bytes as RGB uint8 pixels of shape (image_size, image_size, 3): all of the preprocessing but VGG19's."""
    image = decode_image(data, max_pixels=max_pixels, draft_size=image_size)
    return resize_rgb(np.asarray(image, dtype=np.uint8), image_size)


def preprocess_image(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Turn image bytes into the backbone's float32 input of shape (image_size, image_size, 3)."""
    return vgg19_preprocess(decode_resized(data, image_size, max_pixels))


def check_image_size(image_size: int) -> int:
    """Validate an image size argument for VGG19 (at least 32 px)."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 32 <= image_size <= 1024:
        raise ValueError(f"image_size must be a whole number from 32 to 1024, received: {image_size!r}")
    return image_size
