"""Connecting to Ray, the device each trial and evaluation computes on, and checking
before any trial starts that the GPUs a sweep asks for can exist and that every node sees a
local-path storage.

GPUs per trial and per evaluation are settings, not detection: on an autoscaling
cluster with no GPU worker up yet Ray reports 0 GPUs, and a request for a GPU that never
comes leaves trials pending for ever without an error. So a request is checked before any
trial starts: it must fit the cluster now, or (with `--wait-for-gpus S`) the autoscaler is
asked for it and has S seconds to bring it up.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ray
import torch
from pyarrow import fs as pafs
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from iwae_model.errors import IWAEError

from .ray_private import address_from_environment, quiet_default_token_notice, single_machine_addressing
from .storage import is_local

# Ray turns a plain 127.0.0.1 into the machine's external address; this internal switch of Ray
# 2.60 is what keeps a local Ray on loopback (tested, as a Ray upgrade may change it).
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
STORAGE_MARKER = ".iwae_storage_check"  # in the sweep folder: a random token every node must read back
# The node label with which cluster.local.yaml's rehearsal nodes say their GPUs are advertised only.
ADVERTISED_GPUS_LABEL, ADVERTISED = "iwae-sweep/gpus", "advertised"


class ClusterError(IWAEError, RuntimeError):
    pass


class StorageNotShared(ClusterError):
    pass


class GPUUnusable(ClusterError):
    pass


def this_node() -> dict[str, Any]:
    """The Ray node this process runs on, as results and TensorBoard record it."""
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
    }


def choose_device(gpu_ids: list[str], cuda_usable: bool, advertised_only: bool, node: dict[str, Any]) -> torch.device:
    """The device of a trial or an evaluation, from the GPUs Ray assigned it and whether
    torch can use CUDA. No GPU assigned: the CPU, even where torch sees one (Ray does not hide the
    GPUs from a process that asked for none, and did not count this one on them). On a rehearsal
    node, whose GPUs are advertised only (`advertised_only`): the CPU, also on a machine with a
    real GPU, which the advertised ones do not stand for. Assigned and usable: CUDA (Ray's
    CUDA_VISIBLE_DEVICES makes the first assigned GPU cuda:0). Assigned but unusable:
    GPUUnusable, rather than days of training on the CPU."""
    if not gpu_ids or advertised_only:
        return torch.device("cpu")
    if cuda_usable:
        return torch.device("cuda", 0)
    raise GPUUnusable(
        f"Ray gave this process GPU(s) {', '.join(map(str, gpu_ids))} on node {node['hostname']} ({node['node_ip']}, "
        f"Ray node {node['node_id']}), but torch {torch.__version__} there cannot use CUDA (torch.version.cuda: "
        f"{torch.version.cuda or 'None, a CPU-only build'}). Install torch's CUDA build of the same version on that "
        f"node's image, or check its NVIDIA driver (nvidia-smi must list the GPU); or run on CPU with "
        f"--gpus-per-trial 0 --eval-gpus 0"
    )


def gpus_advertised_only() -> bool:
    """Whether the calling Ray worker's node is a rehearsal node, whose GPUs are advertised only."""
    return ray.get_runtime_context().get_node_labels().get(ADVERTISED_GPUS_LABEL) == ADVERTISED


def ray_device() -> torch.device:
    """`choose_device` for the calling Ray worker."""
    return choose_device(
        [str(gpu) for gpu in ray.get_gpu_ids()], torch.cuda.is_available(), gpus_advertised_only(), this_node()
    )


def storage_marker(experiment: str, filesystem: pafs.FileSystem) -> dict[str, str] | None:
    """The sweep folder's marker on a local-path storage (made once, kept for resumes), which
    every node must see; None on object storage, which every node reaches by its URI."""
    if not is_local(filesystem):
        return None
    path = Path(experiment) / STORAGE_MARKER
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(uuid.uuid4().hex)
    return {"path": str(path), "token": path.read_text()}


def verify_storage_marker(marker: dict[str, str]) -> None:
    """On a node: raise StorageNotShared unless this node reads the driver's marker."""
    try:
        seen = Path(marker["path"]).read_text()
    except OSError:
        seen = None
    if seen != marker["token"]:
        node = this_node()
        folder = str(Path(marker["path"]).parent.parent)
        raise StorageNotShared(
            f"--storage {folder} is a local folder, and node {node['hostname']} ({node['node_ip']}, Ray node "
            f"{node['node_id']}) does not see the sweep's marker {marker['path']} that the driver wrote: the nodes do "
            f"not share that folder, so each trial's checkpoints would stay on the disk of the node that ran it. Use "
            f"object storage every node reaches (--storage s3://BUCKET/sweeps or gs://BUCKET/sweeps), or a folder "
            f"every node mounts at the same path (NFS, EFS)"
        )


@ray.remote(num_cpus=0)
def _verify_on_node(marker: dict[str, str]) -> None:
    verify_storage_marker(marker)


def check_storage_shared(marker: dict[str, str] | None) -> None:
    """Before any trial starts: every node up now reads `marker`. Nodes the autoscaler adds
    later check it when a trial starts there (the trainable calls verify_storage_marker)."""
    if marker is None:
        return
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    checks = [
        _verify_on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(marker)
        for node in nodes
    ]
    for check in checks:
        try:
            ray.get(check)
        except ray.exceptions.TaskUnschedulableError:
            continue  # the node left since it was listed (the autoscaler took an idle worker away)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, StorageNotShared):
                raise error.cause from None
            raise


def keep_local_ray_on_loopback() -> None:
    """Every node of a Ray started from this process after this call (and its raylets and
    workers) uses 127.0.0.1, not the external address. Only for a single-machine Ray: a real
    cluster keeps Ray's normal addressing (and with the switch Ray's CLI refuses to join one)."""
    os.environ[LOOPBACK_SWITCH] = "0"  # for the processes ray.init starts
    single_machine_addressing()


def on_loopback(address: str) -> bool:
    """Whether the cluster at `address` ("auto": the one `ray start` last made here) is a
    single-machine one on 127.0.0.1, such as `python -m sweep.local_cluster up` makes."""
    resolved = address_from_environment(address)
    return resolved.rsplit(":", 1)[0] in ("127.0.0.1", "localhost")


def plugin_environment(plugins: Iterable[dict[str, str]]) -> dict[str, Any] | None:
    """The Ray runtime environment that ships the sweep's plugin files (iwae_model.plugins
    records) to every node, importable there by their module names; None without plugins."""
    files = [record["file"] for record in plugins]
    return {"py_modules": files} if files else None


def init_ray(address: str | None, runtime_env: dict[str, Any] | None = None) -> None:
    """Join `address` ("auto" for the cluster `ray up` or `sweep.local_cluster up` made), or
    start a private local Ray on 127.0.0.1; its jobs' `runtime_env` (plugin_environment). Where
    Ray is initialised already, nothing: a plugin's trials then load its file where it lies."""
    if ray.is_initialized():
        return
    if not address:
        keep_local_ray_on_loopback()
        quiet_default_token_notice()
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env)
        return
    try:
        if on_loopback(address):  # a driver on the external address finds no raylet of a loopback cluster
            keep_local_ray_on_loopback()
        ray.init(address=address, runtime_env=runtime_env)
    except ConnectionError as error:
        raise ClusterError(
            f"--address {address}: no Ray cluster to join ({str(error).splitlines()[0]}). Start one "
            f"(`ray up cluster.yaml` and run this on its head, or `python -m sweep.local_cluster up` "
            f"for the rehearsal), or leave out --address for a local Ray"
        ) from None


def check_gpus(gpus_per_trial: float, eval_gpus: float, wait_s: float = 0) -> None:
    needed = math.ceil(max(gpus_per_trial, eval_gpus))
    if needed == 0:
        return
    have = ray.cluster_resources().get("GPU", 0)
    if have < needed and wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": needed}])
        try:
            deadline = time.monotonic() + wait_s
            while have < needed and time.monotonic() < deadline:
                time.sleep(1)  # polling the autoscaler's progress; nothing to wait on instead
                have = ray.cluster_resources().get("GPU", 0)
        finally:  # the request would otherwise hold a GPU node up for ever; the trials' own demand takes over
            request_resources(bundles=[])
    if have < needed:
        raise ClusterError(
            f"the sweep asks for {gpus_per_trial} GPU(s) per trial and {eval_gpus} per evaluation, "
            f"but the Ray cluster has {have:g} GPU(s)"
            + (f" after waiting {wait_s:g} s" if wait_s else "")
            + ". Set --gpus-per-trial 0 and --eval-gpus 0 to run on CPU; on an autoscaling cluster check that its "
            "config has a GPU node type, or give the workers longer to start with --wait-for-gpus SECONDS."
        )
