"""The Open Inference Protocol (KServe V2, as NVIDIA Triton speaks it) over REST, beside the v1 API.

The same runtime, batching, keys and limits as v1: an image sent here is scored exactly as by
`POST /v1/models/{name}/predict`. Inputs are `images` (encoded files, `BYTES [N]`) or `pixels`
(RGB 0-255 already resized, `FP32`/`UINT8 [N, H, W, 3]`); the output is `probabilities`
(`FP32 [N, C]`), or its top k as "score:index:label" strings with the classification extension.
Errors are the protocol's `{"error": "message"}` (see `service.errors`), with v1's statuses.
"""

from __future__ import annotations

import numpy as np
from flask import Response, current_app, request

from service.api import ProtocolBlueprint
from service.api.health import readiness
from service.api.protocol_schemas import (
    InferRequestSchema,
    InferResponseSchema,
    LiveSchema,
    ModelMetadataSchema,
    ReadySchema,
    ServerMetadataSchema,
)
from service.api.schemas import FlatErrorSchema
from service.auth import PREDICT, PUBLIC, role
from service.errors import ServiceError, limit_body
from service.extensions import get_runtime, get_store
from service.inputs import decoded_body
from service.open_inference import (
    HEADER,
    InferenceRequest,
    Output,
    Tensor,
    classification,
    encode_response,
    parse_request,
)
from training.store import validate_name

bp = ProtocolBlueprint("inference_v2", __name__, url_prefix="/v2",
               description="Open Inference Protocol (KServe V2): Triton and KServe clients")

SERVER_NAME = "image-classifier"
SERVER_VERSION = "1"  # the API's version, as in /v1
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORM = "keras_vgg19_transfer"
IMAGES, PIXELS, PROBABILITIES = "images", "pixels", "probabilities"
PIXEL_TYPES = ("FP32", "FP16", "FP64", "UINT8")
INFER_BODY = {
    "required": True,
    "description": f"JSON, or with `{HEADER}` a JSON header followed by the inputs' binary data "
                   "(the binary tensor data extension, tritonclient's default).",
    "content": {"application/json": {"schema": InferRequestSchema},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}
INFER_ERRORS = {400: "Bad tensor, shape, datatype or image", 404: "No such model or version",
                413: "Body over MAX_PREDICT_MB", 415: "Not an image, or an unknown Content-Encoding",
                503: "Overloaded or timed out (Retry-After), weights missing, or the runtime not ready"}


@bp.before_request
def limit_inference_bodies() -> None:
    """Inference bodies get the prediction routes' limit (MAX_PREDICT_MB)."""
    limit_body(current_app.config["SETTINGS"].max_predict_mb, "MAX_PREDICT_MB")


@bp.route("", methods=["GET"])
@role(PUBLIC)
@bp.doc(security=[])
@bp.response(200, ServerMetadataSchema)
def server_metadata():
    """Server metadata: name, version and the protocol extensions supported."""
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}


@bp.route("/health/live", methods=["GET"])
@role(PUBLIC)
@bp.doc(security=[])
@bp.response(200, LiveSchema)
def live():
    """Server liveness: the process answers."""
    return {"live": True}


@bp.route("/health/ready", methods=["GET"])
@role(PUBLIC)
@bp.doc(security=[])
@bp.response(200, ReadySchema)
@bp.alt_response(503, schema=ReadySchema, description="Not ready: `error` says why")
def ready():
    """Server readiness: the same checks as /readyz."""
    _, problem = readiness()
    return ({"ready": True}, 200) if not problem else ({"ready": False, "error": problem}, 503, {"Retry-After": "5"})


def metadata(name: str, version: int | None) -> dict:
    """A version's tensors (default: the published version), and every version of the model."""
    store = get_store()
    number = store.resolve_version(validate_name(name), version)
    size, classes = store.metadata(name, number)["backbone"]["image_size"], store.labels(name, number)
    return {"name": name, "versions": [str(v) for v in store.versions(name)], "platform": PLATFORM,
            "inputs": [{"name": IMAGES, "datatype": "BYTES", "shape": [-1]},
                       {"name": PIXELS, "datatype": "FP32", "shape": [-1, size, size, 3]}],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(classes)]}]}


@bp.route("/models/<name>", methods=["GET"])
@bp.route("/models/<name>/versions/<int:version>", methods=["GET"])
@role(PREDICT)
@bp.response(200, ModelMetadataSchema)
@bp.alt_response(404, schema=FlatErrorSchema, description="No such model or version")
def model_metadata(name: str, version: int | None = None):
    """Model metadata: versions, and the input and output tensors' names, datatypes and shapes."""
    return metadata(name, version)


@bp.route("/models/<name>/ready", methods=["GET"])
@bp.route("/models/<name>/versions/<int:version>/ready", methods=["GET"])
@role(PREDICT)
@bp.response(200, ReadySchema)
@bp.alt_response(404, schema=FlatErrorSchema, description="No such model or version")
@bp.alt_response(503, schema=ReadySchema, description="The backbone weights are missing")
def model_ready(name: str, version: int | None = None):
    """Model readiness: the version exists with its model file, and the backbone weights are there."""
    store = get_store()
    store.model_path(validate_name(name), store.resolve_version(name, version))
    problem = get_runtime().readiness()["backbone"]
    if problem == "ok":
        return {"name": name, "ready": True}
    return {"name": name, "ready": False, "error": problem}, 503, {"Retry-After": "5"}


def document_infer_errors(view):
    """Document the error answers of infer."""
    for status, description in INFER_ERRORS.items():
        view = bp.alt_response(status, schema=FlatErrorSchema, description=description)(view)
    return view


def the_input(inference: InferenceRequest) -> Tensor:
    """The one input tensor, `images` or `pixels`, within the per-request image limit."""
    if len(inference.inputs) != 1 or inference.inputs[0].name not in (IMAGES, PIXELS):
        names = [tensor.name for tensor in inference.inputs]
        raise ServiceError(f"inputs: send one tensor, named '{IMAGES}' (BYTES, encoded image files) or '{PIXELS}' "
                           f"({'/'.join(PIXEL_TYPES)} [N, H, W, 3]); received: {names}")
    tensor = inference.inputs[0]
    expected = ("BYTES",) if tensor.name == IMAGES else PIXEL_TYPES
    if tensor.datatype not in expected:
        raise ServiceError(f"input '{tensor.name}' must be {' or '.join(expected)}, received: {tensor.datatype}")
    count = len(tensor.data) if tensor.name == IMAGES else (tensor.shape[0] if tensor.shape else 0)
    limit = current_app.config["MAX_IMAGES_PER_REQUEST"]
    if not 1 <= count <= limit:
        raise ServiceError(f"input '{tensor.name}' must hold 1 to {limit} images, received: {count}")
    return tensor


def check_outputs(inference: InferenceRequest) -> None:
    """Refuse outputs other than `probabilities`, before any image is scored."""
    wanted = inference.outputs
    if wanted is not None and (not wanted or any(output.name != PROBABILITIES for output in wanted)):
        raise ServiceError(f"outputs: the only output is '{PROBABILITIES}'; received: {[o.name for o in wanted]}")


def outputs(inference: InferenceRequest, probabilities: np.ndarray, classes: list[str]) -> list[Output]:
    """The outputs asked for: `probabilities`, as numbers or as the classification extension's labels."""
    probabilities = probabilities.astype(np.float32)
    wanted = inference.outputs
    if wanted is None:
        return [Output(PROBABILITIES, "FP32", probabilities, inference.binary_output)]
    return [Output(PROBABILITIES, "BYTES", classification(probabilities, classes, output.classification), output.binary)
            if output.classification else Output(PROBABILITIES, "FP32", probabilities, output.binary)
            for output in wanted]


@bp.route("/models/<name>/infer", methods=["POST"])
@bp.route("/models/<name>/versions/<int:version>/infer", methods=["POST"])
@role(PREDICT)
@bp.doc(requestBody=INFER_BODY)
@bp.response(200, InferResponseSchema, description="JSON, or with binary outputs a JSON header (its length in "
                                                    f"`{HEADER}`) followed by the outputs' data")
@document_infer_errors
def infer(name: str, version: int | None = None):
    """Classify images: `images` (encoded files) or `pixels`; answers `probabilities`, or its top k labels."""
    name = validate_name(name)
    inference = parse_request(decoded_body(request), request.headers.get(HEADER))
    tensor = the_input(inference)
    check_outputs(inference)
    if tensor.name == IMAGES:
        model, probabilities = get_runtime().scores(name, tensor.data, version)
    else:
        model, probabilities = get_runtime().pixel_scores(name, np.asarray(tensor.data, np.float32), version)
    body, headers = encode_response(name, model.version, inference.id, outputs(inference, probabilities,
                                                                                 model.classes))
    return Response(body, 200, headers)
