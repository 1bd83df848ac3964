"""Batch prediction of folders and archives: rows in input order, the one inference path's answers, bad files listed."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from training.batch_predict import Input, Row, check_sources, load_model, open_results, predict_batches
from training.cli import main
from training.errors import InvalidInput, NotFound
from training.options import parse_options
from training.pipeline import train
from training.predict import predict_files
from training.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
# The folder's files in the order the output must list them (sorted by path parts), and the readable ones.
ORDER = ["a.png", "b/c.png", "b/d.png", "b/notes.txt", "empty.png", "trunc.png", "z.png"]
GOOD = ["a.png", "b/c.png", "b/d.png", "z.png"]
REASONS = {"b/notes.txt": "not an image", "empty.png": "empty file", "trunc.png": "truncated"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_digits_dir) -> Settings:
    """Module-wide settings whose store holds a small head-only version of model "one"."""
    root = tmp_path_factory.mktemp("batch-predict")
    settings = Settings(model_dir=root / "models", data_dir=root / "data", backbone_weights="none",
                        keras_home=root / "keras")
    train(small_digits_dir, "one", settings, parse_options({"image_size": 32, "epochs": 5, "val_split": 0.5}))
    return settings


@pytest.fixture(scope="module")
def images(tmp_path_factory, small_digits_dir) -> Path:
    """A folder of good images (one per class and more), a text file, an empty and a truncated PNG, hidden files."""
    root = tmp_path_factory.mktemp("to-predict") / "images"
    (root / "b").mkdir(parents=True)
    (root / ".cache").mkdir()
    sources = [sorted((small_digits_dir / label).glob("*.png")) for label in ("zero", "one", "two")]
    for name, source in zip(GOOD, (sources[0][0], sources[1][0], sources[2][0], sources[1][1])):
        shutil.copyfile(source, root / name)
    (root / "b" / "notes.txt").write_text("not a picture")
    (root / "empty.png").write_bytes(b"")
    data = sources[2][1].read_bytes()
    (root / "trunc.png").write_bytes(data[: len(data) // 2])
    shutil.copyfile(sources[0][1], root / ".hidden.png")  # hidden files and folders are left out
    shutil.copyfile(sources[0][2], root / ".cache" / "e.png")
    return root


def cli(settings: Settings, *args: str) -> int:
    """Run `python -m training` in this process against the module's store."""
    return main(["--model-dir", str(settings.model_dir), "--data-dir", str(settings.data_dir), "--weights", "none",
                 *args])


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    return [{"path": r["path"], "label": r["label"] or None,
             "probability": float(r["probability"]) if r["probability"] else None,
             "top_k": json.loads(r["top_k"]) if r["top_k"] else [], "error": r["error"] or None} for r in rows]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_rows_match(rows: list[dict], prefix: str, expected: dict[str, dict]) -> None:
    """Rows list ORDER under `prefix`; readable ones carry `expected`'s answers exactly, the rest their reason."""
    assert [row["path"] for row in rows] == [prefix + name for name in ORDER]
    for row, name in zip(rows, ORDER):
        if name in GOOD:
            assert row["error"] is None
            assert {k: row[k] for k in ("label", "probability", "top_k")} == expected[name]
        else:
            assert row["label"] is None and row["probability"] is None and row["top_k"] == []
            assert REASONS[name] in row["error"]


@pytest.fixture(scope="module")
def offline(trained, images) -> dict[str, dict]:
    """`predict_files`' answers for the readable images, by name."""
    _, answers = predict_files(trained, "one", [images / name for name in GOOD], top_k=2)
    return dict(zip(GOOD, answers))


@pytest.mark.parametrize("suffix, read", [(".csv", read_csv), (".jsonl", read_jsonl)])
def test_a_folder_gives_one_row_per_file_in_order(trained, images, offline, tmp_path, capsys, suffix, read):
    out = tmp_path / f"results{suffix}"
    assert cli(trained, "predict", "--model", "one", "--top-k", "2", str(images), "--out", str(out)) == 0
    assert_rows_match(read(out), f"{images}/", offline)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the temporary file was renamed into place
    err = capsys.readouterr().err
    assert "predicted 4 images, 3 unreadable" in err and f"{images}/trunc.png: " in err


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_gives_the_folders_answers(trained, images, offline, tmp_path, kind):
    archive = tmp_path / f"images.{kind}"
    files = sorted(path for path in images.rglob("*") if path.is_file())
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as bundle:
            for path in reversed(files):  # stored out of order: the output still lists members sorted
                bundle.write(path, path.relative_to(images).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as bundle:
            for path in reversed(files):
                bundle.add(path, path.relative_to(images).as_posix())
    out = tmp_path / "results.jsonl"
    assert cli(trained, "predict", "--model", "one", "--top-k", "2", str(archive), "--out", str(out)) == 0
    assert_rows_match(read_jsonl(out), f"{archive}:", offline)
    assert not any((trained.data_dir / "tmp").iterdir())  # the unpacked copy is gone


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


def test_a_bad_out_suffix_fails_before_any_work(trained, tmp_path, capsys):
    # Neither the model nor the source exists: the --out check must come first.
    assert cli(trained, "predict", "--model", "ghost", str(tmp_path / "missing"), "--out",
               str(tmp_path / "results.txt")) == 2
    assert ".csv or .jsonl" in one_line_error(capsys)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("model, source, message", [("ghost", "images", "no model named 'ghost'"),
                                                    ("one", "missing", "no such file or folder")])
def test_a_missing_model_or_source_is_one_line(trained, images, tmp_path, capsys, model, source, message):
    path = images if source == "images" else tmp_path / source
    out = tmp_path / "results.csv"
    assert cli(trained, "predict", "--model", model, str(path), "--out", str(out)) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_no_readable_image_is_one_line_and_a_complete_file(trained, images, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    bad = [str(images / name) for name in REASONS]
    assert cli(trained, "predict", "--model", "one", *bad, "--out", str(out)) == 2
    assert "no image could be read" in one_line_error(capsys)
    assert [row["error"] is not None for row in read_jsonl(out)] == [True, True, True]


def test_batches_are_streamed_with_bounded_read_ahead(trained, images, offline):
    model, forward = load_model(trained, "one")
    pulled = []

    def inputs():
        for name in GOOD * 5:  # 20 inputs, batches of 2
            pulled.append(name)
            yield Input(name, data=(images / name).read_bytes())

    batches = predict_batches(model, inputs(), forward, top_k=2, batch_size=2)
    first = next(batches)
    assert len(first) == 2 and len(pulled) <= 4  # this batch and at most the next one read
    rows = first + [row for batch in batches for row in batch]
    assert [row.path for row in rows] == GOOD * 5
    for row in rows:
        assert row.label == offline[row.path]["label"]
        assert row.probability == pytest.approx(offline[row.path]["probability"], abs=1e-6)


def test_a_failed_run_leaves_no_file_under_the_final_name(tmp_path):
    out = tmp_path / "results.csv"
    with pytest.raises(RuntimeError), open_results(out) as write:
        write([Row("a.png", "one", 0.9, [{"label": "one", "probability": 0.9}])])
        raise RuntimeError("crash mid-run")
    assert not any(tmp_path.iterdir())


def test_sources_are_checked_up_front(tmp_path):
    with pytest.raises(NotFound, match="no such file or folder"):
        check_sources([tmp_path, tmp_path / "missing"])
    with pytest.raises(InvalidInput, match="no sources"):
        check_sources([])


def test_the_real_entry_point_writes_csv(trained, images, offline, tmp_path):
    out = tmp_path / "results.csv"
    env = {**os.environ, "BACKBONE_WEIGHTS": "none", "MODEL_DIR": str(trained.model_dir),
           "DATA_DIR": str(trained.data_dir), "KERAS_HOME": str(trained.keras_home)}
    result = subprocess.run([sys.executable, "-m", "training", "predict", "--model", "one", "--top-k", "2",
                             str(images), "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "3 unreadable" in result.stderr
    assert_rows_match(read_csv(out), f"{images}/", offline)


def test_an_image_over_the_pixel_limit_is_a_row_with_its_reason(trained, images):
    model, forward = load_model(trained, "one")
    inputs = [Input("big.png", data=(images / "a.png").read_bytes()), Input("gone.png", error="cannot read file")]
    [rows] = list(predict_batches(model, inputs, forward, max_pixels=100))  # the images are 32x32
    assert [row.label for row in rows] == [None, None]
    assert "over the limit of 100 pixels" in rows[0].error and rows[1].error == "cannot read file"
