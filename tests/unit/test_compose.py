"""The compose files, read as Compose reads them (issue 10, defect 10; issue 13 §5: the
object store, the `serve` role, no shared artifact volume).

There is no Docker engine here, so the files are parsed with PyYAML and merged by the
Compose merge rules we use (mappings merge, sequences append, `!reset` removes,
`!override` replaces): docs.docker.com/reference/compose-file/merge.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GPU_FILE = REPO / "docker-compose.yml"
CPU_FILE = REPO / "docker-compose.cpu.yml"
MODEL_COMMANDS = {"api", "serve", "worker", "up"}  # the `loraforge` commands that load models


class _Reset:
    pass


class _Override:
    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: _Override(
        loader.construct_mapping(node, deep=True)
        if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_scalar(node)
    ),
)


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass


def merge(base: Any, override: Any) -> Any:
    if isinstance(override, _Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, _Reset):
                merged.pop(key, None)
            else:
                merged[key] = merge(base.get(key), value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


def gpu_reservation(service: dict) -> list[dict]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in devices.get("devices", []) if "gpu" in d.get("capabilities", [])]


def loads_models(service: dict) -> bool:
    command = service.get("command") or []
    inference_off = str(service.get("environment", {}).get("LORAFORGE_INFERENCE_ENABLED", ""))
    if command[1:2] == ["api"] and inference_off.lower() in ("false", "0"):
        return False
    if command[1:2] == ["worker"] and "webhooks" in command:  # sends webhooks only
        return False
    return command[:1] == ["loraforge"] and command[1:2][0] in MODEL_COMMANDS


def mounted_at(service: dict, target: str) -> str | None:
    """The source of the volume mounted at `target` (short syntax `source:target[:mode]`)."""
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return source
    return None


@pytest.fixture(scope="module")
def gpu() -> dict:
    return load(GPU_FILE)


@pytest.fixture(scope="module")
def cpu(gpu: dict) -> dict:
    return merge(gpu, load(CPU_FILE))


def model_services(compose: dict) -> dict[str, dict]:
    services = {name: s for name, s in compose["services"].items() if loads_models(s)}
    assert {"serve", "worker"} <= set(services)  # inference and training both load models
    return services


def test_every_service_that_loads_models_has_a_gpu(gpu: dict) -> None:
    for name, service in model_services(gpu).items():
        assert gpu_reservation(service), f"{name} loads models but reserves no GPU"
        args = service["build"]["args"]
        assert "/cpu" not in args["TORCH_INDEX_URL"], f"{name} builds the CPU torch wheels"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_model_services_get_hub_token_and_a_cache_volume(variant: str, request) -> None:
    compose = request.getfixturevalue(variant)
    for name, service in model_services(compose).items():
        environment = service["environment"]
        assert "HF_TOKEN" in environment, name
        # Passed through from the shell when set (a null value), never written in the file.
        assert environment["HF_TOKEN"] in (None, "${HF_TOKEN:-}", "${HF_TOKEN}"), name
        hf_home = environment["HF_HOME"]
        source = mounted_at(service, hf_home)
        assert source in compose["volumes"], f"{name}: HF_HOME {hf_home} is not a named volume"
        assert "LORAFORGE_BASE_MODELS" in environment


def test_cpu_variant_reserves_no_gpu_and_stays_whole(cpu: dict) -> None:
    for name, service in cpu["services"].items():
        assert not gpu_reservation(service), f"{name} still reserves a GPU"
        assert "image" in service, name
        for dependency in service.get("depends_on", {}):
            assert dependency in cpu["services"], f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(("$", ".", "/")) or source in cpu["volumes"], volume
    for name, service in model_services(cpu).items():
        assert service["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu"), name
        assert service["environment"]["LORAFORGE_DEVICE"] == "cpu", name
        assert "cuda" not in service["image"], name  # a CPU build never overwrites the GPU tag


def test_dockerfile_prepares_the_cache_directory(gpu: dict) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    hf_home = gpu["services"]["api"]["environment"]["HF_HOME"]
    assert re.search(rf"HF_HOME={re.escape(hf_home)}\b", dockerfile)
    # A fresh named volume takes the ownership of the directory it is mounted on.
    assert re.search(rf"mkdir -p [^\n]*{re.escape(hf_home)}", dockerfile)
    assert re.search(rf"chown [^\n]*{re.escape(hf_home)}", dockerfile)
    assert "LORAFORGE_DATA_DIR=/data" in dockerfile


def loraforge_services(compose: dict) -> dict[str, dict]:
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("image", "").startswith("loraforge:")
    }


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_no_two_containers_share_a_disk_for_artifacts(variant: str, request) -> None:
    compose = request.getfixturevalue(variant)
    users: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            if ":" in volume and not volume.startswith(("$", ".", "/")):
                users.setdefault(volume.split(":")[0], []).append(name)
    shared = {volume for volume, names in users.items() if len(names) > 1}
    assert shared <= {"hf-cache"}, users  # a hub download cache, never an artifact
    for name, service in loraforge_services(compose).items():
        data_dir = service["environment"]["LORAFORGE_DATA_DIR"]
        # the data dir is the container's own scratch: an anonymous volume, or none
        assert mounted_at(service, data_dir) is None, name
        assert service["environment"]["LORAFORGE_STORAGE_URL"].startswith("s3://"), name


def test_the_object_store_and_its_bucket_come_up_before_loraforge(gpu: dict) -> None:
    services = gpu["services"]
    environment = services["api"]["environment"]
    bucket = environment["LORAFORGE_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    store_host = re.match(r"https?://([^:/]+)", environment["AWS_ENDPOINT_URL"]).group(1)
    store = services[store_host]
    assert store["healthcheck"]["test"], "the object store needs a healthcheck"
    # the SDK's credentials are the store's root credentials, from the same variables
    assert environment["AWS_ACCESS_KEY_ID"] == store["environment"]["MINIO_ROOT_USER"]
    assert environment["AWS_SECRET_ACCESS_KEY"] == store["environment"]["MINIO_ROOT_PASSWORD"]
    [init] = [
        name
        for name, service in services.items()
        if service.get("depends_on", {}).get(store_host, {}).get("condition") == "service_healthy"
    ]
    creates = " ".join(services[init]["command"])
    assert re.search(rf"mc mb --ignore-existing \S+/{bucket}\b", creates)
    migrate = services["migrate"]["depends_on"]
    assert migrate[init]["condition"] == "service_completed_successfully"
    for name, service in loraforge_services(gpu).items():  # each waits for the migration
        if name != "migrate":
            assert "migrate" in service["depends_on"], name


def test_inference_runs_in_serve_and_the_api_is_a_control_plane(gpu: dict) -> None:
    api, serve = gpu["services"]["api"], gpu["services"]["serve"]
    assert serve["command"][:2] == ["loraforge", "serve"]
    assert gpu_reservation(serve)
    assert str(api["environment"]["LORAFORGE_INFERENCE_ENABLED"]).lower() == "false"
    assert not gpu_reservation(api)  # loads no model, so it needs no GPU
