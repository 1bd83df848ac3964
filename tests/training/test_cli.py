"""The command line: a real run through `python -m training`, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from training.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "BACKBONE_WEIGHTS": "none", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_train_predict_models_evaluate_through_the_real_entry_point(small_digits_dir, tmp_path):
    store = ["--model-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data")]
    trained = run_cli(*store, "train", str(small_digits_dir), "--model", "digits", "--image-size", "32",
                      "--epochs", "5", "--optimizer", "adam")
    assert trained.returncode == 0, trained.stderr
    assert "validation accuracy" in trained.stdout and "digits v1 (published)" in trained.stdout

    image = sorted((small_digits_dir / "two").glob("*.png"))[0]
    predicted = run_cli(*store, "predict", "--model", "digits", "--json", "--top-k", "2", str(image))
    assert predicted.returncode == 0, predicted.stderr
    answer = json.loads(predicted.stdout)
    assert answer["model"] == "digits" and answer["version"] == 1
    assert len(answer["predictions"][0]["top_k"]) == 2

    listed = run_cli(*store, "models", "--json")
    models = json.loads(listed.stdout)
    assert [m["name"] for m in models] == ["digits"] and models[0]["published"] == 1

    scored = run_cli(*store, "evaluate", "--model", "digits", "--json", str(small_digits_dir))
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["samples"] == 36


def test_bad_input_is_one_line_without_traceback_through_the_real_entry_point(tmp_path):
    result = run_cli("--model-dir", str(tmp_path), "train", str(tmp_path / "missing"), "--model", "x")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in result.stderr


def one_line_error(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


@pytest.fixture
def store_args(tmp_path):
    return ["--model-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path / "data"), "--weights", "none"]


def test_missing_dataset(capsys, store_args, tmp_path):
    assert "missing" in one_line_error(capsys, *store_args, "train", str(tmp_path / "missing"), "--model", "m")


def test_bad_model_name(capsys, store_args, small_digits_dir):
    assert "model name" in one_line_error(capsys, *store_args, "train", str(small_digits_dir), "--model", "../evil")


def test_bad_option_value(capsys, store_args, small_digits_dir):
    assert "epochs" in one_line_error(capsys, *store_args, "train", str(small_digits_dir), "--model", "m",
                                      "--epochs", "0")


def test_image_size_out_of_range(capsys, store_args, small_digits_dir):
    assert "image_size" in one_line_error(capsys, *store_args, "train", str(small_digits_dir), "--model", "m",
                                          "--image-size", "8")


def test_garbage_archive(capsys, store_args, tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK\x03\x04 this is not really a zip")
    assert "archive" in one_line_error(capsys, *store_args, "train", str(archive), "--model", "m")


def test_one_class_archive(capsys, store_args, tmp_path, small_digits_dir):
    archive = tmp_path / "one.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for image in sorted((small_digits_dir / "one").glob("*.png")):
            bundle.write(image, f"one/{image.name}")
    assert "class" in one_line_error(capsys, *store_args, "train", str(archive), "--model", "m")


def test_missing_weights_file(capsys, store_args, small_digits_dir, tmp_path):
    args = [a for a in store_args if a not in ("--weights", "none")]
    err = one_line_error(capsys, *args, "--weights", str(tmp_path / "vgg.h5"), "train", str(small_digits_dir),
                         "--model", "m", "--image-size", "32")
    assert "vgg.h5" in err


def test_unknown_model(capsys, store_args, small_digits_dir):
    image = sorted((small_digits_dir / "one").glob("*.png"))[0]
    assert "no model named 'ghost'" in one_line_error(capsys, *store_args, "predict", "--model", "ghost", str(image))


def test_predicting_a_non_image(capsys, store_args, small_digits_dir, tmp_path):
    assert main([*store_args, "train", str(small_digits_dir), "--model", "m", "--image-size", "32",
                 "--epochs", "2"]) == 0
    capsys.readouterr()
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    assert "not an image" in one_line_error(capsys, *store_args, "predict", "--model", "m", str(text))
