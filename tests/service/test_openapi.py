"""The OpenAPI document and the Swagger UI, served from this server."""

from __future__ import annotations

import re

from openapi_spec_validator import validate


def test_openapi_json_is_valid_openapi_3_listing_the_endpoints(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.get_json()
    validate(spec)
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    expected = {
        "/healthz": {"get"}, "/readyz": {"get"}, "/v1/models": {"get"}, "/v1/models/{name}": {"get"},
        "/v1/models/{name}/versions/{version}/plots/{filename}": {"get"},
        "/v1/models/{name}/published": {"put"}, "/v1/models/{name}/versions/{version}": {"delete"},
        "/v1/models/{name}/predict": {"post"}, "/v1/predict": {"post"},
        "/v1/datasets": {"get", "post"}, "/v1/datasets/{dataset_id}": {"get"}, "/v1/models/{name}/train": {"post"},
        "/v1/jobs": {"get"}, "/v1/jobs/{job_id}": {"get"}, "/v1/jobs/{job_id}/cancel": {"post"},
        "/v1/jobs/{job_id}/events": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path
    predict = paths["/v1/models/{name}/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {p["name"] for p in predict["parameters"] if p["in"] == "query"} == {"top_k", "version"}
    assert {"200", "400", "404", "413", "415", "503"} <= set(predict["responses"])
    upload = paths["/v1/datasets"]["post"]
    assert {"202", "200", "400", "413", "415", "503"} <= set(upload["responses"]) and "201" not in upload["responses"]
    dataset = spec["components"]["schemas"]["Dataset"]
    assert set(dataset["required"]) == {"id", "status"}  # the report comes later, once the ingest worker ran
    assert dataset["properties"]["status"]["enum"] == ["queued", "ingesting", "ready", "failed"]
    assert {"error", "classes", "images", "skipped", "url"} <= set(dataset["properties"])
    assert paths["/healthz"]["get"]["security"] == []
    assert {"bearer", "apiKey"} == set(spec["components"]["securitySchemes"])


def test_docs_page_loads_its_assets_from_this_server(client):
    response = client.get("/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(assets) >= 3
    for url in assets:
        assert url.startswith("/") and not url.startswith("//"), url  # no CDN, no other host
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.data) > 1000, url
    assert "/openapi.json" in page


def test_docs_assets_do_not_leave_their_folder(client):
    assert client.get("/docs/assets/../../service/auth.py").status_code == 404
    assert client.get("/docs/assets/%2E%2E/flask_swagger_ui.py").status_code == 404
