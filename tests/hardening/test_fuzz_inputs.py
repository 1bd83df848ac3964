"""Property-based fuzzing (hypothesis) of the two parsers of untrusted bytes: the image decoder and the archive ingest.

Property: for arbitrary bytes, and for valid files with bytes flipped, cut, inserted or
overwritten with extreme values, the code either succeeds or raises the project's own
error (`training.errors.TrainingError`), never anything else, within bounded time and
memory, and ingest never writes outside its work folder. Derandomized: the same examples
on every run.
"""

from __future__ import annotations

import resource
import tempfile
import time
import zipfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening import corpus
from tests.hardening.conftest import limits
from training.data.ingest import ingest
from training.errors import TrainingError
from training.images import preprocess_image

MAX_SECONDS = 5.0  # one decode or one ingest of these small inputs; far above what any takes
MAX_RSS_GROWTH_MB = 600
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

IMAGE_SEEDS = [corpus.encode(corpus.noise(16, 50), fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")]
IMAGE_SEEDS += [corpus.cmyk_jpeg(), corpus.sixteen_bit_png(), corpus.palette_transparency_png(),
                corpus.exif_rotated_jpeg(corpus.noise(16, 51)), corpus.gif_frames(3)]
ARCHIVE_SEEDS = [corpus.archive_zip(corpus.class_images({"a": 5, "b": 5}, 52)),
                 corpus.archive_zip(corpus.class_images({"a": 5, "b": 5}, 53), zipfile.ZIP_STORED),
                 corpus.archive_tar(corpus.class_images({"a": 5, "b": 5}, 54)),
                 corpus.archive_tar(corpus.class_images({"a": 5, "b": 5}, 55), "w")]
EXTREMES = [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x00\xff\xff"]


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed file with a few bytes flipped, inserted or overwritten with extreme values, or cut short."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        operation = draw(st.sampled_from(["flip", "insert", "overwrite", "cut"]))
        if operation == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif operation == "overwrite":
            data[at:at + 4] = draw(st.sampled_from(EXTREMES))
        elif operation == "cut":
            del data[at:]
    return bytes(data)


class Budget:
    """Counts examples and fails on one that is slow or on memory that keeps growing."""

    def __init__(self, tally, category: str) -> None:
        self.tally, self.category, self.reported = tally, category, False
        self.rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def run(self, call) -> None:
        start = time.perf_counter()
        problems = []
        try:
            call()
        except TrainingError:
            pass
        except Exception as exc:  # noqa: BLE001 - anything else is the finding
            problems.append(f"raised {type(exc).__name__}: {exc}"[:300])
        seconds = time.perf_counter() - start
        if seconds > MAX_SECONDS:
            problems.append(f"took {seconds:.1f} s")
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss_start) / 1024
        if grown > MAX_RSS_GROWTH_MB:
            problems.append(f"peak memory grew by {grown:.0f} MB")
        # Shrinking replays a failure many times: list the first one only.
        self.tally.add(self.category, None if self.reported else problems)
        self.reported = self.reported or bool(problems)
        assert not problems, problems


def decode(data: bytes) -> None:
    pixels = preprocess_image(data, 32, corpus.MAX_IMAGE_PIXELS)
    assert pixels.shape == (32, 32, 3)


def test_decoder_on_arbitrary_and_mutated_bytes(tally):
    budget = Budget(tally, "fuzz/decoder")

    @settings(FUZZ, max_examples=2000)
    @given(st.one_of(st.binary(max_size=2048), mutated(IMAGE_SEEDS), mutated(IMAGE_SEEDS), mutated(IMAGE_SEEDS)))
    def check(data: bytes) -> None:
        budget.run(lambda: decode(data))

    check()


def ingest_in_a_box(data: bytes) -> None:
    """Ingest the bytes as an upload, in a folder of its own; nothing may appear beside the work folder."""
    with tempfile.TemporaryDirectory(prefix="fuzz-ingest-") as box:
        root = Path(box)
        (root / "upload").write_bytes(data)
        work = root / "nest" / "work"
        work.parent.mkdir()
        try:
            ingest(root / "upload", work, limits())
        finally:
            outside = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_relative_to(work))
            assert outside == ["nest", "nest/work", "upload"] or outside == ["nest", "upload"], outside


def test_ingest_on_arbitrary_and_mutated_archives(tally):
    budget = Budget(tally, "fuzz/archives")

    @settings(FUZZ, max_examples=400)
    @given(st.one_of(st.binary(max_size=1024), mutated(ARCHIVE_SEEDS), mutated(ARCHIVE_SEEDS), mutated(ARCHIVE_SEEDS)))
    def check(data: bytes) -> None:
        budget.run(lambda: ingest_in_a_box(data))

    check()
