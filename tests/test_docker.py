"""The docker deployment: `docker-compose config` accepts it, and what matters is in it.

There is no Docker engine in CI: `config` validates and interpolates without one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest
import yaml

from tests.conftest import ROOT, missing_service

COMPOSE = ROOT / "docker" / "docker-compose.yml"
#: sentinel secret values: they must come back from the environment, never from the file
SECRETS = {
    "REDIS_PASSWORD": "sentinel-redis-pw",
    "MINIO_ROOT_USER": "sentinel-minio-user",
    "MINIO_ROOT_PASSWORD": "sentinel-minio-pw",
    "TRANSCODER_WEBHOOK_TOKEN": "sentinel-webhook-token",
    "FLOWER_BASIC_AUTH": "sentinel-user:sentinel-flower-pw",
}
SERVICES = {"redis", "minio", "minio-init", "api", "worker", "flower"}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        missing_service("docker-compose is not installed (apt-get install docker-compose)")
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    # an empty env file: a developer's docker/.env must not leak into the check
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty_env:
        return subprocess.run(
            [str(binary), "-f", str(COMPOSE), "--env-file", empty_env.name, "config"],
            env={**clean, **env},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )


@pytest.fixture(scope="module")
def config() -> dict:
    result = compose_config(SECRETS)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_every_service_has_a_health_check(config: dict) -> None:
    services = config["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name


def test_secrets_come_from_the_environment(config: dict) -> None:
    env = {name: svc.get("environment", {}) for name, svc in config["services"].items()}
    assert env["redis"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert SECRETS["REDIS_PASSWORD"] in env["worker"]["TRANSCODER_REDIS_URL"]
    assert env["minio"]["MINIO_ROOT_PASSWORD"] == SECRETS["MINIO_ROOT_PASSWORD"]
    assert env["api"]["TRANSCODER_S3_SECRET_KEY"] == SECRETS["MINIO_ROOT_PASSWORD"]
    assert env["api"]["TRANSCODER_WEBHOOK_TOKEN"] == SECRETS["TRANSCODER_WEBHOOK_TOKEN"]
    assert env["flower"]["FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]


def test_no_secret_is_hard_coded_in_the_file() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|ACCESS_KEY|ROOT_USER")
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if key == "<<" or not secretish.search(key):
                continue
            # only an interpolation of a variable with an empty default: ${VAR:-}
            assert re.fullmatch(r"\$\{[A-Z_]+:-\}", str(value)), (name, key, value)
    for key, value in raw["x-transcoder-env"].items():
        if secretish.search(key):
            assert re.fullmatch(r"[^$]*\$\{[A-Z_]+:-\}[^$]*", str(value)), key
        if key == "TRANSCODER_REDIS_URL":
            assert "${REDIS_PASSWORD:-}" in value


def guard_of(service: dict) -> str:
    """The shell guard a service runs before its program: the text before `exec`."""
    words = list(service.get("entrypoint") or []) + list(service.get("command") or [])
    script = words[words.index("-c") + 1].replace("$$", "$")
    return script.split("exec ", 1)[0] + "true"


@pytest.mark.parametrize("service", ["redis", "minio", "flower"])
def test_missing_secrets_stop_the_deployment(service: str) -> None:
    # `config` works without secrets (an operator can validate the file anywhere) ...
    result = compose_config({})
    assert result.returncode == 0, result.stderr
    unset = yaml.safe_load(result.stdout)["services"][service]
    # ... but the service refuses to start while its secret is empty, saying what to set
    refused = subprocess.run(
        ["sh", "-c", guard_of(unset)], env=unset["environment"], capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "set " in refused.stderr
    configured = yaml.safe_load(compose_config(SECRETS).stdout)["services"][service]
    started = subprocess.run(
        ["sh", "-c", guard_of(configured)], env=configured["environment"], capture_output=True
    )
    assert started.returncode == 0, started.stderr


def test_flower_requires_basic_auth(config: dict) -> None:
    flower = config["services"]["flower"]
    command = " ".join(flower["command"])
    assert "flower" in command
    assert flower["environment"].get("FLOWER_BASIC_AUTH") or "--basic-auth" in command


def test_published_ports_are_loopback_only(config: dict) -> None:
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)
    api_ports = config["services"]["api"]["ports"]
    assert api_ports and all(
        str(p).startswith("127.0.0.1:") or p.get("host_ip") == "127.0.0.1" for p in api_ports
    )


def test_minio_notifies_the_api_webhook_with_the_token(config: dict) -> None:
    minio = config["services"]["minio"]
    assert minio["image"].startswith("minio/minio")
    env = minio["environment"]
    target = {k.rsplit("_", 1)[1] for k in env if k.startswith("MINIO_NOTIFY_WEBHOOK_ENABLE_")}
    assert len(target) == 1
    target_id = target.pop()
    assert env[f"MINIO_NOTIFY_WEBHOOK_ENABLE_{target_id}"] == "on"
    assert env[f"MINIO_NOTIFY_WEBHOOK_ENDPOINT_{target_id}"] == "http://api:8080/hooks/s3"
    assert (
        env[f"MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_{target_id}"] == SECRETS["TRANSCODER_WEBHOOK_TOKEN"]
    )
    init = config["services"]["minio-init"]
    assert init["image"].startswith("minio/mc")
    script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert f"arn:minio:sqs::{target_id}:webhook" in script
    assert "mc event add" in script and "--event put" in script
    assert "mc mb" in script


def test_services_run_the_project_image_and_commands(config: dict) -> None:
    services = config["services"]
    assert services["api"]["command"][:2] == ["transcoder", "api"]
    assert services["worker"]["command"][:4] == ["celery", "-A", "tasks", "worker"]
    assert "-E" in services["worker"]["command"]
    assert services["api"]["environment"]["TRANSCODER_TRIGGERS"]
    for name in ("api", "worker", "flower"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"


def test_dockerfile_is_slim_non_root_with_debian_ffmpeg() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"apt-get install .*ffmpeg", text)
    assert "pip install ." in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))


def test_example_triggers_file_is_valid() -> None:
    from transcoder.triggers import load_rules

    rules = load_rules(ROOT / "docker" / "triggers.yml")
    assert rules
    # no rule writes where a rule reads: outputs cannot loop back
    for rule in rules:
        assert rule.target_bucket != rule.bucket or not rule.output_dir.startswith(rule.prefix)
