"""The dataset types, the ingest limits, and the manifest that records an ingested dataset.

A manifest (`manifest.json`) lists every usable image by its path relative to the dataset's
folder, with its label, split, content sha256 and size, plus what ingest left out (skipped
files with their reasons, duplicates, conflicts) and its warnings. Reading it back gives the
same `Dataset` that ingest returned, without decoding or hashing any image again.

Paths in `Skipped`, `duplicates`, `conflicts` and the manifest are POSIX paths relative to the
folder that was scanned (the archive root for an upload), so they match the names the user sees
in their archive.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from training.errors import DatasetError
from training.settings import Settings

# Bumped when the manifest's fields change, so a reader never misreads an older one.
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class IngestLimits:
    """Limits that keep a hostile upload from exhausting disk, memory or time.

    The defaults are the settings' defaults (`MAX_ARCHIVE_ENTRIES`, ...): one source for both.
    """

    max_entries: int = Settings.max_archive_entries
    max_total_bytes: int = Settings.max_archive_mb * 2**20
    max_compression_ratio: int = Settings.max_compression_ratio
    max_image_pixels: int = Settings.max_image_pixels
    min_images_per_class: int = Settings.min_images_per_class

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestLimits:
        """Take the limits from the service settings."""
        return cls(max_entries=settings.max_archive_entries, max_total_bytes=settings.max_archive_mb * 2**20,
                   max_compression_ratio=settings.max_compression_ratio,
                   max_image_pixels=settings.max_image_pixels, min_images_per_class=settings.min_images_per_class)


@dataclass(frozen=True)
class Item:
    """One usable image: its file, label, content hash, split folder (None without one) and size in bytes."""

    path: Path
    label: str
    sha256: str
    split: str | None
    size: int = 0


@dataclass(frozen=True)
class Skipped:
    """A file or archive entry left out of the dataset, and why."""

    path: str
    reason: str


@dataclass
class Dataset:
    """The usable images of a dataset plus everything that was left out."""

    root: Path
    classes: list[str]
    items: list[Item]
    skipped: list[Skipped] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        """Content id: the same labeled images give the same id, however they were packed."""
        lines = sorted(json.dumps([i.label, i.split, i.sha256], ensure_ascii=False) for i in self.items)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]

    def counts(self) -> dict[str, int]:
        """Images per class, in class order (classes without images included)."""
        counts = dict.fromkeys(self.classes, 0)
        for item in self.items:
            counts[item.label] = counts.get(item.label, 0) + 1
        return counts

    def has_split(self) -> bool:
        """Whether the dataset came with train/ (and val/) folders."""
        return any(item.split is not None for item in self.items)

    def report(self) -> dict:
        """A JSON-able summary for the user."""
        return {"id": self.id, "classes": self.counts(), "images": len(self.items),
                "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
                "duplicates": [dict(d) for d in self.duplicates],
                "conflicts": [{**c, "paths": list(c["paths"]), "labels": list(c["labels"])} for c in self.conflicts],
                "warnings": list(self.warnings)}


def write_manifest(dataset: Dataset, path: Path) -> None:
    """Write `dataset` as a manifest at `path`, its items by their paths relative to `dataset.root`.

    Plain write: the dataset store writes it into a staging folder that it flushes and renames.
    """
    root = Path(dataset.root)
    items = [{"path": item.path.relative_to(root).as_posix(), "label": item.label, "split": item.split,
              "sha256": item.sha256, "size": item.size} for item in dataset.items]
    report = dataset.report()
    manifest = {"format": MANIFEST_FORMAT, "classes": dataset.classes, "items": items,
                **{key: report[key] for key in ("skipped", "duplicates", "conflicts", "warnings")}}
    Path(path).write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")


def read_manifest(path: Path, root: Path) -> Dataset:
    """Read a manifest back into the `Dataset` it was written from, its items' files under `root`."""
    manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"manifest {path} has format {manifest.get('format')!r}, this version reads "
                           f"{MANIFEST_FORMAT}; upload the dataset again")
    root = Path(root).resolve()
    items = [Item(root / entry["path"], entry["label"], entry["sha256"], entry["split"], entry["size"])
             for entry in manifest["items"]]
    return Dataset(root, list(manifest["classes"]), items, [Skipped(**entry) for entry in manifest["skipped"]],
                   manifest["duplicates"], manifest["conflicts"], manifest["warnings"])
