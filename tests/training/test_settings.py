"""The one settings object: read from an environment mapping once, values checked, errors naming the variable."""

from pathlib import Path

import pytest

from training.settings import Settings


def test_an_empty_environment_gives_the_defaults():
    assert Settings.from_env({}) == Settings()


def test_values_are_read_and_converted():
    settings = Settings.from_env({
        "MODEL_DIR": "/srv/models", "DATA_DIR": "/srv/data", "MAX_UPLOAD_MB": "64", "PRECISION": "bfloat16",
        "MAX_BATCH_WAIT_MS": "2.5", "EVENT_STREAMS": "3", "PROMETHEUS_MULTIPROC_DIR": "/run/metrics",
        "CELERY_BROKER_URL": "  redis://127.0.0.1:6379/0 ", "PAD_BATCHES": "on",
    })
    assert settings.model_dir == Path("/srv/models") and settings.data_dir == Path("/srv/data")
    assert settings.max_upload_mb == 64 and settings.max_batch_wait_ms == 2.5 and settings.event_streams == 3
    assert settings.precision == "bfloat16" and settings.pad_batches == "on"
    assert settings.metrics_dir == Path("/run/metrics")
    assert settings.celery_broker_url == "redis://127.0.0.1:6379/0"
    assert settings.feature_cache_dir == Path("/srv/data/features")


def test_blank_values_mean_unset():
    settings = Settings.from_env({"CELERY_BROKER_URL": " ", "PROMETHEUS_MULTIPROC_DIR": "", "PORT": ""})
    assert settings.celery_broker_url is None and settings.metrics_dir is None and settings.port == Settings.port


@pytest.mark.parametrize("environ, message", [
    ({"PORT": "eighty"}, "PORT must be a whole number, received: 'eighty'"),
    ({"MAX_BATCH_WAIT_MS": "soon"}, "MAX_BATCH_WAIT_MS must be a number, received: 'soon'"),
    ({"THREADS": "0"}, "THREADS must be at least 1, received: 0"),
    ({"PRECISION": "float16"}, "PRECISION must be one of"),
    ({"PAD_BATCHES": "yes"}, "PAD_BATCHES must be one of .*received: 'yes'"),
    ({"JOB_HEARTBEAT_SECONDS": "100"}, "JOB_HEARTBEAT_SECONDS must be above 0 and below JOB_STALE_SECONDS"),
    ({"EVENT_STREAMS": "0"}, "EVENT_STREAMS must be at least 1, received: 0"),
])
def test_a_bad_value_is_refused_naming_the_variable(environ, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Settings.from_env(environ)
