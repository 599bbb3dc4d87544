"""cluster.yaml checked offline with Ray's own schema and config preparation (no credentials)."""

import copy
import json
import math
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from sweep.cluster import ADVERTISED, ADVERTISED_GPUS_LABEL
from sweep.space import load_space

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def check(config: dict) -> dict:
    # The raw file first, for clean errors; validate_config needs prepare_config's merged defaults.
    jsonschema.validate(config, SCHEMA)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_a_valid_ray_cluster_config(config):
    prepared = check(config)
    workers = prepared["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] == 1 and workers["min_workers"] == 0
    assert "GPU" not in prepared["available_node_types"]["head"]["resources"]
    assert all(node["node_config"]["ImageId"].startswith("ami-") for node in prepared["available_node_types"].values())
    assert any("pip install -e ." in command for command in prepared["setup_commands"])
    # MPS before the worker's Ray starts, so that every trial process on the GPU is its client.
    starts = prepared["worker_start_ray_commands"]
    assert starts[0] == "ray stop" and "ray start --address=$RAY_HEAD_IP:6379" in starts[-1]
    assert any("nvidia-cuda-mps-control -d" in command for command in starts[1:-1])


@pytest.mark.parametrize("space", ["burda2016", "burda2016_table2", "rainforth2018"])
def test_the_gpu_spaces_trials_sharing_a_gpu_fit_a_worker_s_cpus(config, space):
    resources = load_space(space).resources
    worker = config["available_node_types"]["gpu_worker"]["resources"]
    sharing = math.floor(worker["GPU"] / resources.gpus_per_trial)  # trials on one worker at once
    assert sharing >= 1 and sharing * resources.cpus_per_trial <= worker["CPU"]


def test_the_rehearsal_s_gpu_workers_say_their_gpus_are_advertised_only():
    local = yaml.safe_load(CLUSTER_YAML.with_name("cluster.local.yaml").read_text())
    jsonschema.validate(local, SCHEMA)
    labels = local["available_node_types"]["gpu_worker"]["labels"]
    assert labels == {ADVERTISED_GPUS_LABEL: ADVERTISED}
    assert not config_has_label(yaml.safe_load(CLUSTER_YAML.read_text()))  # a real cluster never says so


def config_has_label(config: dict) -> bool:
    return any(ADVERTISED_GPUS_LABEL in node.get("labels", {}) for node in config["available_node_types"].values())


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (("max_worker",), 4, jsonschema.ValidationError),
        (("available_node_types", "gpu_worker", "resources", "GPU"), 0.5, jsonschema.ValidationError),
        (("head_node_type",), "nope", ValueError),
        (("setup_commands",), "pip install .", jsonschema.ValidationError),
    ],
)
def test_the_check_catches_broken_variants(config, path, value, error):
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(error):
        check(config)
