"""A copy installed from a wheel works outside the checkout: the shipped spaces, the rehearsal's
cluster config and the papers' values are package data."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_tree(destination: Path) -> Path:
    """The checkout's files as a clone has them (tracked or new, not ignored: no stale build/),
    links kept as links."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for name in sorted(set(listed.stdout.split("\0")) - {""}):
        if os.path.lexists(ROOT / name):  # deleted, not yet committed
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name, follow_symlinks=False)
    return destination


def test_a_wheel_installed_elsewhere_finds_the_shipped_spaces(tmp_path):
    # The wheel built from the checkout's files as `pip wheel` builds it, installed into a fresh
    # virtual environment outside the checkout. Its dependencies are this environment's, through a
    # .pth line: a path so added does not run this environment's own .pth files, so the editable
    # install of the checkout stays out and `sweep` can only come from the wheel.
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
            source_tree(tmp_path / "source"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("iwae_sweep-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True
    ).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    where = subprocess.run(
        [python, "-c", "import sweep, sweep.local_cluster as c; print(sweep.__file__, c.CONFIG.is_file())"],
        cwd=elsewhere,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(site) and where.stdout.split()[-1] == "True", where.stdout + where.stderr
    dry_run = subprocess.run(  # quick is also the default space
        [python, "-m", "sweep.run", "--space", "quick", "--dry-run"],
        cwd=elsewhere,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    assert "iwae_L1_M1_K5_s0" in dry_run.stdout and "Estimated wall time:" in dry_run.stdout
    assert list(elsewhere.iterdir()) == []  # a dry run writes nothing
