"""TensorFlow Serving's REST API, where it does not clash with v1: `:predict`, `:classify` and `/metadata`.

An app written for TF Serving points its base URL here and keeps working: images as `{"b64": ...}`
(the bare instance, or a named input such as `{"images": {"b64": ...}}`), or RGB pixels (0-255,
already resized) as nested lists, in row (`instances`) or columnar (`inputs`) format. Answers are
TF Serving's: `{"predictions": [[p0, p1, ...], ...]}` for rows, `{"outputs": ...}` for columns,
`{"result": [[[label, score], ...], ...]}` for `:classify`, errors as `{"error": "message"}`.
Without a version, the published version answers (TF Serving: the latest). Model status
(`model_version_status`) is part of `GET /v1/models/{name}[/versions/{v}]` (`service.api.models`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
from flask import current_app, request

from service.api import ProtocolBlueprint
from service.api.schemas import FlatErrorSchema
from service.auth import PREDICT, role
from service.base64_images import decode_b64
from service.errors import limit_body
from service.extensions import get_runtime, get_store
from service.inputs import decoded_body
from training.errors import InvalidInput
from training.store import validate_name

if TYPE_CHECKING:  # the runtime's types: TensorFlow is imported where a prediction runs, not here
    from training.predict import LoadedModel

bp = ProtocolBlueprint("tfserving", __name__, url_prefix="/v1/models",
               description="TensorFlow Serving REST compatibility (:predict, :classify, /metadata)")

SIGNATURES = ("serving_default", "")
BODY = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}},
        "description": 'TF Serving\'s JSON: `{"instances": [{"b64": "..."}]}`, `{"inputs": ...}`, or for '
                       ':classify `{"examples": [{"image": {"b64": "..."}}]}`'}
ERRORS = {400: "Bad JSON, instance or pixels", 404: "No such model or version", 413: "Body over MAX_PREDICT_MB",
          415: "Not an image", 503: "Overloaded or timed out (Retry-After), or weights missing"}


@bp.before_request
def limit_bodies() -> None:
    """These bodies get the prediction routes' limit (MAX_PREDICT_MB)."""
    limit_body(current_app.config["SETTINGS"].max_predict_mb, "MAX_PREDICT_MB")


def document_errors(view):
    """Document the error answers of the predict verbs."""
    for status, description in ERRORS.items():
        view = bp.alt_response(status, schema=FlatErrorSchema, description=description)(view)
    return view


def json_body() -> dict:
    """The request's JSON object (TF Serving allows NaN and Infinity; the pixel check refuses them)."""
    try:
        body = json.loads(decoded_body(request))
    except (ValueError, RecursionError):
        raise InvalidInput("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput('the JSON body must be an object, e.g. {"instances": [{"b64": "..."}]}')
    signature = body.get("signature_name", "")
    if signature not in SIGNATURES:
        raise InvalidInput(f"signature_name: the only signature is 'serving_default', received: {signature!r}")
    return body


def predict_items(body: dict) -> tuple[str, list]:
    """The request's format (`row` or `columnar`) and its items, one per image."""
    if ("instances" in body) == ("inputs" in body):
        raise InvalidInput('send either "instances" (row format) or "inputs" (columnar format), not both or neither')
    if "instances" in body:
        return "row", as_list(body["instances"], "instances")
    inputs = body["inputs"]
    if isinstance(inputs, dict):  # a map of input name to tensor; this model has one input
        if len(inputs) != 1:
            raise InvalidInput(f"inputs: the model has one input (images or pixels), received: {sorted(inputs)}")
        inputs = next(iter(inputs.values()))
    return "columnar", as_list(inputs, "inputs")


def as_list(value, where: str) -> list:
    """A non-empty list of items, within the per-request image limit."""
    limit = current_app.config["MAX_IMAGES_PER_REQUEST"]
    if not isinstance(value, list) or not 1 <= len(value) <= limit:
        count = len(value) if isinstance(value, list) else type(value).__name__
        raise InvalidInput(f"{where} must be a list of 1 to {limit} images, received: {count}")
    return value


def unwrap(item, where: str):
    """An item's tensor: the item itself, or the value of its one named input (`{"images": {"b64": ...}}`)."""
    if isinstance(item, dict) and "b64" not in item:
        if len(item) != 1:
            raise InvalidInput(f"{where}: the model has one input (images or pixels), received: {sorted(item)}")
        return next(iter(item.values()))
    return item


def batch(items: list, where: str) -> tuple[str, list[bytes] | np.ndarray]:
    """The items as encoded images (`{"b64": ...}` each) or as one pixel array (nested lists)."""
    tensors = [unwrap(item, f"{where}[{i}]") for i, item in enumerate(items)]
    if all(isinstance(t, dict) and isinstance(t.get("b64"), str) for t in tensors):
        return "images", [decode_b64(t["b64"], f"{where}[{i}].b64") for i, t in enumerate(tensors)]
    if all(isinstance(t, list) for t in tensors):
        try:
            return "pixels", np.asarray(tensors, dtype=np.float32)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise InvalidInput(f"{where}: pixels must be numbers nested as [H][W][3], the same size for every "
                               "image") from None
    raise InvalidInput(f'{where}: every image is {{"b64": "<base64 file>"}} or RGB pixels nested as [H][W][3]; '
                       "a string alone is not an image (wrap it: {\"b64\": ...})")


def servable(name: str, version: int | None) -> str:
    """The checked model name, once the version is known to exist (TF Serving answers 404 before reading the body)."""
    get_store().resolve_version(validate_name(name), version)
    return name


def score(name: str, version: int | None, items: list, where: str) -> tuple[LoadedModel, np.ndarray]:
    """Score the items with the version through the one runtime."""
    kind, data = batch(items, where)
    runtime = get_runtime()
    return runtime.scores(name, data, version) if kind == "images" else runtime.pixel_scores(name, data, version)


@bp.route("/<name>:predict", methods=["POST"])
@bp.route("/<name>/versions/<int:version>:predict", methods=["POST"])
@role(PREDICT)
@bp.doc(requestBody=BODY)
@bp.response(200, description='`{"predictions": [[p0, ...], ...]}` (rows) or `{"outputs": ...}` (columns), '
                              "probabilities in class order")
@document_errors
def predict(name: str, version: int | None = None):
    """TF Serving's Predict: class probabilities per image, in the version's class order."""
    name, body = servable(name, version), json_body()
    layout, items = predict_items(body)
    _, probabilities = score(name, version, items, "instances" if layout == "row" else "inputs")
    rows = probabilities.astype(np.float32).tolist()
    return {"predictions": rows} if layout == "row" else {"outputs": rows}


def examples(body: dict) -> list:
    """`:classify`'s examples, each reduced to its image feature (the context's features count too)."""
    context = body.get("context") or {}
    if not isinstance(context, dict):
        raise InvalidInput("context must be an object of features")
    items = as_list(body.get("examples"), "examples")
    return [image_feature({**context, **example} if isinstance(example, dict) else example, f"examples[{i}]")
            for i, example in enumerate(items)]


def image_feature(example, where: str):
    """The one feature of an example that is an image (`{"b64": ...}` or pixels).

    Other features (a caption, say) are ignored, as a classifier parsing tf.Examples ignores
    features it does not read.
    """
    if not isinstance(example, dict):
        raise InvalidInput(f'{where}: each example is an object of features, e.g. {{"image": {{"b64": "..."}}}}')
    images = [value for value in example.values()
              if isinstance(value, list) or isinstance(value, dict) and isinstance(value.get("b64"), str)]
    if len(images) != 1:
        raise InvalidInput(f'{where}: give one image feature ({{"b64": "..."}} or pixels), found {len(images)} '
                           f"among {sorted(example)}")
    return images[0]


@bp.route("/<name>:classify", methods=["POST"])
@bp.route("/<name>/versions/<int:version>:classify", methods=["POST"])
@role(PREDICT)
@bp.doc(requestBody=BODY)
@bp.response(200, description='`{"result": [[["label", score], ...], ...]}`: every class, best first')
@document_errors
def classify(name: str, version: int | None = None):
    """TF Serving's Classify: every class with its score, best first, per example."""
    name, body = servable(name, version), json_body()
    model, probabilities = score(name, version, examples(body), "examples")
    order = np.argsort(-probabilities, axis=1, kind="stable")
    return {"result": [[[model.classes[i], float(np.float32(row[i]))] for i in ranks]
                       for row, ranks in zip(probabilities, order)]}


def tensor_info(name: str, dtype: str, dims: list[int]) -> dict:
    """A SignatureDef tensor as TF Serving's metadata answers it."""
    shape = {"dim": [{"size": str(d), "name": ""} for d in dims], "unknown_rank": False}
    return {"dtype": dtype, "tensor_shape": shape, "name": f"serving_default_{name}:0"}


@bp.route("/<name>/metadata", methods=["GET"])
@bp.route("/<name>/versions/<int:version>/metadata", methods=["GET"])
@role(PREDICT)
@bp.response(200, description="TF Serving's GetModelMetadataResponse: the `serving_default` signature")
@bp.alt_response(404, schema=FlatErrorSchema, description="No such model or version")
def metadata(name: str, version: int | None = None):
    """TF Serving's model metadata: the serving signature's inputs (images or pixels) and output."""
    store = get_store()
    number = store.resolve_version(validate_name(name), version)
    size, classes = store.metadata(name, number)["backbone"]["image_size"], store.labels(name, number)
    signature = {"inputs": {"images": tensor_info("images", "DT_STRING", [-1]),
                            "pixels": tensor_info("pixels", "DT_FLOAT", [-1, size, size, 3])},
                 "outputs": {"probabilities": tensor_info("probabilities", "DT_FLOAT", [-1, len(classes)])},
                 "method_name": "tensorflow/serving/predict"}
    return {"model_spec": {"name": name, "signature_name": "", "version": str(number)},
            "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}}}

