"""Connecting to Ray and checking that the GPUs a sweep asks for can exist.

GPUs per trial and per evaluation actor are settings, not detection: on an autoscaling
cluster with no GPU worker up yet Ray reports 0 GPUs, and a request for a GPU that never
comes leaves trials pending for ever without an error. So a request is checked before any
trial starts: it must fit the cluster now, or (with `--wait-for-gpus S`) the autoscaler is
asked for it and has S seconds to bring it up.
"""

from __future__ import annotations

import math
import os
import time

import ray
from ray._private import ray_constants

# Ray turns a plain 127.0.0.1 into the machine's external address; this internal switch (ray
# 2.60, see shared/reference/ray_tune_facts.md section 10) is what keeps a local Ray on loopback.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class ClusterError(RuntimeError):
    pass


def keep_local_ray_on_loopback() -> None:
    """Every node of a Ray started from this process after this call (and its raylets and
    workers) uses 127.0.0.1, not the external address. Only for a single-machine Ray: a real
    cluster keeps Ray's normal addressing (and with the switch Ray's CLI refuses to join one)."""
    os.environ[LOOPBACK_SWITCH] = "0"  # for the processes ray.init starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable when it imported ray


def init_ray(address: str | None) -> None:
    """Join `address` ("auto" for the cluster `ray up` made), or start a private local Ray on
    127.0.0.1."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        keep_local_ray_on_loopback()
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
