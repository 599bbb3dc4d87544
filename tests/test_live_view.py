"""What a person watching `python -m sweep.run` sees on a terminal (a pseudo-terminal here): the
trial table redrawn in place, never Tune's nested config column, its per-checkpoint log lines or
Ray's housekeeping. The same in a log file (a pipe) is checked on the shared tiny sweep's output
(test_sweep)."""

import os
import pty
import re
import select
import subprocess

from conftest import TINY_PASSES, TINY_SPACE, sweep_cli

PASSES = TINY_PASSES
LABELS = ["vae_L1_M1_K1_s0", "iwae_L1_M1_K3_s0"]
HEADER = re.compile(r"trial +status +pass +stage +lr +train +valid +best valid +img/s +node")
NOISE = [
    "'compile'",
    "{'layers'",
    "Checkpoint successfully created",
    "Token authentication is enabled",
    "Experiment state snapshotting has been triggered",
]


def run_on_a_terminal(command) -> tuple[int, str]:
    """stdout and stderr on a pseudo-terminal, read until the sweep exits."""
    main, child = pty.openpty()
    proc = subprocess.Popen(command, stdout=child, stderr=child, stdin=subprocess.DEVNULL)
    os.close(child)
    chunks = []
    while True:
        ready, _, _ = select.select([main], [], [], 600)
        assert ready, "no output for 10 minutes"
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_on_a_terminal_the_table_is_redrawn_in_place(mnist_dir, tmp_path):
    code, out = run_on_a_terminal(sweep_cli({**TINY_SPACE, "name": "live"}, tmp_path, mnist_dir))
    assert code == 0, out[-3000:]
    assert_each_trial_and_no_noise(out, "", terminal=True)  # one stream on a terminal


def assert_each_trial_and_no_noise(out: str, err: str, terminal: bool) -> None:
    for noise in NOISE:
        assert noise not in out + err, noise
    assert HEADER.search(out), out
    final = out[out.rindex("status") :]
    for label in LABELS:
        assert re.search(
            rf"{label} +TERMINATED +{PASSES}/{PASSES} +7 +0\.0001 +-\d+\.\d\d +-\d+\.\d\d +-\d+\.\d\d "
            rf"+[\d,]+ +\S+",
            final,
        ), final
    per_pass = re.findall(
        r"\] (\S+)  pass (\d)/\d  stage \d  lr \S+  train -[\d.]+  valid -[\d.]+  best valid "
        r"-[\d.]+  img/s [\d,]+  node \S+",
        out,
    )
    if terminal:
        assert "\x1b[" in out and not per_pass  # the table redrawn in place, no log lines
    else:
        assert "\x1b[" not in out
        assert sorted(per_pass) == sorted((label, str(p)) for label in LABELS for p in range(1, PASSES + 1))
    assert "Results: " in out and "TensorBoard: tensorboard --logdir" in out  # the final paths
