"""What a person watching `python -m sweep.run` sees, on a terminal (a pseudo-terminal here) and
in a log file (a pipe): the trial table or one line per trial per pass, never Tune's nested
config column or its per-checkpoint log lines."""

import os
import pty
import re
import select
import subprocess
import sys

import pytest
import yaml
from conftest import TINY_PASSES, TINY_SPACE

PASSES = TINY_PASSES
LABELS = ["vae_L1_M1_K1_s0", "iwae_L1_M1_K3_s0"]
HEADER = re.compile(r"trial +status +pass +stage +lr +train +valid +best valid +img/s +node")
NOISE = ["'compile'", "{'layers'", "Checkpoint successfully created"]


def sweep_command(tmp_path, mnist_dir, name):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({**TINY_SPACE, "name": name}))
    return [
        sys.executable,
        "-m",
        "sweep.run",
        "--space",
        str(tmp_path / "space.yaml"),
        "--storage",
        str(tmp_path / "store"),
        "--data-dir",
        str(mnist_dir),
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


@pytest.mark.parametrize("terminal", [True, False], ids=["tty", "pipe"])
def test_the_live_view_shows_each_trial_and_no_noise(mnist_dir, tmp_path, terminal):
    command = sweep_command(tmp_path, mnist_dir, "live")
    if terminal:
        code, out = run_on_a_terminal(command)
        err = ""
    else:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 0, (out + err)[-3000:]
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
