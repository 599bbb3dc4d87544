"""A sweep's trial on half a GPU, on a GPU host with Ray (the model-level CUDA checks, which need
no Ray, are in test_cuda.py). Skipped with one line saying why where torch sees no GPU or Ray is
not installed."""

import json

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed here: the sweep's CUDA check needs it")

from conftest import TINY_SPACE  # noqa: E402 -- after the skip, as is everything that imports Ray

from sweep.results import read_results  # noqa: E402
from sweep.run import run_sweep  # noqa: E402
from sweep.space import parse_space  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch here"),
]


def test_a_sweep_trial_given_half_a_gpu_trains_and_is_evaluated_on_it(mnist_dir, tmp_path):
    space = parse_space({**TINY_SPACE, "name": "gpu", "resources": {"gpus_per_trial": 0.5, "eval_gpus": 0.5}}, "<gpu>")
    ray.init(address="local", include_dashboard=False)
    try:
        run_sweep(space, str(tmp_path), str(mnist_dir), max_failures=0)
    finally:
        ray.shutdown()
    table = read_results(str(tmp_path / "gpu")).to_pylist()
    name = torch.cuda.get_device_name(0)
    for row in table:
        assert (row["train_device"], row["device"]) == ("cuda", "cuda")
        assert (row["train_gpu_name"], row["eval_gpu_name"]) == (name, name)
        assert (row["train_float32"], row["eval_float32"]) == ("ieee", "ieee")
        assert all(run["ray_gpu_ids"] and run["device"] == "cuda" for run in json.loads(row["train_nodes"]))
