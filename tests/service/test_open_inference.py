"""The Open Inference Protocol codec: tritonclient's encodings read back exactly, and any body is a clear 400.

The decoder reads untrusted bytes, so it is fuzzed: whatever the body and header length, it
answers with a parsed request or an `InvalidInput`, never another exception.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import serialize_byte_tensor

from service.open_inference import (
    HEADER,
    Output,
    classification,
    deserialize_bytes,
    encode_response,
    parse_request,
    serialize_bytes,
)
from training.errors import InvalidInput


def triton_body(inputs, outputs=None) -> tuple[bytes, str | None]:
    """A request body as tritonclient sends it, and its header length (None: plain JSON)."""
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    return body, None if json_size is None else str(json_size)


def test_bytes_elements_match_tritonclients_wire_form():
    elements = [b"", b"\x00\xff", b"a" * 300]
    assert serialize_bytes(elements) == serialize_byte_tensor(np.array(elements, dtype=object)).item()
    assert deserialize_bytes(serialize_bytes(elements), "x") == elements


@pytest.mark.parametrize("binary", [True, False])
def test_numeric_inputs_read_back_exactly(binary):
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    request = parse_request(*triton_body([tensor], [triton.InferRequestedOutput("probabilities", class_count=2)]))
    np.testing.assert_array_equal(request.inputs[0].data, pixels)
    assert request.outputs[0].classification == 2 and request.outputs[0].binary


def test_binary_outputs_decode_with_tritonclient():
    probabilities = np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)
    labels = classification(probabilities, ["cat", "dog"], 2)
    body, headers = encode_response("m", 3, "req-1", [Output("probabilities", "FP32", probabilities, True),
                                                      Output("top", "BYTES", labels, True)])
    result = triton.InferResult.from_response_body(body, header_length=int(headers[HEADER]))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    assert result.as_numpy("top").tolist() == [[b"0.75:1:dog", b"0.25:0:cat"], [b"0.5:0:cat", b"0.5:1:dog"]]
    assert result.get_response()["model_version"] == "3" and result.get_response()["id"] == "req-1"


def test_json_outputs_are_plain_json():
    body, headers = encode_response("m", 1, None, [Output("probabilities", "FP32", np.ones((1, 2), np.float32),
                                                          False)])
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(body)["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [1, 2],
                                            "data": [1.0, 1.0]}]


def test_nested_json_data_is_read_in_row_major_order():
    document = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2], "data": [[[1, 2], [3, 4]]]}]}
    request = parse_request(json.dumps(document).encode(), None)
    assert request.inputs[0].data.tolist() == [[[1, 2], [3, 4]]]


TENSOR = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.text(max_size=8), st.integers(), st.none()),
    "datatype": st.sampled_from(["BYTES", "FP32", "UINT8", "INT64", "BOOL", "FP99", 3]),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=5), st.text(max_size=3)),
    "data": st.recursive(st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=6), st.none()),
                         lambda inner: st.lists(inner, max_size=4), max_leaves=20),
    "parameters": st.one_of(st.dictionaries(st.sampled_from(["binary_data_size", "shared_memory_region"]),
                                            st.one_of(st.integers(-3, 40), st.text(max_size=3))), st.integers()),
})
DOCUMENT = st.fixed_dictionaries({}, optional={
    "inputs": st.one_of(st.lists(TENSOR, max_size=3), st.text(max_size=3)),
    "outputs": st.one_of(st.lists(st.dictionaries(st.sampled_from(["name", "parameters"]),
                                                  st.one_of(st.text(max_size=5), st.dictionaries(
                                                      st.sampled_from(["binary_data", "classification"]),
                                                      st.one_of(st.booleans(), st.integers(-2, 5))))),
                                  max_size=2), st.integers()),
    "parameters": st.one_of(st.dictionaries(st.just("binary_data_output"), st.booleans()), st.text(max_size=2)),
    "id": st.one_of(st.text(max_size=5), st.integers()),
})


@given(document=DOCUMENT, tail=st.binary(max_size=64), header=st.one_of(st.none(), st.integers(-5, 400),
                                                                       st.text(max_size=4)))
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_any_body_is_parsed_or_refused_with_a_reason(document, tail, header):
    head = json.dumps(document).encode()
    if isinstance(header, int) and header == 0:
        header = len(head)  # the right length, so the binary part after it is what gets fuzzed
    try:
        parse_request(head + tail, None if header is None else str(header))
    except InvalidInput as exc:
        assert exc.message


@given(body=st.binary(max_size=200))
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_any_bytes_are_parsed_or_refused_with_a_reason(body):
    try:
        parse_request(body, None)
    except InvalidInput as exc:
        assert exc.message
