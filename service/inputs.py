"""The images of a predict request: multipart parts named `image`, or JSON `{"instances": [{"b64"}]}`.

The JSON body's schema lives here, with the code that reads it; the API documents it from here.
"""

from __future__ import annotations

import zlib

from flask import Request
from marshmallow import Schema, ValidationError, fields
from werkzeug.exceptions import RequestEntityTooLarge

from service.base64_images import decode_b64
from service.errors import ServiceError, readable

MULTIPART, JSON = "multipart/form-data", "application/json"
# Content-Encodings a body may come in (tritonclient compresses on request), as zlib's wbits.
ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
FIELD = "image"


class InstanceSchema(Schema):
    b64 = fields.String(required=True, metadata={"description": "the image file's bytes, base64-encoded"})


class InstancesSchema(Schema):
    """JSON predict body: `{"instances": [{"b64": "..."}]}`."""

    instances = fields.List(fields.Nested(InstanceSchema), required=True)


def read_images(req: Request, limit: int) -> list[bytes]:
    """Return the request's images as bytes, in order; at least one and at most `limit`."""
    if req.mimetype == MULTIPART:
        return multipart_images(req, limit)
    if req.mimetype == JSON:
        return json_images(req, limit)
    raise ServiceError(f"send multipart/form-data with file field '{FIELD}', or application/json with "
                       f"'instances'; received Content-Type {req.mimetype or 'none'}", 415)


def check_count(count: int, limit: int, hint: str) -> None:
    """Refuse no images, or more than `limit`."""
    if count == 0:
        raise ServiceError(f"no images: {hint}")
    if count > limit:
        raise ServiceError(f"too many images: at most {limit} per request, received {count}")


def multipart_images(req: Request, limit: int) -> list[bytes]:
    """The bytes of the repeatable file field `image`."""
    parts = req.files.getlist(FIELD)
    check_count(len(parts), limit, f"send one or more file parts named '{FIELD}'")
    images = []
    for index, part in enumerate(parts):
        data = part.read()
        if not data:
            raise ServiceError(f"{FIELD}[{index}] is empty")
        images.append(data)
    return images


def json_images(req: Request, limit: int) -> list[bytes]:
    """The decoded `instances[i].b64` strings of a JSON body."""
    read_body(req)
    body = req.get_json(silent=True)  # Parses the body read above.
    if body is None:
        raise ServiceError("the request body is not valid JSON")
    if not isinstance(body, dict):
        raise ServiceError('the JSON body must be an object: {"instances": [{"b64": "..."}]}')
    if isinstance(body.get("instances"), list):  # Count first: one "too many" beats a list of field errors.
        check_count(len(body["instances"]), limit, 'send {"instances": [{"b64": "..."}]}')
    try:
        instances = InstancesSchema().load(body)["instances"]
    except ValidationError as exc:
        raise ServiceError(f"bad JSON body: {readable(exc.messages)}") from None
    return [decode_b64(instance["b64"], f"instances[{index}].b64") for index, instance in enumerate(instances)]


def read_body(req: Request) -> bytes:
    """The whole body; a streamed (chunked) body over MAX_CONTENT_LENGTH is a 413."""
    data = req.get_data(cache=True)
    limit = req.max_content_length
    # Without Content-Length, werkzeug stops reading at the limit and returns what it has,
    # silently cut: one more byte from the server's stream tells a cut body from a whole one.
    if req.content_length is None and limit is not None and len(data) >= limit and req.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    return data


def decoded_body(req: Request) -> bytes:
    """The whole body, decompressed if its Content-Encoding says gzip or deflate; bounded like the raw body."""
    data = read_body(req)
    encoding = req.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding not in ENCODINGS:
        raise ServiceError(f"Content-Encoding must be gzip, deflate or identity, received: {encoding}", 415)
    limit = req.max_content_length or len(data) * 1024
    decompressor = zlib.decompressobj(ENCODINGS[encoding])
    try:
        body = decompressor.decompress(data, limit + 1)  # stops one byte past the limit: no bomb is inflated
    except zlib.error:
        raise ServiceError(f"the body is not valid {encoding} data") from None
    if len(body) > limit:
        raise RequestEntityTooLarge()
    if not decompressor.eof:
        raise ServiceError(f"the {encoding} body is truncated")
    return body
