"""Decoding and the shared preprocessing function."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from training.errors import ImageError, UnsupportedImageError
from training.images import _to_rgb, decode_image, preprocess_image

VGG_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int = 40, height: int = 30) -> Image.Image:
    """An RGB image whose every pixel differs, so orientation mistakes show."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    return Image.fromarray(array.astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_every_allowed_format_decodes_to_rgb(fmt):
    image = decode_image(encode(gradient(), fmt))
    assert image.mode == "RGB"
    assert image.size == (40, 30)


@pytest.mark.parametrize("mode", ["L", "P", "LA", "RGBA", "CMYK", "I;16", "I", "1", "F"])
def test_every_mode_becomes_rgb(mode):
    source = gradient()
    if mode == "I;16":
        array = (np.asarray(gradient().convert("L"), dtype=np.uint16) * 257)
        source = Image.fromarray(array)
    else:
        source = source.convert(mode)
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    image = decode_image(encode(source, fmt))
    assert image.mode == "RGB"
    assert image.size == (40, 30)


def test_palette_with_alpha_mode_becomes_rgb():
    # No encoder writes "PA", but decoders can produce it; it goes through the same conversion.
    image = _to_rgb(gradient().convert("P").convert("PA"))
    assert image.mode == "RGB" and image.size == (40, 30)


def test_sixteen_bit_is_scaled_not_clipped():
    array = np.full((8, 8), 32768, dtype=np.uint16)  # half of the 16-bit range
    image = decode_image(encode(Image.fromarray(array)))
    assert np.asarray(image)[0, 0].tolist() == [127, 127, 127]


def test_transparent_pixels_become_white():
    source = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(decode_image(encode(source)))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert np.asarray(decode_image(encode(palette, transparency=0)))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    upright = gradient(40, 30)
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored sideways, 30x40
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": undoes the ROTATE_90 above
    decoded = decode_image(encode(rotated, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (40, 30)
    difference = np.abs(np.asarray(decoded, np.int16) - np.asarray(upright, np.int16)).mean()
    assert difference < 6, difference


def test_exif_rotated_jpeg_preprocesses_like_the_upright_one():
    upright = gradient(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6
    a = preprocess_image(encode(upright, "JPEG", quality=95), 32)
    b = preprocess_image(encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes(),
                                quality=95), 32)
    assert np.abs(a - b).mean() < 6


def test_first_frame_of_an_animation():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    assert np.asarray(decode_image(data))[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("data", [b"%!PS-Adobe-3.0 EPSF-3.0\n", b"%PDF-1.4\n%\xe2\xe3", b"<svg xmlns='x'/>",
                                  b"hello, world" * 10])
def test_non_images_are_unsupported(data):
    with pytest.raises(UnsupportedImageError):
        decode_image(data)


def test_empty_and_truncated_files_are_errors():
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    jpeg = encode(gradient(), "JPEG")
    with pytest.raises(ImageError):
        decode_image(jpeg[: len(jpeg) // 2])


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(ImageError, match="limit"):
        decode_image(encode(Image.new("L", (100, 100))), max_pixels=9_999)


def test_huge_declared_png_is_rejected_without_decoding():
    # A valid header declaring 20000x20000 (400 Mpx); the pixel data is never read.
    data = encode(Image.new("L", (1, 1)))
    header = bytearray(data)
    header[16:24] = (20000).to_bytes(4, "big") + (20000).to_bytes(4, "big")
    with pytest.raises(ImageError):
        decode_image(bytes(header))


def test_preprocess_shape_and_vgg_mean():
    white = encode(Image.new("RGB", (50, 70), (255, 255, 255)))
    pixels = preprocess_image(white, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[0, 0], 255 - VGG_MEAN_BGR, atol=1e-4)


def test_preprocess_is_bgr():
    red = encode(Image.new("RGB", (32, 32), (255, 0, 0)))
    pixels = preprocess_image(red, 32)
    np.testing.assert_allclose(pixels[0, 0], np.array([0, 0, 255]) - VGG_MEAN_BGR, atol=1e-4)
