"""A rehearsal of the cluster on this machine: Ray's fake multi-node autoscaler with
cluster.local.yaml, on 127.0.0.1.

    python -m sweep.local_cluster up        # the head; gpu_worker nodes come when trials ask
    python -m sweep.run --address auto --space quick --gpus-per-trial 0.5 --eval-gpus 0.5
    python -m sweep.local_cluster status    # Ray's `ray status`, and the processes it started
    python -m sweep.local_cluster down      # stops every one of them

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

from .cluster import LOOPBACK_SWITCH

CONFIG = Path(__file__).resolve().parent.parent / "cluster.local.yaml"
ADDRESS = "127.0.0.1:6379"  # the fake provider joins its nodes to port 6379 of this machine
STATE_DIR = Path(tempfile.gettempdir()) / "iwae-sweep-local-cluster"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10


class LocalClusterError(RuntimeError):
    pass


def session_processes(session: int) -> list[int]:
    """PIDs of the live processes in process session `session` (the rehearsal's, by its leader)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, session
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def read_state() -> dict | None:
    try:
        return json.loads((STATE_DIR / "state.json").read_text())
    except FileNotFoundError:
        return None


def cluster_environment() -> dict[str, str]:
    """The environment of the head's `ray start` (inherited by every node the autoscaler starts)."""
    return {**os.environ, "RAY_FAKE_CLUSTER": "1", LOOPBACK_SWITCH: "0",
            # The autoscaler looks at demand every second instead of every 5: scaling in seconds.
            "AUTOSCALER_UPDATE_INTERVAL_S": os.environ.get("AUTOSCALER_UPDATE_INTERVAL_S", "1")}


def up(config: Path = CONFIG) -> dict:
    """Start the head with the autoscaler on `config`; return the state `down` needs."""
    if (state := read_state()) is not None and session_processes(state["session"]):
        raise LocalClusterError(f"a local cluster is already up (session {state['session']}, {state['address']}): "
                                f"python -m sweep.local_cluster down first")
    if not config.is_file():
        raise LocalClusterError(f"{config}: no such cluster config (the rehearsal's is cluster.local.yaml at the top of "
                                f"the checkout)")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    log_path = STATE_DIR / "head.log"
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={ADDRESS.split(':')[1]}",
               "--num-cpus=1", "--num-gpus=0", f"--autoscaling-config={config}", "--include-dashboard=false",
               "--disable-usage-stats", "--block"]
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, env=cluster_environment(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    state = {"session": head.pid, "address": ADDRESS, "config": str(config), "log": str(log_path)}
    (STATE_DIR / "state.json").write_text(json.dumps(state))
    deadline = time.monotonic() + START_TIMEOUT_S
    while "Ray runtime started" not in log_path.read_text():  # `ray start` prints it once the head is up
        if head.poll() is not None or time.monotonic() > deadline:
            down()
            raise LocalClusterError(f"the head did not start ({'it exited' if head.poll() is not None else 'timed out'}"
                                    f"); its log, {log_path}, ends:\n{log_path.read_text()[-2000:]}\nIf port 6379 is "
                                    f"taken by another Ray, stop that one first")
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
    (STATE_DIR / "state.json").unlink()
    return len(started)


def status() -> str:
    state = read_state()
    if state is None or not session_processes(state["session"]):
        return "no local cluster is up (python -m sweep.local_cluster up starts one)"
    # Ray's CLI finds the cluster `ray start` recorded and sends its token only in token mode.
    report = subprocess.run([str(Path(sys.executable).with_name("ray")), "status"],
                            env={**cluster_environment(), "RAY_AUTH_MODE": "token"}, capture_output=True, text=True)
    return (f"{report.stdout}{report.stderr}\nlocal cluster at {state['address']}: "
            f"{len(session_processes(state['session']))} processes in session {state['session']}; head log {state['log']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sweep.local_cluster",
        description="Rehearse the cluster on this machine: a Ray head with Ray's fake multi-node autoscaler on "
                    "127.0.0.1:6379, which starts gpu_worker 'nodes' (real Ray processes advertising a GPU) on demand "
                    "and stops them when idle. Then run sweeps with --address auto.")
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--config", type=Path, default=CONFIG, help=f"the autoscaler config for up (default {CONFIG.name})")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            state = up(args.config.resolve())
            print(f"local cluster up at {state['address']} (head log: {state['log']}); workers start when trials ask "
                  f"for GPUs.\n  python -m sweep.run --address auto --gpus-per-trial 0.5 --eval-gpus 0.5\n"
                  f"  ray status\n  python -m sweep.local_cluster down")
        elif args.action == "down":
            print(f"local cluster down: stopped its {down()} process(es)")
        else:
            print(status())
    except LocalClusterError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
