"""The Open Inference Protocol's (KServe V2) tensors on the wire: inference requests in, responses out.

A request is JSON, or, with the binary tensor data extension, a JSON header of
`Inference-Header-Content-Length` bytes followed by the raw data of the inputs that
declare `parameters.binary_data_size`. `BYTES` elements travel as 4-byte little-endian
lengths, each followed by its bytes; in JSON they are strings, here the image files in
base64 (image files are not UTF-8 text). Responses put an output in binary when asked
to (`parameters.binary_data`, or `binary_data_output` for all), as Triton does.

Nothing here knows Flask or models: bad input is an `InvalidInput` (a 400) naming what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Sequence

import numpy as np

from service.base64_images import decode_b64
from training.errors import InvalidInput

HEADER = "Inference-Header-Content-Length"
# Datatypes a tensor may arrive in, as numpy dtypes (little-endian on the wire).
NUMERIC = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
           "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
DATATYPES = (*NUMERIC, "BYTES")
MAX_DIMENSIONS = 8


@dataclasses.dataclass
class Tensor:
    """One input tensor: numeric data as an array of `shape`, or `BYTES` elements as a list of bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]


@dataclasses.dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for: in binary or JSON, and as the top `classification` labels if > 0."""

    name: str
    binary: bool
    classification: int = 0


@dataclasses.dataclass
class InferenceRequest:
    """A parsed inference request."""

    id: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: every output, in binary if `binary_output`
    binary_output: bool


@dataclasses.dataclass
class Output:
    """One output tensor of a response: numeric rows, or `BYTES` strings."""

    name: str
    datatype: str
    data: np.ndarray  # numeric, or an object array of str for BYTES
    binary: bool


def parse_request(body: bytes, header_length: str | None) -> InferenceRequest:
    """Parse an inference request body (JSON, or a JSON header plus binary tensor data)."""
    header, binary = split_body(body, header_length)
    document = parse_json(header)
    parameters = object_field(document, "parameters", "the request's parameters")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput('inputs: send a list of input tensors, e.g. {"inputs": [{"name": "images", '
                           '"datatype": "BYTES", "shape": [1], "data": ["<base64 image>"]}]}')
    tensors, offset = [], 0
    for index, spec in enumerate(inputs):
        tensor, offset = parse_input(spec, index, binary, offset)
        tensors.append(tensor)
    if offset != len(binary):
        raise InvalidInput(f"the binary data after the inference header is {len(binary)} bytes, but the inputs' "
                           f"binary_data_size add up to {offset}")
    request_id = document.get("id")
    return InferenceRequest(id=str(request_id) if request_id is not None else None, inputs=tensors,
                            outputs=parse_outputs(document.get("outputs"), parameters),
                            binary_output=parameters.get("binary_data_output") is True)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary data after it."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidInput(f"{HEADER} must be a whole number of bytes, received: {header_length!r}") from None
    if not 0 < length <= len(body):
        raise InvalidInput(f"{HEADER} is {length}, but the body is {len(body)} bytes")
    return body[:length], body[length:]


def parse_json(header: bytes) -> dict:
    """The inference header as a JSON object."""
    try:
        document = json.loads(header)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        raise InvalidInput("the inference request is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidInput('the inference request must be a JSON object: {"inputs": [...]}')
    return document


def object_field(document: dict, key: str, what: str) -> dict:
    """`document[key]`, an object if present (else empty)."""
    value = document.get(key) or {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, received: {type(value).__name__}")
    return value


def parse_shape(spec: dict, where: str) -> list[int]:
    """A tensor's shape: a short list of whole numbers >= 0."""
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMENSIONS
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise InvalidInput(f"{where}.shape must be a list of at most {MAX_DIMENSIONS} whole numbers >= 0, "
                           f"received: {shape!r}")
    return shape


def parse_input(spec, index: int, binary: bytes, offset: int) -> tuple[Tensor, int]:
    """One input tensor, its data from the JSON or from `binary` at `offset`; and the offset after it."""
    where = f"inputs[{index}]"
    if not isinstance(spec, dict):
        raise InvalidInput(f"{where} must be a JSON object with name, datatype, shape and data")
    name, datatype = spec.get("name"), spec.get("datatype")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}.name must be a string")
    if datatype not in DATATYPES:
        raise InvalidInput(f"{where}.datatype must be one of {', '.join(DATATYPES)}, received: {datatype!r}")
    shape = parse_shape(spec, where)
    parameters = object_field(spec, "parameters", f"{where}.parameters")
    if "shared_memory_region" in parameters:
        raise InvalidInput(f"{where}: shared memory is not supported; send the data in the request")
    size = parameters.get("binary_data_size")
    if size is None:
        return Tensor(name, datatype, shape, json_data(spec.get("data"), datatype, shape, where)), offset
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
        raise InvalidInput(f"{where}.parameters.binary_data_size must be a whole number of bytes within the "
                           f"binary data ({len(binary) - offset} left), received: {size!r}")
    chunk = binary[offset:offset + size]
    return Tensor(name, datatype, shape, binary_data(chunk, datatype, shape, where)), offset + size


def element_count(shape: Sequence[int]) -> int:
    """How many elements a tensor of `shape` holds."""
    return math.prod(shape)


def json_data(data, datatype: str, shape: list[int], where: str) -> np.ndarray | list[bytes]:
    """A tensor's JSON `data` (flat, or nested in row-major order) as an array or a list of bytes."""
    if not isinstance(data, list):
        raise InvalidInput(f"{where}.data must be a list (or give parameters.binary_data_size and send the data "
                           "after the inference header)")
    if datatype == "BYTES":
        flat = flatten(data, where)
        check_count(len(flat), shape, where)
        if not all(isinstance(item, str) for item in flat):
            raise InvalidInput(f"{where}.data: BYTES elements in JSON are strings (image files in base64)")
        return [decode_b64(item, f"{where}.data[{i}]") for i, item in enumerate(flat)]
    try:
        array = np.asarray(data, dtype=NUMERIC[datatype])
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidInput(f"{where}.data must hold {datatype} numbers, in a flat list or nested as the shape") \
            from None
    check_count(array.size, shape, where)
    return array.reshape(shape)


def flatten(data: list, where: str) -> list:
    """Nested lists flattened in row-major order."""
    flat, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > MAX_DIMENSIONS:
                    raise InvalidInput(f"{where}.data is nested deeper than {MAX_DIMENSIONS} dimensions")
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def check_count(count: int, shape: list[int], where: str) -> None:
    """Refuse data whose element count does not match the shape."""
    if count != element_count(shape):
        raise InvalidInput(f"{where}: shape {shape} holds {element_count(shape)} elements, the data has {count}")


def binary_data(chunk: bytes, datatype: str, shape: list[int], where: str) -> np.ndarray | list[bytes]:
    """A tensor's raw data: little-endian numbers, or BYTES as length-prefixed elements."""
    if datatype == "BYTES":
        elements = deserialize_bytes(chunk, where)
        check_count(len(elements), shape, where)
        return elements
    dtype = np.dtype(NUMERIC[datatype])
    if len(chunk) != element_count(shape) * dtype.itemsize:
        raise InvalidInput(f"{where}: shape {shape} of {datatype} is {element_count(shape) * dtype.itemsize} bytes, "
                           f"binary_data_size is {len(chunk)}")
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def deserialize_bytes(chunk: bytes, where: str) -> list[bytes]:
    """BYTES elements from their wire form: each a 4-byte little-endian length, then that many bytes."""
    elements, offset = [], 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise InvalidInput(f"{where}: the BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise InvalidInput(f"{where}: a BYTES element of {length} bytes runs past the data's end")
        elements.append(chunk[offset:offset + length])
        offset += length
    return elements


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements in their wire form."""
    return b"".join(struct.pack("<I", len(item)) + item for item in elements)


def parse_outputs(outputs, parameters: dict) -> list[RequestedOutput] | None:
    """The outputs asked for (None: all), each in binary unless it says otherwise."""
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise InvalidInput("outputs must be a list of {\"name\": ...} objects")
    default_binary = parameters.get("binary_data_output") is True
    requested = []
    for index, spec in enumerate(outputs):
        where = f"outputs[{index}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput(f"{where} must be an object with a name")
        options = object_field(spec, "parameters", f"{where}.parameters")
        if "shared_memory_region" in options:
            raise InvalidInput(f"{where}: shared memory is not supported")
        count = options.get("classification", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise InvalidInput(f"{where}.parameters.classification must be a whole number >= 0, received: {count!r}")
        binary = options.get("binary_data", default_binary)
        requested.append(RequestedOutput(spec["name"], binary is True, count))
    return requested


def classification(probabilities: np.ndarray, classes: Sequence[str], count: int) -> np.ndarray:
    """The classification extension's answer: per row the top `count` as "score:index:label", best first."""
    count = min(count, len(classes))
    rows = []
    for row in probabilities:
        order = np.argsort(-row, kind="stable")[:count]  # ties in class order, as v1's top_k
        rows.append([f"{float(row[i]):.8g}:{i}:{classes[i]}" for i in order])
    return np.array(rows, dtype=object).reshape(len(probabilities), count)


def encode_response(model_name: str, version: int, request_id: str | None,
                    outputs: Sequence[Output]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or a JSON header then the binary outputs."""
    described, chunks = [], []
    for output in outputs:
        tensor = {"name": output.name, "datatype": output.datatype, "shape": list(output.data.shape)}
        if output.binary:
            raw = (serialize_bytes([s.encode() for s in output.data.ravel()]) if output.datatype == "BYTES"
                   else np.ascontiguousarray(output.data, dtype=NUMERIC[output.datatype]).tobytes())
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = output.data.ravel().tolist()
        described.append(tensor)
    document = {"model_name": model_name, "model_version": str(version), "outputs": described}
    if request_id is not None:
        document = {"id": request_id, **document}
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER: str(len(header))}
