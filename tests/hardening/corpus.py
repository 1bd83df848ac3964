"""The hostile-input corpus: every bad or odd input the hardening tests send, generated here.

Each generator returns `Case`s: a name, the bytes, and what the service must answer. The
tests send them through the real HTTP paths (the Flask app in-process and a real gunicorn)
and through the library (`training.images.preprocess_image`, `training.ingest.ingest`),
and the reliability record counts from here, so there is one list of hostile inputs.

Nothing is a stored binary blob: images come from Pillow or from hand-written headers
(declaring sizes without allocating pixels), archives from zipfile/tarfile or byte patches
of what they wrote, and each builder says what it breaks.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import stat
import struct
import tarfile
import uuid
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from marshmallow import INCLUDE
from PIL import Image

from service.api.schemas import DatasetSchema, PredictionsSchema
from service.errors import CODES
from training.errors import ArchiveError, DatasetError, ImageError, TrainingError, UnsupportedImageError

# The limits the service under test runs with (also the library's IngestLimits in the tests):
# small, so a bomb or an oversized body is cheap to build and quick to refuse.
UPLOAD_MB = 2
PREDICT_MB = 1  # prediction bodies have their own, smaller limit
ARCHIVE_MB = 8
ARCHIVE_ENTRIES = 200
MAX_IMAGE_PIXELS = 50_000_000  # the default: the size cases declare sizes against it
MIN_IMAGES_PER_CLASS = 5
MODEL = "digits"
PREDICT = f"/v1/models/{MODEL}/predict"
DATASETS = "/v1/datasets"
TRAINING_KEY, PREDICTION_KEY = "hardening-training-key", "hardening-prediction-key"
# A per-run token in the names of escape attempts, searched for afterwards outside the data folder.
TOKEN = uuid.uuid4().hex[:12]
EVIL = f"evil-{TOKEN}.png"  # must not be written anywhere
THROUGH = f"through-link-{TOKEN}.png"  # written through a refused link: may exist inside the data folder only
UP = "../" * 40  # from any folder up to /
VICTIM = "/etc/passwd"


# The documented schema of each category's successful answer.
DOCUMENTED = {"images": PredictionsSchema, "archives": DatasetSchema}


@dataclass(frozen=True)
class Expect:
    """What the service must answer.

    `says` is a substring of the error message (any answer but 2xx, or the `error` of a dataset
    that ends failed). An archive upload accepted at once (202) ends as `dataset` (`ready` or
    `failed`) once the ingest worker ran; when ready, `classes` is the exact class → count report,
    each `skipped` (path, reason substring) must be listed, and `conflicts` is the number of images
    under two labels. `error` is the library's error type (None: the library accepts the input).
    """

    status: int
    says: str = ""
    error: type[TrainingError] | None = None
    classes: dict[str, int] | None = None
    skipped: tuple[tuple[str, str], ...] = ()
    conflicts: int = 0
    dataset: str | None = None

    @property
    def code(self) -> str:
        return CODES[self.status] if self.status >= 400 else ""


@dataclass(frozen=True)
class Request:
    """One HTTP request as sent on the wire; `chunked` sends it without Content-Length."""

    method: str
    path: str
    body: bytes = b""
    content_type: str | None = None
    chunked: bool = False
    key: str | None = TRAINING_KEY
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One hostile input: `category` is images, archives or requests."""

    category: str
    name: str
    data: bytes
    expect: Expect
    request: Request = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


# --- checking answers --------------------------------------------------------------------------------------------


def status_and_json(case: Case, status: int, body: bytes) -> tuple[list[str], object]:
    """The problems with an answer's status, and its JSON (None, with a problem said, when it is not JSON)."""
    problems = [] if status == case.expect.status else [f"status {status}, expected {case.expect.status}"]
    try:
        answer = json.loads(body)
    except ValueError:
        return [*problems, f"body is not JSON: {body[:200]!r}"], None
    return (problems, answer) if answer is not None else ([*problems, "body is JSON null"], None)


def check_answer(case: Case, status: int, body: bytes) -> list[str]:
    """What is wrong with the service's answer to `case` (empty: it is the expected one)."""
    expect = case.expect
    problems, answer = status_and_json(case, status, body)
    if answer is None:
        return problems
    if status >= 400:
        error = answer.get("error") if isinstance(answer, dict) else None
        if not isinstance(error, dict) or set(error) != {"code", "message"}:
            return [*problems, f"not the error shape: {answer!r}"[:300]]
        if status == expect.status and error["code"] != expect.code:
            problems.append(f"code {error['code']!r}, expected {expect.code!r}")
        if expect.says.lower() not in error["message"].lower():
            problems.append(f"message {error['message']!r} does not say {expect.says!r}")
    elif status == expect.status and case.category in DOCUMENTED:
        # The answer as the OpenAPI document describes it (unknown keys allowed, as the document does).
        errors = DOCUMENTED[case.category](unknown=INCLUDE).validate(answer)
        problems += [f"answer does not match its schema: {errors}"[:300]] if errors else []
        if case.category == "archives" and answer.get("status") not in ("queued", "ingesting"):
            problems.append(f"an upload answered with status {answer.get('status')!r}, expected queued")
    return problems


def check_protocol_answer(case: Case, status: int, body: bytes) -> list[str]:
    """What is wrong with a standard protocol's answer (Open Inference, TF Serving) to an image case."""
    expect = case.expect
    problems, answer = status_and_json(case, status, body)
    if answer is None:
        return problems
    if status >= 400:
        if not isinstance(answer, dict) or not isinstance(answer.get("error"), str):
            return [*problems, f"not the protocols' error shape: {answer!r}"[:300]]
        says = expect.says if case.data else "empty"  # v1's message for an empty part names the multipart field
        if says.lower() not in answer["error"].lower():
            problems.append(f"message {answer['error']!r} does not say {says!r}")
    elif not (isinstance(answer, dict) and ("predictions" in answer or "outputs" in answer)):
        problems.append(f"no probabilities in {answer!r}"[:300])
    return problems


def check_dataset(case: Case, record: dict) -> list[str]:
    """What is wrong with the dataset record an accepted upload ended with once the ingest worker ran."""
    expect = case.expect
    errors = DatasetSchema(unknown=INCLUDE).validate(record)
    problems = [f"record does not match its schema: {errors}"[:300]] if errors else []
    if record.get("status") != expect.dataset:
        return [*problems, f"dataset {record.get('status')} ({record.get('error')}), expected {expect.dataset}"[:400]]
    if expect.dataset == "failed":
        if expect.says.lower() not in (record.get("error") or "").lower():
            problems.append(f"error {record.get('error')!r} does not say {expect.says!r}")
        return problems
    return problems + check_report(case, record)


def check_report(case: Case, report: dict) -> list[str]:
    """What is wrong with an ingest report (HTTP record or `Dataset.report()`) for an accepted archive."""
    expect, problems = case.expect, []
    if expect.classes is not None and report.get("classes") != expect.classes:
        problems.append(f"classes {report.get('classes')!r}, expected {expect.classes!r}")
    skipped = [(s["path"], s["reason"]) for s in report.get("skipped", [])]
    for path, reason in expect.skipped:
        if not any(p == path and reason.lower() in r.lower() for p, r in skipped):
            problems.append(f"not skipped as expected: {path!r} ({reason}); skipped: {skipped!r}"[:400])
    if len(report.get("conflicts", [])) != expect.conflicts:
        problems.append(f"{len(report.get('conflicts', []))} conflicts, expected {expect.conflicts}")
    return problems


def check_raised(case: Case, exc: BaseException | None) -> list[str]:
    """What is wrong with what the library raised for `case` (None: it returned)."""
    wanted = case.expect.error
    if exc is None:
        return [f"accepted, expected {wanted.__name__}"] if wanted else []
    if wanted is None:
        return [f"raised {type(exc).__name__}: {exc}"[:300]]
    # An ImageError that is not the more specific UnsupportedImageError must not be one either.
    exact = wanted is ImageError and isinstance(exc, UnsupportedImageError)
    if not isinstance(exc, wanted) or exact:
        return [f"raised {type(exc).__name__}: {exc}, expected {wanted.__name__}"[:300]]
    if case.category == "archives" and case.expect.says.lower() not in str(exc).lower():
        return [f"message {str(exc)!r} does not say {case.expect.says!r}"[:300]]
    return []


# --- images ------------------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(size: int = 32, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Random pixels: every generated image differs from every other one."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 8-bit grey pixels, with one row of data: no pixels allocated."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(bytes(1 + width))) + png_chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is patched to declare width x height."""
    data = bytearray(encode(noise(16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)  # marker, length (2), precision (1), then height, width
    return bytes(data)


def gif_frames(count: int) -> bytes:
    """A GIF89a of `count` 1x1 frames alternating red and blue, written by hand (Pillow takes seconds for 10,000)."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0))  # 1x1, global palette of 2 colours
    out += bytes([255, 0, 0, 0, 0, 255])
    out += b"!\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    for index in range(count):
        out += b"!\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms per frame
        out += b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # image descriptor: 1x1 at 0,0
        # LZW, minimum code size 2 (3-bit codes): clear (4), the pixel's index, end (5), packed LSB first.
        code = 4 | (index % 2) << 3 | 5 << 6
        out += bytes([2, 2, code & 0xFF, code >> 8, 0])
    return bytes(out + b";")


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """The image stored sideways with EXIF orientation 6 ("rotate 90° clockwise to view")."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes(), quality=95,
                  subsampling=0)


def upright_jpeg(upright: Image.Image) -> bytes:
    return encode(upright, "JPEG", quality=95, subsampling=0)


def cmyk_jpeg() -> bytes:
    return encode(noise(32, 11, "CMYK"), "JPEG")


def sixteen_bit_png() -> bytes:
    pixels = np.random.default_rng(12).integers(0, 65536, (32, 32), dtype=np.uint16)
    return encode(Image.fromarray(pixels), "PNG")  # mode I;16


def palette_transparency_png() -> bytes:
    image = noise(32, 13).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def la_png() -> bytes:
    grey = noise(32, 14, "L")
    return encode(Image.merge("LA", (grey, grey.point(lambda v: 255 - v))), "PNG")


def pdf_bytes() -> bytes:
    return (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
            b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")


def eps_bytes() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nnewpath 0 0 moveto 32 32 lineto stroke\nshowpage\n"


def svg_bytes() -> bytes:
    return (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32">'
            b'<rect width="32" height="32" fill="red"/></svg>\n')


def png_corrupt_data() -> bytes:
    """A PNG whose compressed image data has one byte flipped (its chunk CRC is fixed up to match)."""
    data = bytearray(encode(noise(16, 15), "PNG"))
    idat = data.index(b"IDAT")
    length = struct.unpack_from(">I", data, idat - 4)[0]
    data[idat + 4 + length // 2] ^= 0xFF
    struct.pack_into(">I", data, idat + 4 + length, zlib.crc32(bytes(data[idat:idat + 4 + length])))
    return bytes(data)


@cache
def image_cases() -> list[Case]:
    """Images sent to predict: broken ones refused with the right status, odd but valid ones answered."""
    jpeg = encode(noise(32, 1), "JPEG")
    png = encode(noise(32, 2), "PNG")
    garbage = np.random.default_rng(3).bytes(4096)
    limit = f"limit of {MAX_IMAGE_PIXELS}"
    refused = [
        ("truncated.jpg", jpeg[: len(jpeg) // 2], 400, "image 0"),
        ("truncated.png", png[: len(png) // 2], 400, "image 0"),
        ("header-only.jpg", jpeg[:20], 400, "JPEG header is truncated"),
        ("garbage.jpg", garbage, 415, "not an image in an allowed format"),
        ("jpeg-magic-then-garbage.jpg", b"\xff\xd8\xff\xe0" + garbage, 400, "image 0"),
        ("png-corrupt-data.png", png_corrupt_data(), 400, "image 0"),
        ("png-header-only.png", png[:30], 400, "PNG header is truncated"),
        ("gif-header-only.gif", gif_frames(1)[:8], 400, "GIF header is truncated"),
        ("bmp-header-only.bmp", encode(noise(8, 10), "BMP")[:20], 400, "truncated"),
        ("declares-20000x20000.png", png_declaring(20000, 20000), 400, "pixels"),
        ("declares-8000x8000.png", png_declaring(8000, 8000), 400, limit),  # 64 Mpx: over ours, under Pillow's
        ("declares-65535x65535.jpg", jpeg_declaring(65535, 65535), 400, "pixels"),
        ("declares-9000x9000.jpg", jpeg_declaring(9000, 9000), 400, limit),
        ("declares-0x0.png", png_declaring(0, 0), 400, "PNG header is truncated or corrupt"),
        ("eps-renamed.jpg", eps_bytes(), 415, "not an image in an allowed format"),
        ("pdf-renamed.jpg", pdf_bytes(), 415, "not an image in an allowed format"),
        ("svg-renamed.jpg", svg_bytes(), 415, "not an image in an allowed format"),
        ("html-renamed.png", b"<!doctype html><title>x</title><img src=x onerror=alert(1)>", 415, "allowed format"),
        ("zip-renamed.jpg", archive_zip({"a/b.png": png}), 415, "not an image in an allowed format"),
        ("ico-not-allowed.ico", encode(noise(16, 4), "ICO"), 415, "not an image in an allowed format"),
        ("text.png", b"hello, world\n" * 20, 415, "not an image in an allowed format"),
        ("one-byte.jpg", b"\xff", 415, "not an image in an allowed format"),
    ]
    accepted = [
        ("cmyk.jpg", cmyk_jpeg()),
        ("sixteen-bit.png", sixteen_bit_png()),
        ("palette-transparency.png", palette_transparency_png()),
        ("la.png", la_png()),
        ("10000-frames.gif", gif_frames(10_000)),
        ("exif-rotated.jpg", exif_rotated_jpeg(noise(32, 5))),
        ("one-pixel.png", encode(noise(1, 6), "PNG")),
        ("one-by-2000.png", encode(Image.new("RGB", (1, 2000), (10, 200, 30)), "PNG")),
        ("one-bit.bmp", encode(noise(32, 7, "1"), "BMP")),
        ("grey.tiff", encode(noise(32, 8, "L"), "TIFF")),
        ("rgba.webp", encode(noise(32, 9, "RGBA"), "WEBP")),
    ]
    cases = [Case("images", name, data, Expect(status, says, UnsupportedImageError if status == 415 else ImageError))
             for name, data, status, says in refused]
    cases += [Case("images", name, data, Expect(200)) for name, data in accepted]
    # An empty file is refused by the HTTP layer (the part is empty) and by the decoder alike.
    cases.append(Case("images", "empty.jpg", b"", Expect(400, "image[0] is empty", ImageError)))
    return [with_request(case) for case in cases]


# --- archives ----------------------------------------------------------------------------------------------------


Entry = tuple[zipfile.ZipInfo | str, bytes]


def archive_zip(files: dict[str, bytes] | list[Entry], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of (name or ZipInfo, bytes) entries, written as given (names are not cleaned)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": one case writes a name twice on purpose
        for name, data in (files.items() if isinstance(files, dict) else files):
            info = name if isinstance(name, zipfile.ZipInfo) else zipfile.ZipInfo(name)
            archive.writestr(info, data, compress_type=compression)
    return buffer.getvalue()


def zip_link(name: str, target: str) -> Entry:
    """A zip entry that unzip tools restore as a symbolic link to `target`."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the mode bits below are read
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def archive_tar(members: dict[str, bytes] | list[tuple[str | tarfile.TarInfo, bytes]], mode: str = "w:gz") -> bytes:
    """A tar (gzipped unless `mode` says otherwise) of members in order: regular files by name, or TarInfo
    (links, devices) as given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=tarfile.PAX_FORMAT) as archive:
        for name, data in (members.items() if isinstance(members, dict) else members):
            if isinstance(name, tarfile.TarInfo):
                archive.addfile(name)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def class_images(counts: dict[str, int], seed: int) -> dict[str, bytes]:
    """{"<label>/<n>.png": a distinct 16 px PNG} for each label and count."""
    files, n = {}, seed * 1000
    for label, count in counts.items():
        for index in range(count):
            files[f"{label}/{index:02d}.png"] = encode(noise(16, n), "PNG")
            n += 1
    return files


def good(seed: int) -> dict[str, bytes]:
    """A trainable dataset: two classes of five images (the minimum)."""
    return class_images({"cats": 5, "dogs": 5}, seed)


GOOD = {"cats": 5, "dogs": 5}


def set_zip_flag(blob: bytes, name: str, bit: int) -> bytes:
    """Set a general-purpose flag bit of one entry in its local header and its central directory record."""
    data = bytearray(blob)
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        local = archive.getinfo(name).header_offset
    offsets, start = [local + 6], 0
    while (start := data.find(b"PK\x01\x02", start)) != -1:
        length = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46:start + 46 + length] == name.encode():
            offsets.append(start + 8)
        start += 4
    for offset in offsets:
        struct.pack_into("<H", data, offset, struct.unpack_from("<H", data, offset)[0] | bit)
    return bytes(data)


def flip_byte_inside(blob: bytes, member: bytes) -> bytes:
    """Corrupt one byte in the middle of a stored member's data (its CRC no longer matches)."""
    data = bytearray(blob)
    data[blob.index(member) + len(member) // 2] ^= 0xFF
    return bytes(data)


def repeated_block(size: int, seed: int) -> bytes:
    """`size` bytes that deflate about 80:1: a random 16 KiB block repeated (under the ratio limit, so the total
    limit is what stops an archive of them)."""
    block = np.random.default_rng(seed).bytes(16 * 1024)
    return (block * (size // len(block) + 1))[:size]


@cache
def archive_cases() -> list[Case]:
    """Archives sent to POST /v1/datasets: unsafe entries skipped with reasons, bombs and bad layouts refused
    (by the ingest worker: the dataset ends failed, saying why), what is not an archive refused at once."""
    mib = 2**20

    def accepted(name: str, data: bytes, classes: dict[str, int] | None = None,
                 skipped: tuple[tuple[str, str], ...] = (), conflicts: int = 0) -> Case:
        return Case("archives", name, data, Expect(202, classes=classes or GOOD, skipped=skipped,
                                                   conflicts=conflicts, dataset="ready"))

    def refused(name: str, data: bytes, says: str, error: type[TrainingError] = ArchiveError) -> Case:
        """Stored at once (it starts like an archive), then failed by the ingest worker, saying why."""
        return Case("archives", name, data, Expect(202, says, error, dataset="failed"))

    def refused_at_upload(name: str, data: bytes, says: str) -> Case:
        """Not an archive at all: refused by the upload itself, before anything is stored or queued."""
        return Case("archives", name, data, Expect(400, says, ArchiveError))

    def unsafe(name: str) -> tuple[str, str]:
        return name, "unsafe path"

    png = encode(noise(16, 99), "PNG")
    # From the unpack folder (<data>/datasets/<id>/.staging-*/data), 5 levels up leaves the data folder, 6 the
    # sentinel folder around it; UP reaches /. Each name is listed as skipped and written nowhere.
    climbs = ["../" + EVIL, "../" * 4 + EVIL, "../" * 5 + EVIL, "../" * 6 + EVIL, UP + "tmp/" + EVIL,
              "cats/" + "../" * 5 + EVIL, "cats/" + "../" * 6 + EVIL]
    windows = ["..\\" * 5 + EVIL, "..\\" * 6 + EVIL, "cats\\..\\..\\..\\..\\..\\" + EVIL,
               "cats\\" + "..\\" * 6 + EVIL]
    absolute = ["/tmp/" + EVIL, "C:\\Windows\\" + EVIL, "c:/" + EVIL, "//server/share/" + EVIL]
    stored_files = class_images({"cats": 6, "dogs": 5}, 20)
    stored = archive_zip(stored_files, zipfile.ZIP_STORED)
    nested_zip = archive_zip(good(21))
    cases = [
        accepted("dotdot.zip", archive_zip({**good(1), **dict.fromkeys(climbs + windows, png)}),
                 skipped=tuple(unsafe(name) for name in climbs + windows)),
        accepted("absolute.zip", archive_zip({**good(2), **dict.fromkeys(absolute, png)}),
                 skipped=tuple(unsafe(name) for name in absolute)),
        # A link to a secret, and a link to / followed by an entry written "through" it.
        accepted("symlink.zip", archive_zip([*good(3).items(), zip_link("cats/passwd.png", VICTIM),
                                             zip_link("dogs/up", UP), (f"dogs/up/tmp/{THROUGH}", png)]),
                 classes={"cats": 5, "dogs": 6},  # dogs/up/ is a plain folder once the link is refused
                 skipped=(("cats/passwd.png", "symlink"), ("dogs/up", "symlink"))),
        accepted("dotdot.tar.gz", archive_tar({**good(4), **dict.fromkeys(climbs + ["/tmp/" + EVIL], png)}),
                 skipped=tuple(unsafe(name) for name in climbs + ["/tmp/" + EVIL])),
        accepted("links-and-devices.tar.gz", archive_tar([
            *good(5).items(),
            (tar_special("cats/passwd.png", tarfile.SYMTYPE, VICTIM), b""),
            (tar_special("cats/up", tarfile.SYMTYPE, UP), b""), (f"cats/up/tmp/{THROUGH}", png),
            (tar_special("cats/hard.png", tarfile.LNKTYPE, VICTIM), b""),
            (tar_special("cats/device.png", tarfile.CHRTYPE), b""),
            (tar_special("cats/fifo.png", tarfile.FIFOTYPE), b"")]),
            classes={"cats": 6, "dogs": 5},
            skipped=(("cats/passwd.png", "symlink"), ("cats/up", "symlink"), ("cats/hard.png", "link"),
                     ("cats/device.png", "special file"), ("cats/fifo.png", "special file"))),
        refused("bomb-ratio.zip", archive_zip({**good(6), "cats/zeros.png": bytes(8 * mib)}), "compression ratio"),
        refused("bomb-ratio.tar.gz", archive_tar({**good(7), "cats/zeros.png": bytes(8 * mib)}), "compression ratio"),
        refused("bomb-total.zip", archive_zip({**good(8), **{f"dogs/big{n}.png": repeated_block(mib, n)
                                                              for n in range(ARCHIVE_MB + 2)}}),
                f"more than {ARCHIVE_MB} MiB"),
        refused("bomb-total.tar.gz", archive_tar({**good(9), **{f"dogs/big{n}.png": repeated_block(mib, n)
                                                                 for n in range(ARCHIVE_MB + 2)}}),
                f"more than {ARCHIVE_MB} MiB"),
        refused("pax-header-bomb.tar.gz", pax_header_bomb(), "compression ratio"),
        refused("too-many-entries.zip", archive_zip({**good(10), **{f"cats/{n}.txt": b"" for n in
                                                                     range(ARCHIVE_ENTRIES)}}),
                f"more than {ARCHIVE_ENTRIES} entries"),
        refused("too-many-entries.tar", archive_tar({**good(11), **{f"cats/{n}.txt": b"" for n in
                                                                     range(ARCHIVE_ENTRIES)}}, "w"),
                f"more than {ARCHIVE_ENTRIES} entries"),
        accepted("bad-crc.zip", flip_byte_inside(stored, stored_files["cats/02.png"]),
                 skipped=(("cats/02.png", "bad CRC"),)),
        accepted("encrypted-entry.zip", set_zip_flag(archive_zip({**good(12), "cats/extra.png": png}),
                                                     "cats/extra.png", 0x1),
                 skipped=(("cats/extra.png", "encrypted"),)),
        accepted("nested-archives.zip", archive_zip({**good(13), "cats/inner.zip": nested_zip,
                                                     "dogs/inner.tar.gz": archive_tar(good(22)),
                                                     "dogs/renamed.png": nested_zip}),
                 skipped=(("cats/inner.zip", "nested archive"), ("dogs/inner.tar.gz", "nested archive"),
                          ("dogs/renamed.png", "nested archive"))),
        refused("one-class.zip", archive_zip(class_images({"cats": 8}, 14)), "at least 2 classes", DatasetError),
        refused("empty-class.zip", archive_zip([*good(15).items(), ("empty/", b"")]),
                f"class 'empty' has 0 images; each class needs at least {MIN_IMAGES_PER_CLASS}", DatasetError),
        refused("too-few-images.zip", archive_zip(class_images({"cats": 5, "dogs": 2}, 16)),
                f"class 'dogs' has 2 images; each class needs at least {MIN_IMAGES_PER_CLASS}", DatasetError),
        refused("no-images.zip", archive_zip({"cats/a.txt": b"text", "dogs/b.pdf": pdf_bytes()}),
                "at least 2 classes", DatasetError),
        refused("empty.zip", archive_zip({}), "no class folders", DatasetError),
        accepted("non-images.zip", archive_zip({**good(17), "cats/notes.txt": b"not an image\n",
                                                "cats/doc.jpg": pdf_bytes(), "dogs/vector.png": svg_bytes(),
                                                "dogs/empty.png": b"", "dogs/cut.png": png[: len(png) // 2],
                                                "dogs/huge.png": png_declaring(20000, 20000),
                                                "stray.png": png}),
                 skipped=(("cats/notes.txt", "not an image"), ("cats/doc.jpg", "not an image"),
                          ("dogs/vector.png", "not an image"), ("dogs/empty.png", "empty file"),
                          ("dogs/cut.png", "cannot"), ("dogs/huge.png", "pixels"),
                          ("stray.png", "not in a class folder"))),
        accepted("unicode-and-spaces.zip", archive_zip(class_images({"défaut rayé": 5, "猫 と 犬": 5,
                                                                     "two  spaces ": 5}, 18)),
                 classes={"défaut rayé": 5, "猫 と 犬": 5, "two  spaces ": 5}),
        accepted("same-image-two-classes.zip",
                 archive_zip({**good(19), "cats/shared.png": png, "dogs/shared.png": png}),
                 skipped=(("cats/shared.png", "same image under labels 'cats', 'dogs'"),
                          ("dogs/shared.png", "same image under labels 'cats', 'dogs'")), conflicts=1),
        accepted("duplicate-names.zip", archive_zip([*good(23).items(), ("cats/00.png", png)]),
                 skipped=(("cats/00.png", "name clashes"),)),
        # The message names the formats that are accepted (.zip, .tar.gz), in-process and through ingest alike.
        refused_at_upload("garbage.zip", np.random.default_rng(24).bytes(4096), ".tar.gz"),
        refused("truncated.zip", archive_zip(good(25))[:3000], "truncated or corrupt"),
        refused("truncated.tar.gz", archive_tar(good(26))[:3000], "truncated or corrupt"),
        refused("gzip-not-tar.tar.gz", gzip.compress(b"just some text, not a tar" * 100), "truncated or corrupt"),
        refused_at_upload("png-not-archive.zip", png, ".tar.gz"),
        refused_at_upload("empty-file.zip", b"", ".tar.gz"),
    ]
    return [with_request(case) for case in cases]


def pax_header_bomb() -> bytes:
    """A tar.gz whose one member carries 16 MiB of pax metadata, which tarfile would read into memory at once."""
    info = tarfile.TarInfo("cats/x.png")
    info.pax_headers = {"comment": "0" * (16 * 2**20)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO())
    return buffer.getvalue()


# --- requests ----------------------------------------------------------------------------------------------------


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "hardening-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body of (field, filename or None, bytes) parts, and its Content-Type."""
    body = io.BytesIO()
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        kind = "Content-Type: application/octet-stream\r\n" if filename is not None else ""
        body.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def with_request(case: Case) -> Case:
    """The case with the HTTP request that delivers its bytes: a predict image part or a dataset file part."""
    path, field_name = (PREDICT, "image") if case.category == "images" else (DATASETS, "file")
    body, content_type = multipart([(field_name, case.name, case.data)])
    return Case(case.category, case.name, case.data, case.expect, Request("POST", path, body, content_type))


@cache
def request_cases() -> list[Case]:
    """Malformed, oversized or unauthorised requests to predict and to the dataset upload."""
    png = encode(noise(32, 30), "PNG")
    over = (UPLOAD_MB + 1) * 2**20
    # Over the prediction limit, and not over the upload limit: predictions have their own.
    predict_over = (PREDICT_MB + 1) * 2**20
    assert predict_over <= UPLOAD_MB * 2**20
    deep = b"[" * 100_000 + b"]" * 100_000
    big_json = json.dumps({"instances": [{"b64": base64.b64encode(bytes(predict_over)).decode()}]}).encode()

    def case(name: str, request: Request, status: int, says: str) -> Case:
        return Case("requests", name, request.body, Expect(status, says), request)

    def form(path: str, parts: list[tuple[str, str | None, bytes]], **options) -> Request:
        body, content_type = multipart(parts)
        return Request("POST", path, body, content_type, **options)

    too_large = f"at most {UPLOAD_MB} MiB (MAX_UPLOAD_MB)"
    predict_too_large = f"at most {PREDICT_MB} MiB (MAX_PREDICT_MB)"
    return [
        case("predict-empty-part", form(PREDICT, [("image", "a.png", png), ("image", "b.png", b"")]), 400,
             "image[1] is empty"),
        case("predict-no-image-field", form(PREDICT, [("picture", "a.png", png)]), 400, "no images"),
        case("predict-65-images", form(PREDICT, [("image", f"{n}.png", png) for n in range(65)]), 400, "at most 64"),
        case("predict-300-parts", form(PREDICT, [(f"field{n}", None, b"x") for n in range(300)]), 413, "form parts"),
        case("predict-over-limit", form(PREDICT, [("image", "big.png", bytes(predict_over))]), 413,
             predict_too_large),
        case("predict-over-limit-chunked", form(PREDICT, [("image", "big.png", bytes(predict_over))], chunked=True),
             413, predict_too_large),
        case("predict-json-over-limit", Request("POST", PREDICT, big_json, "application/json"), 413,
             predict_too_large),
        case("predict-json-over-limit-chunked", Request("POST", PREDICT, big_json, "application/json", chunked=True),
             413, predict_too_large),
        case("predict-raw-image-body", Request("POST", PREDICT, png, "image/png"), 415, "multipart/form-data"),
        case("predict-no-content-type", Request("POST", PREDICT, png), 415, "multipart/form-data"),
        case("predict-invalid-json", Request("POST", PREDICT, b'{"instances": [', "application/json"), 400,
             "not valid JSON"),
        case("predict-json-array", Request("POST", PREDICT, b"[1, 2]", "application/json"), 400, "object"),
        case("predict-bad-base64", Request("POST", PREDICT, b'{"instances": [{"b64": "not base64!"}]}',
                                           "application/json"), 400, "instances[0].b64"),
        # Nested deeper than Python's parser recurses: was a 500 (RecursionError) before service.api.JSONProvider.
        case("predict-deep-json", Request("POST", PREDICT, deep, "application/json"), 400, "not valid JSON"),
        case("train-deep-json", Request("POST", f"/v1/models/{MODEL}/train", deep, "application/json"), 400,
             "JSON object"),
        case("publish-deep-json", Request("PUT", f"/v1/models/{MODEL}/published", deep, "application/json"), 400,
             "JSON"),
        case("predict-multipart-no-boundary", Request("POST", PREDICT, b"--x\r\n\r\n", "multipart/form-data"), 400,
             "no images"),
        case("predict-multipart-unterminated", Request("POST", PREDICT, b"--b\r\nContent-Disposition: form-data; "
                                                       b'name="image"; filename="a.png"\r\n\r\n' + png,
                                                       "multipart/form-data; boundary=b"), 400, ""),
        case("predict-bad-top-k", form(PREDICT + "?top_k=-1", [("image", "a.png", png)]), 400, "top_k"),
        case("predict-unknown-model", form("/v1/models/nosuch/predict", [("image", "a.png", png)]), 404, "nosuch"),
        case("predict-traversal-model-name", form("/v1/models/..%2F..%2Fetc/predict", [("image", "a.png", png)]),
             404, "not found"),
        case("predict-no-key", form(PREDICT, [("image", "a.png", png)], key=None), 401, ""),
        case("predict-wrong-key", form(PREDICT, [("image", "a.png", png)], key="guessed-key"), 401, ""),
        case("datasets-prediction-key", form(DATASETS, [("file", "a.zip", b"PK")], key=PREDICTION_KEY), 403, ""),
        case("datasets-no-file", form(DATASETS, [("other", None, b"x")]), 400, "no archive"),
        case("datasets-empty-file", form(DATASETS, [("file", "a.zip", b"")]), 400, "'a.zip' does not start like one"),
        case("datasets-raw-body", Request("POST", DATASETS, archive_zip(good(31)), "application/zip"), 415,
             "multipart/form-data"),
        case("datasets-300-parts", form(DATASETS, [(f"field{n}", None, b"x") for n in range(300)]), 413,
             "form parts"),
        case("datasets-over-limit", form(DATASETS, [("file", "big.zip", bytes(over))]), 413, too_large),
        case("datasets-over-limit-chunked", form(DATASETS, [("file", "big.zip", bytes(over))], chunked=True), 413,
             too_large),
        case("datasets-traversal-id", Request("GET", "/v1/datasets/..%2F..%2F..%2Fetc"), 404, "not found"),
        case("datasets-malformed-id", Request("GET", "/v1/datasets/..etc"), 400, "dataset_id"),
        case("predict-malformed-model-name", form("/v1/models/..bad/predict", [("image", "a.png", png)]), 400,
             "model name"),
    ]


@cache
def all_cases() -> list[Case]:
    """The whole corpus."""
    return image_cases() + archive_cases() + request_cases()

