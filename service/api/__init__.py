"""HTTP resources: one blueprint module per resource, each exposing `bp`, and how they parse requests.

The blueprints are registered on the `Api` by `create_app`; nothing here imports them, so the
resources, the OpenAPI setup (`service.openapi`) and the app factory import in one direction.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import flask_smorest
from flask.json.provider import DefaultJSONProvider
from flask_smorest.utils import prepare_response
from webargs.flaskparser import FlaskParser

from service.api.schemas import ErrorSchema, FlatErrorSchema


@contextlib.contextmanager
def too_deep_is_invalid() -> Iterator[None]:
    """Turn a JSON document nested too deeply to parse (a RecursionError, so a 500) into invalid JSON (a 400)."""
    try:
        yield
    except RecursionError:
        # JSONDecodeError is the ValueError that Flask and webargs both take for bad JSON; the document
        # is not empty, since webargs takes an error on an empty one for "no body".
        raise json.JSONDecodeError("JSON nested too deeply", "[[...", 0) from None


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON, where a body nested too deeply to parse is invalid JSON (a 400), not a RecursionError (a 500)."""

    def loads(self, s, **kwargs):
        with too_deep_is_invalid():
            return super().loads(s, **kwargs)


class ArgumentsParser(FlaskParser):
    """webargs parser answering invalid arguments with 400 (the API's bad-input status), not 422."""

    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req):
        """The JSON body; one nested too deeply to parse is invalid JSON (a 400), not a RecursionError (a 500)."""
        with too_deep_is_invalid():
            return super()._raw_load_json(req)


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest blueprint whose argument errors are 400s."""

    ARGUMENTS_PARSER = ArgumentsParser()


# The standard protocols' error answer (`{"error": "message"}`), documented as their default response.
PROTOCOL_ERROR = "PROTOCOL_ERROR"


class ProtocolBlueprint(Blueprint):
    """Blueprint of a standard protocol (Open Inference, TF Serving): errors documented as `{"error": "message"}`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._prepare_doc_cbks.append(self._protocol_default_error)

    @staticmethod
    def _protocol_default_error(doc: dict, doc_info: dict, **kwargs) -> dict:
        """Point the operation's default (error) response at the protocol's error shape."""
        if "default" in doc.get("responses", {}):
            doc["responses"]["default"] = PROTOCOL_ERROR
        return doc


class Api(flask_smorest.Api):
    """flask-smorest Api that leaves error answers to `service.errors` (one handler, one shape)."""

    ERROR_SCHEMA = ErrorSchema

    def _register_error_handlers(self) -> None:
        """Register nothing: `service.errors.init_app` handles every error."""

    def _register_responses(self) -> None:
        """Register flask-smorest's responses, and the standard protocols' default error."""
        super()._register_responses()
        response = {"description": 'Error: `{"error": "message"}`', "schema": FlatErrorSchema}
        prepare_response(response, self.spec, self.DEFAULT_RESPONSE_CONTENT_TYPE)
        self.spec.components.response(PROTOCOL_ERROR, response, lazy=True)
