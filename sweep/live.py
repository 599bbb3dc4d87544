"""What `python -m sweep.run` shows while trials run, in place of Ray Tune's own table (whose
parameter column is the whole nested training config, cut off).

On a terminal: one table, redrawn at most once a second, a row per trial: its label, status,
pass / total, schedule stage, learning rate, training and validation bound, the best
validation bound so far, images/s and the node it runs on, with news (a finished trial's
evaluation) above it. Elsewhere (CI, nohup, a pipe): one line per trial per pass, and a line
when a trial starts, ends, fails or is evaluated.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray import tune

from .trials import trial_config, trial_label

HEADER = ("trial", "status", "pass", "stage", "lr", "train", "valid", "best valid", "img/s", "node")
STATUS_ORDER = {"RUNNING": 0, "PENDING": 1, "PAUSED": 2, "TERMINATED": 3, "ERROR": 4}
REDRAW_SECONDS = 1.0


class LiveView(tune.Callback):
    """A Tune callback that prints the sweep's progress (it holds no stream: Tune pickles its
    callbacks with the sweep, and the resumed sweep prints with the restored copy)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.start = time.monotonic()
        self.drawn_lines = 0
        self.last_draw = 0.0

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.show(trials, trial, "started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = self.row(trial)
        row.update(
            {name: result.get(name) for name in ("epoch", "stage", "lr", "train_bound", "valid_bound", "images_per_s")}
        )
        row["node"] = result.get("hostname") or result.get("node_ip") or "?"
        if result.get("valid_bound") is not None:
            row["best"] = max(row.get("best", float("-inf")), result["valid_bound"])
        self.show(trials, trial, "pass")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.show(trials, trial, "finished", force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.show(trials, trial, "failed", force=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if sys.stdout.isatty():
            self.redraw(trials)
        else:
            print(self.table(trials), flush=True)

    def note(self, trials: list, text: str) -> None:
        """A line of news (an evaluation's result): above the table on a terminal."""
        if sys.stdout.isatty():
            sys.stdout.write(self.erase() + text + "\n")
            self.drawn_lines = 0
            self.redraw(trials)
        else:
            print(f"[{time.monotonic() - self.start:6.0f} s] {text}", flush=True)

    def row(self, trial: Any) -> dict[str, Any]:
        return self.rows.setdefault(
            trial.trial_id, {"label": trial_label(trial), "passes": trial_config(trial.config).passes}
        )

    def show(self, trials: list, trial: Any, event: str, force: bool = False) -> None:
        if sys.stdout.isatty():
            if force or time.monotonic() - self.last_draw >= REDRAW_SECONDS:
                self.redraw(trials)
            return
        row = self.row(trial)
        text = f"[{time.monotonic() - self.start:6.0f} s] {row['label']}"
        if event == "pass":
            text += "  " + "  ".join(
                f"{name} {value}" for name, value in zip(HEADER[2:], self.cells(row)[2:], strict=True)
            )
        else:
            text += f"  {event}" + (
                f" after {row.get('epoch') or 0}/{row['passes']} passes" if event != "started" else ""
            )
        print(text, flush=True)

    def cells(self, row: dict[str, Any], status: str = "") -> list[str]:
        def number(name: str, spec: str) -> str:
            return "-" if row.get(name) is None else format(row[name], spec)

        return [
            row["label"],
            status,
            f"{row.get('epoch') or 0}/{row['passes']}",
            number("stage", "d"),
            number("lr", ".2g"),
            number("train_bound", ".2f"),
            number("valid_bound", ".2f"),
            number("best", ".2f"),
            number("images_per_s", ",.0f"),
            row.get("node", "-"),
        ]

    def table(self, trials: list) -> str:
        ordered = sorted(trials, key=lambda t: (STATUS_ORDER.get(t.status, 5), trial_label(t)))
        lines = [list(HEADER)] + [self.cells(self.row(t), t.status) for t in ordered]
        widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
        right = {2, 3, 4, 5, 6, 7, 8}
        return "\n".join(
            "  ".join(
                cell.rjust(w) if i in right else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
            for line in lines
        )

    def erase(self) -> str:
        """Back to the table's first line, and clear below it."""
        return f"\x1b[{self.drawn_lines}F\x1b[J" if self.drawn_lines else ""

    def redraw(self, trials: list) -> None:
        text = self.table(trials)
        sys.stdout.write(self.erase() + text + "\n")
        sys.stdout.flush()
        self.drawn_lines = text.count("\n") + 1
        self.last_draw = time.monotonic()
