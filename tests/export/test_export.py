"""Exports: each format, loaded by its own runtime, answers what the service answers for the version."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile

import keras
import numpy as np
import pytest

from tests.export.conftest import MEASUREMENTS
from tests.live import ROOT
from training.errors import InvalidInput, ModelNotFoundError
from training.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    compute_in_float32,
    export_version,
    nested_layers,
    preprocessing_layer,
)
from training.exports import FORMATS
from training.images import decode_image, preprocess_image, resize_rgb
from training.options import parse_options
from training.pipeline import train
from training.predict import backbone_for, load_version
from training.settings import Settings
from training.store import ModelStore

KINDS = ("head", "full")
MODEL_NAMES = {"head": "digits-head", "full": "digits-tuned"}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def export_settings(tmp_path_factory) -> Settings:
    """Settings for this module's own store, shared by its tests (training once is what takes time)."""
    root = tmp_path_factory.mktemp("export")
    return Settings(model_dir=root / "models", data_dir=root / "data", backbone_weights="none",
                    keras_home=root / "keras")


@pytest.fixture(scope="module")
def trained(export_settings, small_digits_dir) -> dict[str, str]:
    """A head-only version and a fine-tuned (kind "full") one, by kind."""
    base = {"image_size": 32, "epochs": 5, "val_split": 0.5}
    train(small_digits_dir, MODEL_NAMES["head"], export_settings, parse_options(base))
    train(small_digits_dir, MODEL_NAMES["full"], export_settings,
          parse_options(base | {"fine_tune": True, "fine_tune_epochs": 1, "fine_tune_keep": "always"}))
    store = ModelStore(export_settings.model_dir)
    assert {kind: store.model_path(name, 1)[0] for kind, name in MODEL_NAMES.items()} == {"head": "head",
                                                                                          "full": "full"}
    return MODEL_NAMES


@pytest.fixture(scope="module")
def image_bytes(small_digits_dir) -> list[bytes]:
    """Every image of the small digits, as the bytes a client would send."""
    return [path.read_bytes() for path in sorted(small_digits_dir.glob("*/*.png"))]


@pytest.fixture(scope="module")
def exports(trained, export_settings, tmp_path_factory):
    """Export (kind, format) once per module and hand back the same result to every test that asks."""
    done = {}

    def get(kind: str, fmt: str):
        if (kind, fmt) not in done:
            out = tmp_path_factory.mktemp("exports") / f"{kind}-{fmt}"
            done[kind, fmt] = export_version(export_settings, trained[kind], None, fmt, out)
        return done[kind, fmt]

    return get


def service_probabilities(settings: Settings, name: str, images: list[bytes]) -> np.ndarray:
    """What the service answers: its preprocessing, then the shared backbone and head or the whole model."""
    model = load_version(ModelStore(settings.model_dir), name)
    pixels = np.stack([preprocess_image(data, model.image_size) for data in images])
    if model.kind == "head":
        return model.probabilities(pixels, forward=backbone_for(model, settings).features)
    return model.probabilities(pixels)


def rgb_pixels(images: list[bytes], size: int) -> np.ndarray:
    """An exported model's input: decoded RGB, resized, float32 0..255, nothing else."""
    return np.stack([resize_rgb(np.asarray(decode_image(data, draft_size=size)), size)
                     for data in images]).astype(np.float32)


def run_savedmodel(result, pixels: np.ndarray) -> np.ndarray:
    """Score with TensorFlow's SavedModel loader, through the signature TF Serving serves."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(result.root / result.model_file.parent))
    return loaded.signatures["serving_default"](**{INPUT_NAME: tf.constant(pixels)})[OUTPUT_NAME].numpy()


def run_onnx(result, pixels: np.ndarray) -> np.ndarray:
    """Score with onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(result.root / result.model_file), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


def run_tflite(result, pixels: np.ndarray, filename: str = "model.tflite") -> np.ndarray:
    """Score with the LiteRT interpreter, through the file's serving signature."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(str(result.root / filename)).get_signature_runner("serving_default")
    return runner(**{INPUT_NAME: pixels})[OUTPUT_NAME]


def run_keras(result, pixels: np.ndarray) -> np.ndarray:
    """Score with Keras, loading in safe mode."""
    model = keras.saving.load_model(result.root / result.model_file, safe_mode=True)
    return keras.ops.convert_to_numpy(model(pixels, training=False))


RUNTIMES = {"savedmodel": run_savedmodel, "onnx": run_onnx, "tflite": run_tflite, "keras": run_keras}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_an_export_answers_what_the_service_answers(kind, fmt, exports, export_settings, trained, image_bytes):
    result = exports(kind, fmt)
    expected = service_probabilities(export_settings, trained[kind], image_bytes)
    got = RUNTIMES[fmt](result, rgb_pixels(image_bytes, result.image_size))
    assert got.shape == expected.shape == (len(image_bytes), 3) and got.dtype == np.float32
    difference = float(np.max(np.abs(got - expected)))
    MEASUREMENTS.append(f"{kind:4} {fmt:10} max |export - service| = {difference:.2e} over {len(image_bytes)} images")
    print(MEASUREMENTS[-1])
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    assert difference <= TOLERANCE


# The variants' bounds: size as a share of model.tflite's, largest probability difference, least top-1 agreement.
# Measured on the random-weights backbone of the tests, where int8 weights cost more than on ImageNet's.
TFLITE_VARIANT_BOUNDS = {"model_float16.tflite": (0.55, 0.05, 1.0), "model_dynamic_range.tflite": (0.3, 1.0, 0.75)}


@pytest.mark.parametrize("kind", KINDS)
def test_the_smaller_tflite_variants_are_smaller_and_agree_roughly(kind, exports, export_settings, trained,
                                                                   image_bytes):
    result = exports(kind, "tflite")
    expected = service_probabilities(export_settings, trained[kind], image_bytes)
    pixels = rgb_pixels(image_bytes, result.image_size)
    full_size = (result.root / "model.tflite").stat().st_size
    for filename, (size_share, most_difference, least_top1) in TFLITE_VARIANT_BOUNDS.items():
        size = (result.root / filename).stat().st_size
        got = run_tflite(result, pixels, filename)
        difference = float(np.max(np.abs(got - expected)))
        top1 = float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1)))
        MEASUREMENTS.append(f"{kind:4} {filename:27} {size / 2**20:5.1f} MiB ({size / full_size:.0%} of float32), "
                            f"max |export - service| = {difference:.2e}, same top-1 on {top1:.0%}")
        print(MEASUREMENTS[-1])
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.sum(axis=1), 1, atol=1e-3)
        assert size <= size_share * full_size and difference <= most_difference and top1 >= least_top1


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_export_lists_its_files_labels_and_readme(fmt, exports, trained, export_settings):
    result = exports("head", fmt)
    classes = ModelStore(export_settings.model_dir).labels(trained["head"], 1)
    assert (result.name, result.version, result.fmt, result.image_size) == (trained["head"], 1, fmt, 32)
    assert result.classes == classes
    assert result.files == sorted(path.relative_to(result.root) for path in result.root.rglob("*") if path.is_file())
    assert result.model_file in result.files
    assert (result.root / "labels.txt").read_text(encoding="utf-8").splitlines() == classes
    readme = (result.root / "README.md").read_text(encoding="utf-8")
    for needed in (INPUT_NAME, OUTPUT_NAME, "[N, 32, 32, 3]", "0..255", "INTER_AREA", result.model_file.as_posix(),
                   *classes):
        assert needed in readme
    assert not list(result.root.parent.glob(f".{result.root.name}.export-*"))  # no staging folder left


def python_blocks(markdown: str, after: str) -> list[str]:
    """The ```python blocks of a README that follow the heading `after`."""
    return re.findall(r"```python\n(.*?)```", markdown.split(after, 1)[1], re.S)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_readme_snippet_runs_as_written(fmt, exports, image_bytes, monkeypatch):
    result = exports("head", fmt)
    pixels = rgb_pixels(image_bytes[:4], result.image_size)
    monkeypatch.chdir(result.root)
    namespace = {"pixels": pixels}
    exec(python_blocks((result.root / "README.md").read_text(encoding="utf-8"), "## Calling it")[0], namespace)
    np.testing.assert_allclose(namespace["probabilities"], RUNTIMES[fmt](result, pixels), atol=1e-6)


def test_the_readme_recipe_makes_the_pixels_the_service_decodes(exports, small_digits_dir, tmp_path, monkeypatch):
    result = exports("head", "keras")
    image = sorted(small_digits_dir.glob("*/*.png"))[0]
    (tmp_path / "photo.jpg").write_bytes(image.read_bytes())  # Pillow goes by the bytes, not the name
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(python_blocks((result.root / "README.md").read_text(encoding="utf-8"), "## Preparing images")[0], namespace)
    np.testing.assert_array_equal(namespace["pixels"], rgb_pixels([image.read_bytes()], result.image_size))


def test_savedmodel_is_a_tf_serving_model_base_path(exports, trained):
    import tensorflow as tf

    result = exports("head", "savedmodel")
    version_dir = result.root / trained["head"] / "1"
    assert result.model_file == version_dir.relative_to(result.root) / "saved_model.pb"
    assert (version_dir / "saved_model.pb").is_file() and (version_dir / "variables").is_dir()
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    (spec,) = signature.structured_input_signature[1].values()
    assert list(signature.structured_input_signature[1]) == [INPUT_NAME]
    assert spec.shape.as_list() == [None, 32, 32, 3] and spec.dtype == tf.float32
    assert list(signature.structured_outputs) == [OUTPUT_NAME]
    assert signature.structured_outputs[OUTPUT_NAME].shape.as_list() == [None, 3]


@pytest.mark.parametrize("kind", KINDS)
def test_savedmodel_stores_each_weight_once(exports, trained, export_settings, kind):
    """Not twice, as Keras' own export does (keras-team/keras#23553): that doubles TF Serving's memory too."""
    result = exports(kind, "savedmodel")
    stored = sum(path.stat().st_size for path in (result.root / result.model_file.parent / "variables").iterdir())
    model = keras.saving.load_model(ModelStore(export_settings.model_dir).model_path(trained[kind], 1)[1])
    weights = sum(np.prod(w.shape) * 4 for w in model.weights)
    if kind == "head":
        weights += 20_024_384 * 4  # the VGG19 backbone the head-only version is exported with
    assert weights <= stored <= 1.05 * weights, (stored, weights)


def pbtxt_tensor(config: str, section: str) -> dict:
    """The one tensor of an `input [...]` or `output [...]` block of a Triton config."""
    block = re.search(rf"^{section} \[\n(.*?)^\]", config, re.S | re.M).group(1)
    return {"name": re.search(r'name: "([^"]+)"', block).group(1),
            "data_type": re.search(r"data_type: (\w+)", block).group(1),
            "dims": [int(d) for d in re.search(r"dims: \[([^\]]*)\]", block).group(1).split(",")],
            "label_filename": (re.search(r'label_filename: "([^"]+)"', block) or [None, None])[1]}


def test_onnx_is_a_triton_model_repository_whose_config_matches_the_graph(exports, trained, export_settings):
    import onnx

    result, name = exports("head", "onnx"), trained["head"]
    assert result.model_file.as_posix() == f"{name}/1/model.onnx"
    config = (result.root / name / "config.pbtxt").read_text(encoding="utf-8")
    assert f'name: "{name}"' in config and 'platform: "onnxruntime_onnx"' in config
    max_batch = int(re.search(r"max_batch_size: (\d+)", config).group(1))
    assert max_batch >= 1
    graph = onnx.load(str(result.root / result.model_file)).graph
    (graph_input,), (graph_output,) = graph.input, graph.output

    def dims(value) -> list:
        return [dim.dim_value if dim.HasField("dim_value") else None for dim in value.type.tensor_type.shape.dim]

    for section, tensor in (("input", graph_input), ("output", graph_output)):
        declared = pbtxt_tensor(config, section)
        assert declared["name"] == tensor.name
        assert declared["data_type"] == "TYPE_FP32" and tensor.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert [None, *declared["dims"]] == dims(tensor)  # the batch dimension is Triton's, dynamic in the graph
    assert pbtxt_tensor(config, "input")["dims"] == [32, 32, 3]
    assert pbtxt_tensor(config, "output")["label_filename"] == "labels.txt"
    classes = ModelStore(export_settings.model_dir).labels(name, 1)
    assert (result.root / name / "labels.txt").read_text(encoding="utf-8").splitlines() == classes
    assert pbtxt_tensor(config, "output")["dims"] == [len(classes)]


def test_tflite_takes_any_batch_of_named_pixels(exports):
    from ai_edge_litert.interpreter import Interpreter

    result = exports("head", "tflite")
    assert {"model.tflite", "model_float16.tflite", "model_dynamic_range.tflite"} <= {p.name for p in result.files}
    interpreter = Interpreter(str(result.root / "model.tflite"))
    assert interpreter.get_signature_list() == {"serving_default": {"inputs": [INPUT_NAME], "outputs": [OUTPUT_NAME]}}
    assert interpreter.get_input_details()[0]["shape_signature"].tolist() == [-1, 32, 32, 3]


@pytest.mark.parametrize("kind", KINDS)
def test_the_keras_file_loads_in_safe_mode_with_built_in_layers_only(kind, exports):
    model = keras.saving.load_model(exports(kind, "keras").root / "model.keras", safe_mode=True)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 3)
    assert model.output_names == [OUTPUT_NAME]
    layer_types = {type(layer).__module__.split(".")[0] for layer in nested_layers(model)}
    assert layer_types == {"keras"}  # nothing of this project, no Lambda
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in nested_layers(model))
    assert all(layer.dtype_policy.name == "float32" for layer in nested_layers(model))
    assert not model.get_layer("vgg19_preprocess").trainable


def test_the_preprocessing_layer_is_exactly_vgg19_preprocess_input():
    pixels = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    pixels[0, 0, 0] = [0, 255, 127.5]
    got = keras.ops.convert_to_numpy(preprocessing_layer()(pixels))
    np.testing.assert_array_equal(got, keras.applications.vgg19.preprocess_input(pixels.copy()))


def test_a_bfloat16_model_is_made_to_compute_in_float32():
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3, dtype="mixed_bfloat16", name="dense")(inputs))
    features = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    compute_in_float32(model)
    got = model(features)
    kernel, bias = model.get_layer("dense").get_weights()
    assert keras.backend.standardize_dtype(got.dtype) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got), features @ kernel + bias, rtol=1e-5, atol=1e-6)


def test_an_unknown_format_is_refused_naming_the_argument(trained, export_settings, tmp_path):
    with pytest.raises(InvalidInput, match=r"format must be one of .*received: 'pdf'"):
        export_version(export_settings, trained["head"], None, "pdf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_with_files_in_it_is_refused_and_left_as_it_was(trained, export_settings, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInput, match=re.escape(str(out))):
        export_version(export_settings, trained["head"], None, "keras", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInput, match="new or empty folder"):
        export_version(export_settings, trained["head"], None, "keras", tmp_path / "file")


def test_an_empty_folder_is_filled_and_a_version_can_be_named(trained, export_settings, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    result = export_version(export_settings, trained["full"], 1, "keras", out)
    assert result.root == out and (out / "model.keras").is_file() and result.version == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_missing_model_or_version_is_not_found(trained, export_settings, tmp_path):
    with pytest.raises(ModelNotFoundError):
        export_version(export_settings, "nobody", None, "keras", tmp_path / "a")
    with pytest.raises(ModelNotFoundError):
        export_version(export_settings, trained["head"], 9, "keras", tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_mid_export_leaves_nothing_at_out(existing, trained, export_settings, tmp_path, monkeypatch):
    def broken_export(self, *args, **kwargs):
        (tmp_path / "started").touch()
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(keras.Model, "export", broken_export)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    with pytest.raises(RuntimeError, match="converter crashed"):
        export_version(export_settings, trained["head"], None, "onnx", out)
    assert (tmp_path / "started").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "started"] if existing else ["started"])
    assert not existing or list(out.iterdir()) == []


def test_tensorflow_formats_need_the_tensorflow_backend(trained, export_settings, tmp_path, monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(InvalidInput, match="TensorFlow backend"):
        export_version(export_settings, trained["head"], None, "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    """Run `python -m training` with the settings' folders, as a user would."""
    env = {**os.environ, "MODEL_DIR": str(settings.model_dir), "DATA_DIR": str(settings.data_dir),
           "BACKBONE_WEIGHTS": "none", "KERAS_HOME": str(settings.keras_home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_cli_writes_an_archive_that_answers_what_the_service_does(trained, export_settings, image_bytes,
                                                                      tmp_path):
    archive = tmp_path / "out" / "digits.tar.gz"
    done = cli(export_settings, "export", "--model", trained["head"], "--format", "keras", "--out", str(archive))
    assert done.returncode == 0, done.stderr
    assert str(archive) in done.stderr
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    model = keras.saving.load_model(tmp_path / "unpacked" / "model.keras", safe_mode=True)
    exported = keras.ops.convert_to_numpy(model(rgb_pixels(image_bytes, 32), training=False))
    served = service_probabilities(export_settings, trained["head"], image_bytes)
    assert (exported.argmax(1) == served.argmax(1)).all() and np.abs(exported - served).max() <= TOLERANCE
    assert (tmp_path / "unpacked" / "labels.txt").read_text().split() == ModelStore(
        export_settings.model_dir).labels(trained["head"], 1)

    again = cli(export_settings, "export", "--model", trained["head"], "--format", "keras", "--out", str(archive))
    missing = cli(export_settings, "export", "--model", "nosuch", "--format", "onnx", "--out", str(tmp_path / "x"))
    for failed, words in ((again, "exists"), (missing, "nosuch")):
        assert failed.returncode == 2 and words in failed.stderr and "Traceback" not in failed.stderr
    assert sorted(p.name for p in archive.parent.iterdir()) == ["digits.tar.gz"]  # no leftovers
