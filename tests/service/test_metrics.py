"""Prometheus metrics and the JSON request log."""

from __future__ import annotations

import json

from tests.service.conftest import MODEL


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus' text format (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_per_url_rule_and_status(client):
    before = client.get("/metrics").get_data(as_text=True)
    client.get(f"/v1/models/{MODEL}")
    client.get("/v1/models/nosuch")
    client.get("/v1/models/nosuch2")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    name, rule = "classifier_http_requests_total", "/v1/models/<name>"
    for status, added in (("200", 1), ("404", 2)):
        assert metric_value(text, name, endpoint=rule, method="GET", status=status) - metric_value(
            before, name, endpoint=rule, method="GET", status=status) == added
    assert "nosuch" not in text  # label values are URL rules, not raw paths
    assert metric_value(text, "classifier_http_request_duration_seconds_count", endpoint=rule, method="GET") >= 3
    for runtime_metric in ("classifier_batch_size", "classifier_queue_depth", "classifier_model_loads_total"):
        assert f"# TYPE {runtime_metric}" in text


def test_one_json_log_line_per_request_with_its_id(client, log_lines):
    lines = log_lines("service.access")
    response = client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert response.headers["X-Request-ID"] == "abc-123"
    first, second = (json.loads(line) for line in lines)
    assert first["method"] == "GET" and first["path"] == "/v1/models" and first["status"] == 200
    assert first["request_id"] == "abc-123" and first["duration_ms"] >= 0
    assert second["request_id"] != "bad id with spaces" and len(second["request_id"]) == 32
