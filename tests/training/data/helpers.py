"""Builders for the dataset tests: images, folders and archives made here (Pillow, zipfile, tarfile)."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.dataset import IngestLimits

# Small classes, so a test needs only a few images.
LIMITS = IngestLimits(min_images_per_class=2)


def png(rng, size: int = 16) -> bytes:
    """A small PNG of random noise, so every image differs."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(rng, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def images(rng, counts: dict[str, int], prefix: str = "") -> dict[str, bytes]:
    """{"<prefix><label>/<n>.png": bytes} for each label and count."""
    return {f"{prefix}{label}/{n:02d}.png": png(rng) for label, count in counts.items() for n in range(count)}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def tar_special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz", extra=()) -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            tf.addfile(*tar_file(name, data))
        for info, data in extra:
            tf.addfile(info, data)
    return path


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def patch_zip_flags(blob: bytes, name: str, set_bits: int = 0, clear_bits: int = 0) -> bytes:
    """Change an entry's general-purpose flags in its local header and central directory record."""
    data = bytearray(blob)
    raw_name = name.encode()
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        local = next(i for i in zf.infolist() if i.orig_filename == name).header_offset
    offsets = [local + 6]
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) != -1:
        length = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46:start + 46 + length] == raw_name:
            offsets.append(start + 8)
        start += 4
    for offset in offsets:
        flags = struct.unpack_from("<H", data, offset)[0]
        struct.pack_into("<H", data, offset, (flags | set_bits) & ~clear_bits)
    return bytes(data)
