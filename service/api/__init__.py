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
from webargs.flaskparser import FlaskParser

from service.api.schemas import ErrorSchema


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


class Api(flask_smorest.Api):
    """flask-smorest Api that leaves error answers to `service.errors` (one handler, one shape)."""

    ERROR_SCHEMA = ErrorSchema

    def _register_error_handlers(self) -> None:
        """Register nothing: `service.errors.init_app` handles every error."""
