"""Offline checks of cluster.yaml, the Ray autoscaler config for `ray up` on AWS (DESIGN §6).

`ray up` resolves a config in `ray.autoscaler._private.commands._bootstrap_config`:
  1. `prepare_config`   - merge with the provider's defaults.yaml, merge setup commands, fill per-type
                          min/max workers. For AWS this only reads ray/autoscaler/aws/defaults.yaml.
  2. `fillout_available_node_types_resources` - asks EC2 (describe-instance-types) for CPU/GPU counts.
  3. `validate_config`  - JSON schema (ray-schema.json) + head/min_workers consistency checks.
  4. `bootstrap_config` - creates key pair, IAM profile, security group, subnets on AWS.
Steps 2 and 4 call AWS, so these tests run only 1 and 3, the offline parts, with sockets disabled to
prove it. Because step 2 is skipped, the GPU counts must be declared in the YAML (and are checked here
against the instance types); on a real `ray up`, declared values take precedence over detected ones.
"""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.train.v2._internal.constants import (
    HEALTH_CHECK_INTERVAL_S_ENV_VAR,
    WORKER_GROUP_START_TIMEOUT_S_ENV_VAR,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"

# GPUs per instance type (AWS specs); Ray cannot look these up offline.
GPUS_PER_INSTANCE = {"g5.12xlarge": 4, "p4d.24xlarge": 8}
VCPUS_PER_INSTANCE = {"g5.12xlarge": 48, "p4d.24xlarge": 96}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection (e.g. boto3 reaching AWS) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted during an offline test: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def raw() -> dict:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return prepare_config(copy.deepcopy(raw))


def _validate(config: dict) -> dict:
    """What `ray up` runs first, minus the two steps that call AWS (see module docstring)."""
    cfg = prepare_config(copy.deepcopy(config))
    validate_config(cfg)
    return cfg


def _setup_text(cfg: dict) -> str:
    return "\n".join(cfg["setup_commands"])


def _gpu_types(cfg: dict) -> dict:
    return {name: t for name, t in cfg["available_node_types"].items() if t.get("resources", {}).get("GPU", 0) > 0}


def test_passes_ray_validation(raw):
    cfg = _validate(raw)
    assert cfg["cluster_name"] == "raysal"
    assert cfg["provider"]["type"] == "aws"
    assert cfg["provider"]["region"] == "us-west-2"
    assert cfg["provider"]["availability_zone"]
    assert cfg["provider"]["cache_stopped_nodes"] is False
    assert cfg["auth"]["ssh_user"] == "ubuntu"
    assert cfg["idle_timeout_minutes"] > 0 and cfg["upscaling_speed"] > 0


def test_head_type_is_listed(raw):
    assert raw["head_node_type"] in raw["available_node_types"]


def test_every_resource_is_an_integer(raw):
    for name, node_type in raw["available_node_types"].items():
        assert "resources" in node_type, name
        for key, value in node_type["resources"].items():
            assert type(value) is int and value >= 0, (name, key, value)


def test_head_runs_trial_drivers_but_no_gpu_work(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("TRAIN_DRIVER", 0) >= 1
    assert head["resources"].get("GPU", 0) == 0
    assert "InstanceMarketOptions" not in head["node_config"], "a spot head would take the cluster down with it"


def test_gpu_workers_declare_gpus_matching_instance_type_and_use_spot(raw):
    gpu_types = _gpu_types(raw)
    assert {t["node_config"]["InstanceType"] for t in gpu_types.values()} == set(GPUS_PER_INSTANCE)
    for name, node_type in gpu_types.items():
        instance = node_type["node_config"]["InstanceType"]
        assert node_type["resources"]["GPU"] == GPUS_PER_INSTANCE[instance], name
        assert node_type["resources"].get("CPU", VCPUS_PER_INSTANCE[instance]) <= VCPUS_PER_INSTANCE[instance], name
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert node_type.get("min_workers", 0) == 0, name
        assert node_type["max_workers"] >= 1, name


def test_every_node_has_a_large_root_volume_and_an_ami(raw):
    for name, node_type in raw["available_node_types"].items():
        node_config = node_type["node_config"]
        assert node_config["ImageId"].startswith("ami-"), name
        sizes = [m["Ebs"]["VolumeSize"] for m in node_config["BlockDeviceMappings"] if "Ebs" in m]
        assert sizes and max(sizes) >= 100, name


def test_setup_installs_ray_default_at_the_local_version_and_the_project(raw, prepared):
    text = _setup_text(raw)
    assert "ray[default" in text
    pins = re.findall(r'"ray\[[^\]]*\]==([^"]+)"', text)
    assert pins == [ray.__version__], "pin the cluster's Ray to the version `ray up` runs with"
    assert "pip install -e /home/ubuntu/raysal" in text
    assert raw["file_mounts"]["/home/ubuntu/raysal"] == "."
    # prepare_config puts the common setup before head/worker setup: both kinds of node get it.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("ray[default" in c for c in prepared[key]), key


def test_setup_sets_train_env_and_shared_storage(raw):
    text = _setup_text(raw)
    timeout = re.search(rf"{WORKER_GROUP_START_TIMEOUT_S_ENV_VAR}=(\d+)", text)
    assert timeout and int(timeout.group(1)) >= 300, "GPU nodes need minutes to autoscale"
    assert re.search(rf"{HEALTH_CHECK_INTERVAL_S_ENV_VAR}=\d", text)
    assert re.search(r"RAYSAL_STORAGE=\"?s3://", text)


# A broken copy must fail validation, so the test above can fail.
def _head_missing(cfg):
    cfg["head_node_type"] = "no_such_type"


def _fractional_gpu(cfg):
    next(iter(_gpu_types(cfg).values()))["resources"]["GPU"] = 0.5


def _negative_resource(cfg):
    cfg["available_node_types"][cfg["head_node_type"]]["resources"]["TRAIN_DRIVER"] = -1


def _unknown_top_level_key(cfg):
    cfg["max_worker"] = 3  # typo of max_workers


def _min_workers_over_global_max(cfg):
    next(iter(_gpu_types(cfg).values()))["min_workers"] = cfg["max_workers"] + 1


@pytest.mark.parametrize(
    ("breaker", "error", "match"),
    [
        (_head_missing, ValueError, "head_node_type"),
        (_fractional_gpu, jsonschema.ValidationError, "integer"),
        (_negative_resource, jsonschema.ValidationError, "minimum"),
        (_unknown_top_level_key, jsonschema.ValidationError, "max_worker"),
        (_min_workers_over_global_max, ValueError, "min_workers"),
    ],
)
def test_broken_copy_fails_validation(raw, breaker, error, match):
    broken = copy.deepcopy(raw)
    breaker(broken)
    with pytest.raises(error, match=match):
        _validate(broken)
