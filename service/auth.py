"""API keys: a training key (everything) and a prediction key (predict + read models).

Every view needs the training key unless marked otherwise with `@role(PUBLIC)` or
`@role(PREDICT)`, so a new endpoint is closed until someone decides it should not be.
With no key configured everything is open, and the service may only listen on loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable, Iterable

from flask import Flask, current_app, request

from service.errors import ServiceError
from training.settings import Settings

PUBLIC, PREDICT, TRAIN = "public", "predict", "train"
# Endpoints registered by libraries or helpers, which cannot carry the role mark.
PUBLIC_ENDPOINTS = {"api-docs.openapi_json", "api-docs.openapi_swagger_ui", "docs_assets.asset", "static"}

logger = logging.getLogger("service.auth")


def role(name: str) -> Callable:
    """Mark a view with the role it needs: PUBLIC, PREDICT (either key) or TRAIN (the default)."""
    if name not in (PUBLIC, PREDICT, TRAIN):
        raise ValueError(f"role must be one of {PUBLIC}, {PREDICT}, {TRAIN}; received: {name!r}")

    def mark(view: Callable) -> Callable:
        view.auth_role = name
        return view

    return mark


def presented_key() -> str | None:
    """The key sent with the request: `Authorization: Bearer <key>` or `X-API-Key`."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key", "").strip() or None


def matches(key: str, expected: str | None) -> bool:
    """Compare keys in constant time (bytes: compare_digest refuses non-ASCII text)."""
    return expected is not None and hmac.compare_digest(key.encode(), expected.encode())


def needed_role() -> str:
    """The role the matched view needs (unmatched URLs pass, to answer 404/405)."""
    if request.endpoint is None or request.endpoint in PUBLIC_ENDPOINTS:
        return PUBLIC
    view = current_app.view_functions.get(request.endpoint)
    return getattr(view, "auth_role", TRAIN)


def check_key() -> None:
    """Refuse the request with 401 (no or unknown key) or 403 (prediction key, training endpoint)."""
    settings: Settings = current_app.config["SETTINGS"]
    needed = needed_role()
    if not keys_configured(settings) or needed == PUBLIC:
        return
    key = presented_key()
    challenge = {"WWW-Authenticate": 'Bearer realm="classifier"'}
    if key is None:
        raise ServiceError("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key'", 401,
                           headers=challenge)
    if matches(key, settings.training_api_key):
        return
    if matches(key, settings.prediction_api_key):
        if needed == PREDICT:
            return
        raise ServiceError("this endpoint needs the training key; the prediction key may only predict and read "
                           "models", 403)
    raise ServiceError("unknown API key", 401, headers=challenge)


def keys_configured(settings: Settings) -> bool:
    """Whether any API key is set."""
    return bool(settings.training_api_key or settings.prediction_api_key)


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    host = host.strip()
    if host.startswith(("unix:", "fd://")):
        return True  # A local socket or one handed over by systemd: no network exposure of its own.
    if host.startswith("["):  # "[::1]:8000"
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:  # "127.0.0.1:8000"
        host = host.partition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, addresses: Iterable[str]) -> None:
    """Exit with a clear message if no key is configured and an address is not loopback."""
    if keys_configured(settings):
        return
    exposed = [address for address in addresses if not is_loopback(address)]
    if exposed:
        raise SystemExit(
            f"refusing to listen on {', '.join(exposed)} without API keys: set TRAINING_API_KEY (and "
            "PREDICTION_API_KEY), or listen on loopback only (HOST=127.0.0.1)"
        )


def init_app(app: Flask) -> None:
    """Check API keys before every request; warn when none is configured."""
    if not keys_configured(app.config["SETTINGS"]):
        logger.warning("no API keys configured (TRAINING_API_KEY, PREDICTION_API_KEY): every endpoint is open; "
                       "listen on loopback only")
    app.before_request(check_key)
