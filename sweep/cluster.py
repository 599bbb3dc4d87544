"""Connecting to Ray and checking that the GPUs a sweep asks for can exist.

GPUs per trial and per evaluation actor are settings, not detection: on an autoscaling
cluster with no GPU worker up yet Ray reports 0 GPUs, and a request for a GPU that never
comes leaves trials pending for ever without an error. So a request is checked before any
trial starts: it must fit the cluster now, or (with `--wait-for-gpus S`) the autoscaler is
asked for it and has S seconds to bring it up.
"""

from __future__ import annotations

import math
import time

import ray


class ClusterError(RuntimeError):
    pass


def init_ray(address: str | None) -> None:
    """Join `address` ("auto" for the cluster `ray up` made), or start a private local Ray."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", include_dashboard=False)


def check_gpus(gpus_per_trial: float, eval_gpus: float, wait_s: float = 0) -> None:
    needed = math.ceil(max(gpus_per_trial, eval_gpus))
    if needed == 0:
        return
    have = ray.cluster_resources().get("GPU", 0)
    if have < needed and wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": needed}])
        deadline = time.monotonic() + wait_s
        while have < needed and time.monotonic() < deadline:
            time.sleep(5)  # polling the autoscaler's progress; nothing to wait on instead
            have = ray.cluster_resources().get("GPU", 0)
    if have < needed:
        raise ClusterError(
            f"the sweep asks for {gpus_per_trial} GPU(s) per trial and {eval_gpus} per evaluation actor, "
            f"but the Ray cluster has {have:g} GPU(s)"
            + (f" after waiting {wait_s:g} s" if wait_s else "")
            + ". Set --gpus-per-trial 0 and --eval-gpus 0 to run on CPU, or on an autoscaling cluster pass "
              "--wait-for-gpus SECONDS so GPU workers can start.")
