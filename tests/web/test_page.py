"""The web page through the Flask test client: served at `/`, public, every asset local, not in the API spec."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service import create_app
from service.web import CONTENT_SECURITY_POLICY
from training.settings import Settings

STATIC = Path(__file__).resolve().parents[2] / "service" / "static"
KEY = "page-test-training-key"


@pytest.fixture
def keyed_client(tmp_path):
    """A client of an app that requires API keys."""
    settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data", backbone_weights="none",
                        training_api_key=KEY, prediction_api_key="page-test-prediction-key")
    return create_app({"SETTINGS": settings, "TESTING": True}).test_client()


@pytest.fixture
def open_client(tmp_path):
    """A client of an app with no keys configured."""
    settings = Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data", backbone_weights="none")
    return create_app({"SETTINGS": settings, "TESTING": True}).test_client()


def page_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"#][^"]*)"', html)


def test_page_is_public_html_with_a_strict_content_security_policy(keyed_client):
    response = keyed_client.get("/")
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY and "script-src 'self'" in CONTENT_SECURITY_POLICY
    html = response.get_data(as_text=True)
    assert 'data-keys-required="true"' in html
    # The API behind it still needs the key.
    assert keyed_client.get("/v1/models").status_code == 401


def test_page_says_when_no_key_is_needed(open_client):
    assert 'data-keys-required="false"' in open_client.get("/").get_data(as_text=True)


def test_every_asset_is_served_from_this_server_without_a_key(keyed_client):
    html = keyed_client.get("/").get_data(as_text=True)
    assets = page_assets(html)
    assert {"/static/app.js", "/static/app.css", "/static/favicon.svg"} <= set(assets), assets
    for url in assets:
        assert url.startswith("/") and not url.startswith("//"), url  # no CDN, no other host
        asset = keyed_client.get(url)
        assert asset.status_code == 200 and len(asset.data) > 100, url
    assert keyed_client.get("/static/app.js").mimetype in ("text/javascript", "application/javascript")


def test_scripts_import_only_local_modules_that_exist(keyed_client):
    for script in STATIC.glob("*.js"):
        text = script.read_text(encoding="utf-8")
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, script
        for target in re.findall(r'^import .* from "([^"]+)";$', text, flags=re.M):
            assert target.startswith("./"), (script, target)
            assert keyed_client.get(f"/static/{target[2:]}").status_code == 200, (script, target)


def test_stylesheet_and_page_name_no_other_host():
    for path in [*STATIC.iterdir(), STATIC.parent / "templates" / "index.html"]:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"url\((?!['\"]?data:)", text), path
        assert not re.search(r'(?:src|href)="(?:https?:)?//', text), path


def test_page_labels_its_controls(keyed_client):
    html = keyed_client.get("/").get_data(as_text=True)
    for text in ('role="alert"', 'role="tablist"', 'aria-label="Dataset archive"', 'aria-label="Images to classify"',
                 'aria-label="Training progress"', '<label for="api-key">API key</label>'):
        assert text in html, text
    # Every input and select has a label: wrapped in <label>, for= it, or aria-label.
    for control in re.finditer(r"<(input|select)\b[^>]*>", html):
        tag = control.group(0)
        ident = re.search(r'id="([^"]+)"', tag)
        wrapped = html.rfind("<label", 0, control.start()) > html.rfind("</label>", 0, control.start())
        assert "aria-label=" in tag or wrapped or (ident and f'for="{ident.group(1)}"' in html), tag


def test_unknown_static_files_and_paths_outside_the_folder_are_404(keyed_client):
    assert keyed_client.get("/static/nope.js").status_code == 404
    assert keyed_client.get("/static/../web.py").status_code == 404
    assert keyed_client.get("/static/%2E%2E/web.py").status_code == 404


def test_the_page_is_not_in_the_api_spec(keyed_client):
    spec = keyed_client.get("/openapi.json").get_json()
    assert "/" not in spec["paths"] and not any(path.startswith("/static") for path in spec["paths"])


def test_assets_are_revalidated_so_an_upgrade_reaches_every_browser(keyed_client):
    first = keyed_client.get("/static/app.js")
    assert first.status_code == 200 and "max-age=0" in first.headers["Cache-Control"]
    again = keyed_client.get("/static/app.js", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""
