"""cluster.yaml checked offline with Ray's own schema and config preparation (no credentials)."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

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


@pytest.mark.parametrize(("path", "value", "error"), [
    (("max_worker",), 4, jsonschema.ValidationError),
    (("available_node_types", "gpu_worker", "resources", "GPU"), 0.5, jsonschema.ValidationError),
    (("head_node_type",), "nope", ValueError),
    (("setup_commands",), "pip install .", jsonschema.ValidationError),
])
def test_the_check_catches_broken_variants(config, path, value, error):
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(error):
        check(config)
