"""The web page: one HTML page at `/` over the v1 API, its assets served from this server.

The page and its files are public (no key is needed to load them); every API call the
page makes carries the key typed into it. Assets live in `service/static/` and are served
by Flask's own static route (`/static/...`), so nothing comes from another host: the
service runs without internet. The page's Content-Security-Policy enforces that.
"""

from __future__ import annotations

from flask import Blueprint, Flask, current_app, render_template

from service.auth import PUBLIC, keys_configured, role

bp = Blueprint("web", __name__)

# Only this server: scripts, styles, fetch() and images (plus blob: for previews of picked files).
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                           "form-action 'self'")


@bp.route("/", methods=["GET"])
@role(PUBLIC)
def index():
    """Serve the page."""
    page = render_template("index.html", keys_required=keys_configured(current_app.config["SETTINGS"]))
    headers = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
    return page, 200, headers


def init_app(app: Flask) -> None:
    """Register the page's blueprint."""
    # Assets are revalidated on every load (a cheap 304 while unchanged), so after an upgrade no
    # browser runs an old app.js against the new API; Flask's default leaves it to heuristics.
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = 0
    app.register_blueprint(bp)
