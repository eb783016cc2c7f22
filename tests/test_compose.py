"""The compose file describes the system of docs/architecture.md section 2: checked by parsing it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from actgen_generator.model_source import SD21_BASE

ROOT = Path(__file__).resolve().parents[1]


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that accepts compose's merge-control tags (!override, !reset)."""


def _passthrough(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


for _tag in ("!override", "!reset"):
    _ComposeLoader.add_constructor(_tag, _passthrough)


def _load(text: str) -> dict:
    return yaml.load(text, Loader=_ComposeLoader)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load((ROOT / "docker-compose.yml").read_text())


def test_redis_persists_with_aof_and_is_never_published(compose: dict) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert "ports" not in redis, "Redis must not be exposed on the host"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"][-1] == "ping"


def test_redis_has_a_memory_cap_and_never_evicts(compose: dict) -> None:
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--maxmemory") + 1].startswith("${ACTGEN_REDIS_MAXMEMORY:-")


def test_api_needs_a_key_and_listens_on_loopback_unless_told(compose: dict) -> None:
    for name in ("generator", "generator-cpu", "trainer"):
        env = compose["services"][name]["environment"]
        assert env["ACTGEN_API_KEY"].startswith("${ACTGEN_API_KEY:?"), name  # refuse to start without
    for name in ("generator", "generator-cpu"):
        [port] = compose["services"][name]["ports"]
        assert port.startswith("${ACTGEN_BIND:-127.0.0.1}:"), port


def test_gpu_generator_reserves_its_own_device_and_waits_for_redis(compose: dict) -> None:
    gen = compose["services"]["generator"]
    devices = gen["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["device_ids"] == ["0"] and "count" not in devices[0]
    assert devices[0]["capabilities"] == ["gpu"]
    assert gen["environment"]["ACTGEN_MODEL"].startswith("/models/")  # model-init's copy
    assert gen["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert gen["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(gen["healthcheck"]["test"])
    assert "models:/models:ro" in gen["volumes"]
    assert gen["restart"] == "unless-stopped"
    assert int(gen["stop_grace_period"].rstrip("s")) >= 30
    assert set(compose["volumes"]) >= {"redis-data", "models"}


def test_model_init_fills_the_model_volume_once_before_the_gpu_generators(compose: dict) -> None:
    """One one-shot fetch-model writes the model into the `models` volume; every GPU generator waits
    for it to complete and loads that copy read-only, instead of each downloading 5 GB."""
    init = compose["services"]["model-init"]
    gen = compose["services"]["generator"]
    command = init["command"]
    assert command[:2] == ["actgen-generator", "fetch-model"]
    assert command[command.index("--model") + 1] == "${ACTGEN_MODEL:-" + SD21_BASE + "}"
    assert command[command.index("--to") + 1] == gen["environment"]["ACTGEN_MODEL"]
    assert "models:/models" in init["volumes"] and init["restart"] == "no"
    assert init["profiles"] == gen["profiles"] == ["gpu"]
    assert "ports" not in init and "deploy" not in init  # no port, no GPU: it downloads and checks
    assert set(init["environment"]) >= {"HF_TOKEN", "HF_HUB_OFFLINE", "ACTGEN_MODEL_REVISION"}
    assert all(value.endswith(":-}") for value in init["environment"].values())  # passed through, or unset
    assert gen["depends_on"]["model-init"]["condition"] == "service_completed_successfully"
    assert "models:/models:ro" in gen["volumes"]
    for gpus in (2, 4):
        out = _compose_gpus(gpus)
        for name, svc in _load(out)["services"].items():
            assert svc["depends_on"]["model-init"]["condition"] == "service_completed_successfully", name


def _compose_gpus(gpus: int) -> str:
    """The override file `make compose-gpus N=gpus` writes."""
    return subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "compose_gpus.py"), str(gpus)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_cpu_profile_runs_the_tiny_model_without_a_gpu(compose: dict) -> None:
    cpu = compose["services"]["generator-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert cpu["environment"]["ACTGEN_DEVICE"] == "cpu"
    assert compose["services"]["generator"]["profiles"] == ["gpu"]
    assert "COMPOSE_PROFILES=gpu" in (ROOT / ".env").read_text()


def test_trainer_is_a_one_shot_profile_with_data_and_runs_volumes(compose: dict) -> None:
    trainer = compose["services"]["trainer"]
    assert trainer["profiles"] == ["train"]
    assert trainer["restart"] == "no"
    mounts = {v.split(":")[1] for v in trainer["volumes"]}
    assert mounts == {"/data", "/runs"}
    command = trainer["command"]
    assert command[command.index("--generator-url") + 1].endswith("http://generator:8000}")
    assert "output_dir=/runs" in command


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_gpu_override_pins_replica_i_to_gpu_i(gpus: int) -> None:
    out = _compose_gpus(gpus)
    services = _load(out)["services"]
    assert len(services) == gpus - 1
    ports = set()
    for i in range(1, gpus):
        svc = services[f"generator-gpu{i}"]
        assert svc["extends"] == {"file": "docker-compose.yml", "service": "generator"}
        device = svc["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["device_ids"] == [str(i)]
        assert svc["environment"]["ACTGEN_REPLICA_ID"] == f"generator-gpu{i}"
        assert svc["ports"][0].startswith("${ACTGEN_BIND:-127.0.0.1}:")
        ports.add(svc["ports"][0].split(":")[-2])
    assert len(ports) == gpus - 1, "host ports must not collide"


def test_gpu_override_refuses_zero_gpus() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "compose_gpus.py"), "0"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "num_gpus must be at least 1" in proc.stderr


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(
    _compose_cli() is None, reason="neither `docker compose` nor docker-compose is installed here"
)
def test_compose_config_accepts_the_file() -> None:
    cli = _compose_cli()
    assert cli is not None
    for profile in ("gpu", "cpu", "train"):
        proc = subprocess.run(
            [*cli, "--profile", profile, "config", "--quiet"], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr


def test_trainer_gets_a_gpu_shared_memory_and_the_generator_url_from_its_environment(
    compose: dict,
) -> None:
    trainer = compose["services"]["trainer"]
    device = trainer["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert trainer["shm_size"].endswith("gb}")
    assert trainer["environment"]["ACTGEN_GENERATOR_URL"].endswith("http://generator:8000}")
    # every trainer command in the README and the operations guide keeps the URL: no override,
    # or one read from the env
    readme = (ROOT / "README.md").read_text() + (ROOT / "docs" / "operations.md").read_text()
    commands = [line for line in readme.splitlines() if "--profile train run" in line]
    assert commands, "no `docker compose --profile train run` command documented"
    for line in readme.splitlines():
        if "--profile train run" in line and "trainer train" in line:
            assert "--generator-url" in line or "ACTGEN_GENERATOR_URL" in readme
        if "--profile train run" in line:
            assert "run --rm trainer" in line  # the service's volumes and environment stay


def test_model_volumes_are_owned_by_the_images_user() -> None:
    dockerfile = (ROOT / "services" / "generator" / "Dockerfile").read_text()
    compose_text = (ROOT / "docker-compose.yml").read_text()
    assert "hf-cache:/cache/huggingface" in compose_text and "models:/models" in compose_text
    run = next(line for line in dockerfile.replace("\\\n", " ").splitlines() if "useradd" in line)
    assert "/cache/huggingface" in run and "/models" in run and "chown -R actgen" in run
    assert re.search(r"chown -R actgen:actgen /cache /models", run)
    user = [line for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert user == ["USER actgen"]
