"""A rehearsal of the cluster on this machine: Ray's fake multi-node autoscaler with
cluster.local.yaml, on 127.0.0.1.

    python -m sweep.local_cluster up        # the head; gpu_worker nodes come when trials ask
    python -m sweep.run --address auto --space quick --gpus-per-trial 0.5 --eval-gpus 0.5
    python -m sweep.local_cluster status    # Ray's `ray status`, the nodes and their raylet PIDs
    python -m sweep.local_cluster kill-node 00001   # lose a worker node mid-trial
    python -m sweep.local_cluster down      # stops every process it started, and forgets the address

`up` runs Ray's own `ray start --head --autoscaling-config=... --block` (as Ray's fake-provider
example does) in a new process session. Every process of the rehearsal -- the head's, and each
fake node's raylet, workers and agents, which the autoscaler starts -- descends from it and
stays in that session, so `down` stops exactly those by PID and nothing else of the user's
(unlike `ray stop`, which stops every Ray process by name).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from iwae_model.errors import IWAEError, exit_with

from .cluster import LOOPBACK_SWITCH
from .ray_private import address_file

CONFIG = Path(__file__).resolve().parent / "cluster.local.yaml"  # the checkout's, linked
ADDRESS = "127.0.0.1:6379"  # the fake provider joins its nodes to port 6379 of this machine
STATE_DIR = Path(tempfile.gettempdir()) / "iwae-sweep-local-cluster"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10


class LocalClusterError(IWAEError, RuntimeError):
    pass


def process_table() -> dict[int, tuple[int, int]]:
    """{pid: (parent pid, session)} of this machine's live processes (zombies left out)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, session
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def session_processes(session: int) -> list[int]:
    """PIDs of the live processes in process session `session` (the rehearsal's, by its leader)."""
    return [pid for pid, (_, sid) in process_table().items() if sid == session]


def raylets(session: int) -> dict[str, int]:
    """{Ray node id: its raylet's PID} of the rehearsal's nodes."""
    found = {}
    for pid in session_processes(session):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        except OSError:
            continue
        node = next((arg.split("=", 1)[1] for arg in args if arg.startswith("--node_id=")), None)
        if Path(args[0]).name == "raylet" and node:
            found[node] = pid
    return found


def kill_node(node_id: str) -> list[int]:
    """Lose a node as a machine is lost: SIGKILL its raylet and every process the raylet started
    (its workers, the trials among them), with no chance to clean up. Returns their PIDs."""
    state = read_state()
    nodes = raylets(state["session"]) if state else {}
    matches = [node for node in nodes if node == node_id or node.endswith(node_id)]
    if len(matches) != 1:
        raise LocalClusterError(
            f"node {node_id!r}: {'no' if not matches else 'more than one'} node of the local "
            f"cluster matches; its nodes: {', '.join(nodes) or 'none'}"
        )
    raylet = nodes[matches[0]]
    victims = [raylet, *(pid for pid, (parent, _) in process_table().items() if parent == raylet)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return victims


def read_state() -> dict | None:
    try:
        return json.loads((STATE_DIR / "state.json").read_text())
    except FileNotFoundError:
        return None


def cluster_environment() -> dict[str, str]:
    """The environment of the head's `ray start` (inherited by every node the autoscaler starts)."""
    return {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        LOOPBACK_SWITCH: "0",
        # The autoscaler looks at demand every second instead of every 5: scaling in seconds.
        "AUTOSCALER_UPDATE_INTERVAL_S": os.environ.get("AUTOSCALER_UPDATE_INTERVAL_S", "1"),
    }


def up(config: Path = CONFIG) -> dict:
    """Start the head with the autoscaler on `config`; return the state `down` needs."""
    if (state := read_state()) is not None and session_processes(state["session"]):
        raise LocalClusterError(
            f"a local cluster is already up (session {state['session']}, {state['address']}): "
            f"python -m sweep.local_cluster down first"
        )
    if not config.is_file():
        raise LocalClusterError(
            f"{config}: no such cluster config (the rehearsal's is cluster.local.yaml at the top of the checkout)"
        )
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    log_path = STATE_DIR / "head.log"
    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        f"--port={ADDRESS.split(':')[1]}",
        "--num-cpus=1",
        "--num-gpus=0",
        f"--autoscaling-config={config}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        "--block",
    ]
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            command,
            env=cluster_environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    state = {"session": head.pid, "address": ADDRESS, "config": str(config), "log": str(log_path)}
    (STATE_DIR / "state.json").write_text(json.dumps(state))
    deadline = time.monotonic() + START_TIMEOUT_S
    while "Ray runtime started" not in log_path.read_text():  # `ray start` prints it once the head is up
        if head.poll() is not None or time.monotonic() > deadline:
            down()
            raise LocalClusterError(
                f"the head did not start ({'it exited' if head.poll() is not None else 'timed out'}"
                f"); its log, {log_path}, ends:\n{log_path.read_text()[-2000:]}\nIf port 6379 is "
                f"taken by another Ray, stop that one first"
            )
        time.sleep(0.2)
    return state


def down() -> int:
    """Stop every process of the rehearsal; return how many there were."""
    state = read_state()
    if state is None:
        raise LocalClusterError(f"no local cluster to take down (no state in {STATE_DIR})")
    session = state["session"]
    started = session_processes(session)
    # SIGTERM first (raylets and `ray start --block` shut down cleanly on it), SIGKILL what remains.
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5)):
        for pid in session_processes(session):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # ended since we listed it
                pass
        deadline = time.monotonic() + wait_s
        while session_processes(session) and time.monotonic() < deadline:
            time.sleep(0.2)
    if left := session_processes(session):
        raise LocalClusterError(f"processes {left} of the local cluster survived SIGKILL")
    forget_address()
    (STATE_DIR / "state.json").unlink()
    return len(started)


def forget_address() -> None:
    """Remove the head's `ray start` record of "the current cluster" (what `ray stop` removes), if it
    still names the rehearsal: left behind, it makes the user's next plain `ray.init()` try to join
    the stopped head for minutes instead of starting a Ray of its own."""
    path = address_file()
    try:
        if path.read_text().strip() == ADDRESS:
            path.unlink()
    except FileNotFoundError:
        pass


def status() -> str:
    state = read_state()
    if state is None or not session_processes(state["session"]):
        return "no local cluster is up (python -m sweep.local_cluster up starts one)"
    # Ray's CLI finds the cluster `ray start` recorded and sends its token only in token mode.
    report = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "status"],
        env={**cluster_environment(), "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
    )
    nodes = "\n".join(f"  node {node}  raylet PID {pid}" for node, pid in sorted(raylets(state["session"]).items()))
    return (
        f"{report.stdout}{report.stderr}\nlocal cluster at {state['address']}: "
        f"{len(session_processes(state['session']))} processes in session {state['session']}; head log "
        f"{state['log']}\n{nodes}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sweep.local_cluster",
        description="Rehearse the cluster on this machine: a Ray head with Ray's fake multi-node autoscaler on "
        "127.0.0.1:6379, which starts gpu_worker 'nodes' (real Ray processes advertising a GPU) on demand "
        "and stops them when idle. Then run sweeps with --address auto.",
    )
    parser.add_argument(
        "action",
        choices=("up", "down", "status", "kill-node"),
        help="up: start the head (workers come on demand); status: Ray's status and each node's "
        "raylet PID; kill-node NODE_ID: lose that node as if its machine died (its raylet and "
        "processes SIGKILLed), the autoscaler replaces it; down: stop every process up started",
    )
    parser.add_argument("node", nargs="?", help="with kill-node: the node's id, or its last digits (see status)")
    parser.add_argument(
        "--config", type=Path, default=CONFIG, help=f"the autoscaler config for up (default {CONFIG.name})"
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            state = up(args.config.resolve())
            print(
                f"local cluster up at {state['address']} (head log: {state['log']}); workers start when trials ask "
                f"for GPUs.\n  python -m sweep.run --address auto --gpus-per-trial 0.5 --eval-gpus 0.5\n"
                f"  python -m sweep.local_cluster status\n  python -m sweep.local_cluster down"
            )
        elif args.action == "down":
            print(f"local cluster down: stopped its {down()} process(es)")
        elif args.action == "kill-node":
            if not args.node:
                parser.error("kill-node needs the node's id (python -m sweep.local_cluster status lists them)")
            print(f"killed node {args.node}: processes {kill_node(args.node)}")
        else:
            print(status())
    except LocalClusterError as error:
        exit_with(error)


if __name__ == "__main__":
    main()
