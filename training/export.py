"""Export a stored model version as one self-contained model file for another runtime.

Every export is one float32 model from RGB pixels (`[N, H, W, 3]`, 0..255, the version's
image size) to class probabilities (`[N, C]`): VGG19's preprocessing is a fixed layer inside
it, then the backbone and head (head-only versions) or the whole fine-tuned model. The
folder written drops into its server as it is: a TensorFlow Serving model base path
(`savedmodel`), a Triton model repository (`onnx`), a LiteRT file (`tflite`) or a Keras file
(`keras`), with `labels.txt` and a README saying how to call it. Keras' own exporters write
the files; a folder appears whole at `out` or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from string import Template

import numpy as np

from training.backbone import build_backbone
from training.errors import InvalidInput
from training.exports import check_format
from training.predict import LoadedModel, backbone_spec, load_version, trained_precision
from training.settings import Settings
from training.store import ModelStore, disk_full_as_error, fsync_dir, fsync_tree

INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"
# Formats written by Keras' TensorFlow exporters; a Keras file saves under any backend.
TENSORFLOW_FORMATS = ("savedmodel", "onnx", "tflite")
ONNX_OPSET = 17  # run by every onnxruntime since 1.14, so by Triton images of recent years
TRITON_MAX_BATCH_SIZE = 64
# The main LiteRT file, then smaller variants the TFLite converter makes by its optimizations.
TFLITE_VARIANTS = {"model.tflite": "float32", "model_float16.tflite": "float16",
                   "model_dynamic_range.tflite": "dynamic_range"}
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the folder, its files and the model they hold."""

    root: Path  # the folder written (== out)
    files: list[Path]  # what was written, relative to root
    model_file: Path  # the main file, relative to root
    name: str
    version: int
    fmt: str
    image_size: int
    classes: list[str]


def export_version(settings: Settings, name: str, version: int | None, fmt: str, out: Path) -> ExportResult:
    """Write version `version` (default: published) of model `name` in format `fmt` into the new folder `out`."""
    check_format(fmt)
    out = Path(out)
    check_out(out)
    check_backend(fmt)
    loaded = load_version(ModelStore.from_settings(settings), name, version)
    started = time.perf_counter()
    log.info("exporting %s v%d (%s) as %s to %s", loaded.name, loaded.version, loaded.kind, fmt, out)
    model = exportable_model(loaded, settings)
    with disk_full_as_error(f"could not export {name!r} v{loaded.version} to {out}"), staging(out) as folder:
        model_file = WRITERS[fmt](model, folder, loaded)
        write_text(folder / "labels.txt", "".join(f"{label}\n" for label in loaded.classes))
        write_text(folder / "README.md", readme(loaded, fmt, model_file))
    log.info("exported %s v%d as %s in %.1f s", loaded.name, loaded.version, fmt, time.perf_counter() - started)
    files = sorted(path.relative_to(out) for path in out.rglob("*") if path.is_file())
    return ExportResult(root=out, files=files, model_file=model_file, name=loaded.name, version=loaded.version,
                        fmt=fmt, image_size=loaded.image_size, classes=list(loaded.classes))


def check_out(out: Path) -> None:
    """Refuse an `out` that is a file or a folder with something in it: an export never overwrites."""
    if out.is_symlink() or out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"out must be a new or empty folder, received: {str(out)!r}")


def check_backend(fmt: str) -> None:
    """Refuse TensorFlow formats under another Keras backend: Keras writes them through TensorFlow."""
    import keras

    backend = keras.backend.backend()
    if fmt in TENSORFLOW_FORMATS and backend != "tensorflow":
        raise InvalidInput(f"format {fmt!r} needs Keras' TensorFlow backend (KERAS_BACKEND=tensorflow, as in the "
                           f"worker image); this process runs {backend!r}")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to write into, flushed and renamed to `out` at the end, removed on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent / f".{out.name}.export-{uuid.uuid4().hex}"
    folder.mkdir()
    try:
        yield folder
        fsync_tree(folder)
        os.rename(folder, out)  # replaces an empty `out`; a folder that gained files meanwhile makes it fail
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file."""
    path.write_text(text, encoding="utf-8")


def preprocessing_layer():
    """VGG19's `preprocess_input` (RGB→BGR, ImageNet mean subtraction) as a fixed, non-trainable 1x1 convolution.

    A built-in layer, so the Keras file loads in safe mode without this project's code and every
    converter knows it; a channel permutation plus a bias is exact in float32.
    """
    import keras
    from keras.applications import vgg19

    # Read off Keras' own function (it is affine), so the two cannot drift apart.
    bias = vgg19.preprocess_input(np.zeros((1, 3), np.float32))[0]
    kernel = np.rint(vgg19.preprocess_input(np.eye(3, dtype=np.float32)) - bias).reshape(1, 1, 3, 3)
    layer = keras.layers.Conv2D(3, 1, name="vgg19_preprocess", dtype="float32")
    layer.build((None, None, None, 3))
    layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    layer.trainable = False
    return layer


def nested_layers(model) -> Iterator:
    """Every layer of `model`, with those of the models inside it."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from nested_layers(layer)


def compute_in_float32(model) -> None:
    """Make every layer of `model` compute in float32 (a bfloat16-trained model already keeps float32 weights)."""
    for layer in nested_layers(model):
        if layer.dtype_policy.name != "float32":
            layer.dtype_policy = "float32"


def exportable_model(loaded: LoadedModel, settings: Settings):
    """One float32 Keras model from RGB pixels (0..255) to probabilities: preprocessing, backbone, head."""
    import keras

    size = loaded.image_size
    pixels = keras.Input((size, size, 3), name=INPUT_NAME, dtype="float32")
    x = preprocessing_layer()(pixels)
    if loaded.kind == "full":
        compute_in_float32(loaded.keras_model)
        x = loaded.keras_model(x)
    else:
        log.info("building the float32 backbone for %s v%d", loaded.name, loaded.version)
        backbone = build_backbone(backbone_spec(loaded, settings), settings.keras_home, "float32")
        x = loaded.keras_model(backbone.model(x))
    probabilities = keras.layers.Identity(name=OUTPUT_NAME)(x)
    return keras.Model(pixels, probabilities, name="classifier")


def input_signature(size: int) -> list:
    """The exported input: any number of RGB images of the version's size."""
    import keras

    return [keras.InputSpec(shape=(None, size, size, 3), dtype="float32", name=INPUT_NAME)]


def with_named_output(model):
    """Wrap `model` so its output is `{OUTPUT_NAME: ...}`: exporters name a dict's outputs by its keys."""
    import keras

    pixels = keras.Input(model.input_shape[1:], name=INPUT_NAME, dtype="float32")
    return keras.Model(pixels, {OUTPUT_NAME: model(pixels)}, name="exported")


def write_savedmodel(model, folder: Path, loaded: LoadedModel) -> Path:
    """Write a TensorFlow Serving model base path: NAME/VERSION/saved_model.pb."""
    path = folder / loaded.name / str(loaded.version)
    path.parent.mkdir()
    log.info("writing the SavedModel")
    write_saved_model_once(with_named_output(model), path, input_signature(loaded.image_size))
    return path.relative_to(folder) / "saved_model.pb"


def write_saved_model_once(model, path: Path, signature: list) -> None:
    """What `model.export(format="tf_saved_model")` writes, with every variable stored once.

    Keras 3.15 stores each variable twice (keras-team/keras#23553): `track()` records the keras.Variable
    wrappers and the traced endpoint captures the tf.Variables inside them, two objects that TensorFlow's
    checkpoint cannot unify, so the file and the memory of every server loading it (TF Serving) double.
    Tracking the tf.Variables themselves lets the checkpoint store each once.
    """
    from keras.export import ExportArchive

    archive = ExportArchive()
    archive.track_and_add_endpoint("serve", model, signature)
    tracked = archive._tf_trackable  # Keras' own collections, filled by track(); no public way to unwrap them
    for collection in ("variables", "trainable_variables", "non_trainable_variables"):
        setattr(tracked, collection, [getattr(v, "value", v) for v in getattr(tracked, collection)])
    archive.write_out(path, verbose=False)


def write_onnx(model, folder: Path, loaded: LoadedModel) -> Path:
    """Write a Triton model repository: NAME/config.pbtxt, NAME/labels.txt, NAME/VERSION/model.onnx."""
    model_dir = folder / loaded.name
    (model_dir / str(loaded.version)).mkdir(parents=True)
    path = model_dir / str(loaded.version) / "model.onnx"
    log.info("converting to ONNX (opset %d)", ONNX_OPSET)
    with statistics_as_constants(model):
        with_named_output(model).export(path, format="onnx", input_signature=input_signature(loaded.image_size),
                                        opset_version=ONNX_OPSET, verbose=False)
    check_onnx_names(path)
    write_text(model_dir / "config.pbtxt", triton_config(loaded))
    write_text(model_dir / "labels.txt", "".join(f"{label}\n" for label in loaded.classes))
    return path.relative_to(folder)


@contextlib.contextmanager
def statistics_as_constants(model) -> Iterator[None]:
    """Hold adapted `Normalization` statistics as numpy arrays while a converter traces `model`.

    Keras keeps them as eager tensors, which a trace captures, and tf2onnx turns every captured
    tensor into a required graph input; numpy arrays are traced as constants instead.
    """
    import keras

    layers = [layer for layer in nested_layers(model) if isinstance(layer, keras.layers.Normalization)]
    kept = [(layer.mean, layer.variance) for layer in layers]
    for layer in layers:
        layer.mean, layer.variance = np.asarray(layer.mean), np.asarray(layer.variance)
    try:
        yield
    finally:
        for layer, (mean, variance) in zip(layers, kept):
            layer.mean, layer.variance = mean, variance


def check_onnx_names(path: Path) -> None:
    """Raise unless the ONNX graph takes only `INPUT_NAME` and gives only `OUTPUT_NAME`, as config.pbtxt says."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    names = ([item.name for item in graph.input], [item.name for item in graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise RuntimeError(f"the ONNX graph has inputs {names[0]} and outputs {names[1]}, "
                           f"not [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")


TRITON_CONFIG = """\
name: "$name"
platform: "onnxruntime_onnx"
max_batch_size: $max_batch
version_policy: { specific: { versions: [ $version ] } }
input [
  {
    name: "$input"
    data_type: TYPE_FP32
    dims: [ $size, $size, 3 ]
  }
]
output [
  {
    name: "$output"
    data_type: TYPE_FP32
    dims: [ $classes_count ]
    label_filename: "labels.txt"
  }
]
dynamic_batching { }
"""


def triton_config(loaded: LoadedModel) -> str:
    """Triton's config.pbtxt: names and shapes as in the ONNX graph, labels for the classification extension."""
    return Template(TRITON_CONFIG).substitute(name=loaded.name, version=loaded.version, size=loaded.image_size,
                                              classes_count=len(loaded.classes), input=INPUT_NAME,
                                              output=OUTPUT_NAME, max_batch=TRITON_MAX_BATCH_SIZE)


def tflite_options(variant: str) -> dict:
    """TFLite converter settings of a variant; builtin ops only, so no Flex delegate is ever needed."""
    import tensorflow as tf

    options: dict = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if variant != "float32":
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]  # alone: dynamic-range quantization (int8 weights)
    if variant == "float16":
        options["target_spec"]["supported_types"] = [tf.float16]
    return options


def write_tflite(model, folder: Path, loaded: LoadedModel) -> Path:
    """Write model.tflite (float32) and its float16 and dynamic-range variants."""
    named = with_named_output(model)
    for filename, variant in TFLITE_VARIANTS.items():
        log.info("converting to LiteRT (%s)", variant)
        named.export(folder / filename, format="litert", input_signature=input_signature(loaded.image_size),
                     verbose=False, **tflite_options(variant))
    return Path("model.tflite")


def write_keras(model, folder: Path, loaded: LoadedModel) -> Path:
    """Write model.keras (loads with safe_mode=True, without this project's code)."""
    log.info("saving the Keras file")
    model.save(folder / "model.keras")
    return Path("model.keras")


WRITERS = {"savedmodel": write_savedmodel, "onnx": write_onnx, "tflite": write_tflite, "keras": write_keras}

# How to call each format; $-placeholders are filled by `readme`.
USAGE = {
    "savedmodel": """\
```python
import tensorflow as tf

model = tf.saved_model.load("$name/$version")
probabilities = model.signatures["serving_default"]($input=tf.constant(pixels))["$output"].numpy()
```

TensorFlow Serving, with `$name` as the model base path (its subfolder `$version` is the version):

```sh
docker run --rm -p 8501:8501 -v "$$PWD/$name:/models/$name" -e MODEL_NAME=$name tensorflow/serving
curl -s -d '{"instances": [...]}' http://localhost:8501/v1/models/$name:predict
```
Each instance is one image, `$size x $size x 3` nested lists of numbers (or `{"$input": ...}`); each of the
answer's `predictions` is that image's $classes_count probabilities.
""",
    "onnx": """\
```python
import onnxruntime as ort

session = ort.InferenceSession("$name/$version/model.onnx", providers=["CPUExecutionProvider"])
(probabilities,) = session.run(["$output"], {"$input": pixels})
```

Triton Inference Server, with this folder as the model repository (`config.pbtxt` allows batches of up to
$max_batch images and names the labels, so the classification extension answers with them):

```sh
docker run --rm -p 8000:8000 -p 8001:8001 -v "$$PWD:/models" nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
    tritonserver --model-repository=/models
```
""",
    "tflite": """\
```python
from ai_edge_litert.interpreter import Interpreter

interpreter = Interpreter("model.tflite")
runner = interpreter.get_signature_runner("serving_default")
probabilities = runner($input=pixels)["$output"]
```
`model_float16.tflite` (float16 weights, half the size) and `model_dynamic_range.tflite` (int8 weights and
activations quantized on the fly, a quarter of the size) take the same input; their probabilities differ more
from the service's, the dynamic-range one enough to change some top-1 answers: check it on your own images.
""",
    "keras": """\
```python
import keras

model = keras.saving.load_model("model.keras", safe_mode=True)
probabilities = model.predict(pixels)
```
""",
}

README = """\
# $name v$version ($fmt)

Exported from the model store: a $kind version, image size $size px, $classes_count classes.
One self-contained float32 model: VGG19's preprocessing (RGB→BGR, ImageNet mean subtraction) is inside it.

- Input `$input`: float32 `[N, $size, $size, 3]`, RGB pixels 0..255.
- Output `$output`: float32 `[N, $classes_count]`, class probabilities in the order of `labels.txt`.
- Main file: `$model_file`.
$precision_note
Classes, in output order:

$class_list

## Preparing images

Decode to RGB (upright by the EXIF orientation, transparent areas on white), resize to $size x $size by
squashing (no crop) with area interpolation, and pass float32 values 0..255 with no other normalisation:

```python
import cv2
import numpy as np
from PIL import Image, ImageOps

image = ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB")
pixels = cv2.resize(np.asarray(image), ($size, $size), interpolation=cv2.INTER_AREA).astype(np.float32)[None]
```

## Calling it

Paths are relative to this folder; `pixels` is the array made above.

$usage"""


def readme(loaded: LoadedModel, fmt: str, model_file: Path) -> str:
    """The export's README: what the model takes and gives, its classes, and how to call it."""
    precision = trained_precision(loaded.metadata)
    note = "" if precision == "float32" else (
        f"- Trained in {precision}, exported in float32: its probabilities agree less closely with the "
        f"service's (which computes in {precision}) than a float32 version's do.\n")
    values = {"name": loaded.name, "version": loaded.version, "fmt": fmt, "kind": loaded.kind,
              "size": loaded.image_size, "classes_count": len(loaded.classes), "input": INPUT_NAME,
              "output": OUTPUT_NAME, "model_file": model_file.as_posix(), "max_batch": TRITON_MAX_BATCH_SIZE,
              "precision_note": note, "class_list": "\n".join(f"{i}. {label}" for i, label in
                                                               enumerate(loaded.classes))}
    usage = Template(USAGE[fmt]).substitute(values)
    return Template(README).substitute(values, usage=usage)
