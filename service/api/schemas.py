"""Marshmallow schemas of the API: they validate input and document the OpenAPI spec."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from training.data.store import STATUSES as DATASET_STATUSES
from training.exports import FORMATS as EXPORT_FORMATS

MAX_TOP_K = 100


class ErrorDetailSchema(Schema):
    code = fields.String(required=True, metadata={"example": "not_found"})
    message = fields.String(required=True, metadata={"example": "no model named 'cats'"})


class ErrorSchema(Schema):
    """Every error answer: `{"error": {"code", "message"}}`."""

    error = fields.Nested(ErrorDetailSchema, required=True)


class FlatErrorSchema(Schema):
    """The standard protocols' error answer (Open Inference Protocol, TF Serving): `{"error": "message"}`."""

    error = fields.String(required=True, metadata={"example": "no model named 'cats'"})


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={"example": "ok"})


class ReadinessSchema(Schema):
    status = fields.String(required=True, metadata={"description": "`ready` or `not_ready`"})
    checks = fields.Dict(keys=fields.String(), values=fields.String(),
                         metadata={"description": "component → `ok` or the reason it is not ready"})
    error = fields.Nested(ErrorDetailSchema, metadata={"description": "present when not ready"})


class ModelSummarySchema(Schema):
    name = fields.String(required=True)
    versions = fields.List(fields.Integer(), required=True)
    published = fields.Integer(allow_none=True, metadata={"description": "published version, or null"})
    classes = fields.List(fields.String(), metadata={"description": "classes of the published (else latest) version"})
    accuracy = fields.Float(allow_none=True, metadata={"description": "validation accuracy of the published version"})
    url = fields.String()


class ModelListSchema(Schema):
    models = fields.List(fields.Nested(ModelSummarySchema), required=True)


class VersionSchema(Schema):
    """One stored version: its metadata.json, with its number, publish state and plot URLs."""

    version = fields.Integer(required=True)
    published = fields.Boolean(required=True)
    name = fields.String()
    kind = fields.String(metadata={"description": "`head` (shared backbone) or `full` (fine-tuned)"})
    classes = fields.List(fields.String())
    metrics = fields.Dict()
    params = fields.Dict()
    dataset = fields.Dict()
    backbone = fields.Dict()
    preprocessing = fields.Raw()
    history = fields.Dict()
    features_computed = fields.Integer()
    library_versions = fields.Dict()
    created = fields.String()
    training_seconds = fields.Float()
    timings = fields.Dict()
    plots = fields.Dict(keys=fields.String(), values=fields.String(),
                        metadata={"description": "plot file name → URL of the PNG"})


class StatusSchema(Schema):
    error_code = fields.String(required=True, metadata={"example": "OK"})
    error_message = fields.String(required=True)


class VersionStatusSchema(Schema):
    """A version's state as TensorFlow Serving's model status API answers it."""

    version = fields.String(required=True)
    state = fields.String(required=True, metadata={"example": "AVAILABLE"})
    status = fields.Nested(StatusSchema, required=True)


class ModelSchema(Schema):
    name = fields.String(required=True)
    published = fields.Integer(allow_none=True)
    versions = fields.List(fields.Nested(VersionSchema), required=True)
    model_version_status = fields.List(fields.Nested(VersionStatusSchema), required=True,
                                       metadata={"description": "TF Serving's model status, newest first"})


class VersionDetailSchema(VersionSchema):
    """One version, with TF Serving's model status of it."""

    model_version_status = fields.List(fields.Nested(VersionStatusSchema), required=True)


class PublishSchema(Schema):
    version = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))


class PublishedSchema(Schema):
    name = fields.String(required=True)
    published = fields.Integer(required=True)


class PredictQuerySchema(Schema):
    top_k = fields.Integer(load_default=3, validate=validate.Range(min=1, max=MAX_TOP_K),
                           metadata={"description": "how many classes to list per image"})
    version = fields.Integer(validate=validate.Range(min=1),
                             metadata={"description": "model version (default: the published one)"})


class PredictManyQuerySchema(Schema):
    models = fields.String(required=True, validate=validate.Length(min=1),
                           metadata={"description": "comma-separated model names", "example": "parts,defects"})
    top_k = fields.Integer(load_default=3, validate=validate.Range(min=1, max=MAX_TOP_K))


class LabelSchema(Schema):
    label = fields.String(required=True)
    probability = fields.Float(required=True)


class PredictionSchema(LabelSchema):
    top_k = fields.List(fields.Nested(LabelSchema), required=True)


class PredictionsSchema(Schema):
    model = fields.String(required=True)
    version = fields.Integer(required=True)
    predictions = fields.List(fields.Nested(PredictionSchema), required=True,
                              metadata={"description": "one per image, in input order"})


class PredictManySchema(Schema):
    results = fields.List(fields.Nested(PredictionsSchema), required=True, metadata={"description": "one per model"})


class SkippedSchema(Schema):
    path = fields.String(required=True)
    reason = fields.String(required=True)


class DatasetSchema(Schema):
    """An uploaded dataset, kept by content: `queued → ingesting → ready | failed`, with its report once ready."""

    id = fields.String(required=True, metadata={"description": "16 hex characters of the archive's sha256"})
    status = fields.String(required=True, validate=validate.OneOf(DATASET_STATUSES),
                           metadata={"description": "queued|ingesting|ready|failed: an ingest worker unpacks, checks "
                                                    "and deduplicates the archive once; follow `url` until ready"})
    error = fields.String(allow_none=True, metadata={"description": "why the dataset cannot be trained on (failed)"})
    classes = fields.Dict(keys=fields.String(), values=fields.Integer(),
                          metadata={"description": "class label → number of images (once ready)"})
    images = fields.Integer(metadata={"description": "usable images (once ready)"})
    skipped = fields.List(fields.Nested(SkippedSchema), metadata={"description": "files left out, and why"})
    duplicates = fields.List(fields.Dict(), metadata={"description": "exact copies dropped"})
    conflicts = fields.List(fields.Dict(), metadata={"description": "images filed under two labels, dropped"})
    warnings = fields.List(fields.String())
    content_id = fields.String(metadata={"description": "hash of the labeled images (same for two packings)"})
    sha256 = fields.String()
    size = fields.Integer(metadata={"description": "archive size in bytes"})
    filename = fields.String(allow_none=True, metadata={"description": "the uploaded file's name, made safe"})
    created = fields.String()
    started = fields.String(metadata={"description": "when its ingest started"})
    finished = fields.String(metadata={"description": "when its ingest ended"})
    attempts = fields.Integer(metadata={"description": "ingests started; one whose process died is started again, "
                                                       "at most 3 times"})
    existing = fields.Boolean(metadata={"description": "true when the same bytes were uploaded before"})
    url = fields.String()


class DatasetListSchema(Schema):
    datasets = fields.List(fields.Nested(DatasetSchema), required=True)


class JobSchema(Schema):
    """A training job: `queued → running → succeeded | failed | cancelled`."""

    id = fields.String(required=True)
    model = fields.String()
    dataset = fields.String()
    params = fields.Dict(metadata={"description": "training options as given"})
    status = fields.String(required=True, metadata={"description": "queued|running|succeeded|failed|cancelled"})
    progress = fields.Dict(allow_none=True, metadata={"description": "{phase, current, total, epoch, metrics}"})
    result = fields.Dict(allow_none=True, metadata={"description": "{version, published, metrics}"})
    error = fields.String(allow_none=True)
    cancel_requested = fields.Boolean()
    cancel_requested_at = fields.String(allow_none=True, metadata={
        "description": "when the first cancel was asked; a run still going JOB_CANCEL_GRACE_SECONDS later is killed"})
    attempts = fields.Integer()
    created_at = fields.String()
    started_at = fields.String(allow_none=True)
    finished_at = fields.String(allow_none=True)
    heartbeat_at = fields.String(allow_none=True)
    idempotency_key = fields.String(allow_none=True, metadata={"description": "the train request's Idempotency-Key"})
    url = fields.String(required=True)


class JobEnvelopeSchema(Schema):
    job = fields.Nested(JobSchema, required=True)
    dataset = fields.Nested(DatasetSchema, metadata={"description": "the uploaded dataset (multipart form only); "
                                                                    "the job ingests it as its first phase"})


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema), required=True)


class JobListQuerySchema(Schema):
    status = fields.String(validate=validate.OneOf(("queued", "running", "succeeded", "failed", "cancelled")),
                           metadata={"description": "only jobs with this status"})
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))


class ExportQuerySchema(Schema):
    format = fields.String(required=True, validate=validate.OneOf(EXPORT_FORMATS),
                           metadata={"description": "savedmodel (a TF Serving model base path), onnx (a Triton model "
                                                    "repository), tflite or keras"})


class ExportSchema(Schema):
    model = fields.String(required=True)
    version = fields.Integer(required=True)
    format = fields.String(required=True)
    status = fields.String(required=True, metadata={"description": "`queued` or `running`"})
    url = fields.String(required=True, metadata={"description": "ask again here after Retry-After"})


class ExportStatusSchema(Schema):
    export = fields.Nested(ExportSchema, required=True)
