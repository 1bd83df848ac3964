"""Schemas of the standard protocols' bodies, for the OpenAPI document: Open Inference Protocol and TF Serving.

Their requests are parsed by `service.open_inference` and `service.api.tfserving` (binary data and
nested tensors do not fit a marshmallow load); these schemas document them and check the answers.
"""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from service.open_inference import DATATYPES


class ServerMetadataSchema(Schema):
    name = fields.String(required=True)
    version = fields.String(required=True)
    extensions = fields.List(fields.String(), required=True)


class LiveSchema(Schema):
    live = fields.Boolean(required=True)


class ReadySchema(Schema):
    ready = fields.Boolean(required=True)
    name = fields.String(metadata={"description": "the model, on a model's ready endpoint"})
    error = fields.String(metadata={"description": "why not, when not ready"})


class TensorMetadataSchema(Schema):
    name = fields.String(required=True)
    datatype = fields.String(required=True)
    shape = fields.List(fields.Integer(), required=True, metadata={"description": "-1: any size"})


class ModelMetadataSchema(Schema):
    name = fields.String(required=True)
    versions = fields.List(fields.String(), required=True)
    platform = fields.String(required=True)
    inputs = fields.List(fields.Nested(TensorMetadataSchema), required=True,
                         metadata={"description": "send one of them: `images` (encoded files) or `pixels`"})
    outputs = fields.List(fields.Nested(TensorMetadataSchema), required=True)


class InputTensorSchema(Schema):
    name = fields.String(required=True, metadata={"description": "`images` or `pixels`"})
    datatype = fields.String(required=True, validate=validate.OneOf(DATATYPES))
    shape = fields.List(fields.Integer(), required=True)
    parameters = fields.Dict(metadata={"description": "`binary_data_size` when the data follows the JSON header"})
    data = fields.List(fields.Raw(), metadata={"description": "row-major; BYTES elements as base64 strings"})


class RequestedOutputSchema(Schema):
    name = fields.String(required=True, metadata={"example": "probabilities"})
    parameters = fields.Dict(metadata={"description": "`binary_data` (bool), `classification` (top k labels)"})


class InferRequestSchema(Schema):
    id = fields.String()
    parameters = fields.Dict(metadata={"description": "`binary_data_output`: every output in binary"})
    inputs = fields.List(fields.Nested(InputTensorSchema), required=True)
    outputs = fields.List(fields.Nested(RequestedOutputSchema))


class OutputTensorSchema(Schema):
    name = fields.String(required=True)
    datatype = fields.String(required=True)
    shape = fields.List(fields.Integer(), required=True)
    parameters = fields.Dict()
    data = fields.List(fields.Raw())


class InferResponseSchema(Schema):
    id = fields.String()
    model_name = fields.String(required=True)
    model_version = fields.String(required=True)
    outputs = fields.List(fields.Nested(OutputTensorSchema), required=True)
