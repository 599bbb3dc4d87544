"""A sweep's results as the papers' tables, with the published values beside them, and plots.

One table per dataset. Rows: stochastic layers x (M, K); columns: objective (with beta /
estimator when not the default); cells: test NLL in nats (mean over seeds), active units, and the published value
with our difference. `*` marks cells not comparable to the papers (short schedule, subset of
the training or test set, k < 5000, or a binarization other than the dataset's). Beside each
estimate, what the diagnostics say of it: the share of test images whose PSIS k̂ exceeds 0.7
(the IS estimate unreliable there) and, where the sweep ran AIS, AIS - IS on the same images.
With a baseline, each cell also shows its per-image paired difference to that checkpoint
(sweep/compare.py).
"""

from __future__ import annotations

import json
from importlib import resources

import pandas as pd
import yaml

from iwae_model.datasets import DATASETS
from iwae_model.importance import PARETO_K_THRESHOLD
from iwae_model.objectives import OBJECTIVES, parameters

from .compare import difference, mean_image_nll
from .results import TRIALS_SCHEMA, ResultsError
from .study import search_table

KEY = ["layers", "m", "k"]


def variant(row: pd.Series) -> str:
    """The column a result belongs to: the objective, with its parameters (CIWAE's beta) and its
    estimator where not the objective's own."""
    objective = OBJECTIVES.get(row["objective"])
    if objective is None:
        raise ResultsError(
            f"results of objective {row['objective']!r}, which no loaded module defines: pass the plugin that "
            f"defines it (--plugin FILE)"
        )
    name = row["objective"].upper()
    if objective.parameters:
        name += f"({', '.join(f'{p.symbol or p.name}={row[p.name]:g}' for p in objective.parameters)})"
    if row["estimator"] != objective.default_estimator:
        name += f"+{row['estimator'].upper()}"
    return name


def other_settings(frame: pd.DataFrame) -> pd.Series:
    """Training settings beyond the table's own axes that differ between rows of one dataset's
    table (e.g. lr), as a suffix of the column name, so that only seeds of one configuration are
    ever averaged."""
    if frame["dataset"].nunique() > 1:
        return pd.concat([other_settings(part) for _, part in frame.groupby("dataset", sort=False)])
    configs = pd.DataFrame([json.loads(c) for c in frame["config"]], index=frame.index)
    shown = {"dataset", "objective", "m", "k", "layers", "estimator", "seed", *parameters()}
    varying = [c for c in configs.columns if c not in shown and configs[c].astype(str).nunique() > 1]
    if not varying:
        return pd.Series("", index=frame.index)
    return configs[varying].apply(lambda row: " " + ",".join(f"{c}={row[c]}" for c in varying), axis=1)


TABLE_2 = "burda2016_table2"


def published() -> dict:
    return yaml.safe_load(resources.files("sweep").joinpath("reference_values.yaml").read_text())


def reference_values() -> pd.DataFrame:
    """The papers' Table-1-style numbers shipped with the package (sweep/reference_values.yaml),
    and those a plugin's dataset declares (data.DatasetSource.published)."""
    entries = [
        {"dataset": "mnist", "paper": paper, **entry}
        for paper, listed in published().items()
        if paper != TABLE_2
        for entry in listed
    ]
    entries += [{"dataset": name, **entry} for name, cls in DATASETS.items() for entry in cls.published]
    defaults = {**{p.name: p.default for p in parameters().values()}, "active_units": None}
    rows = [
        {"estimator": OBJECTIVES[entry["objective"]].default_estimator, **defaults, **entry}
        for entry in entries
        if entry["objective"] in OBJECTIVES
    ]
    frame = pd.DataFrame(rows)
    frame["variant"] = frame.apply(variant, axis=1)
    return frame


def first_stage(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["sweep_stage"].fillna(1) != 2]  # null: results from before two-stage sweeps


def table2(frame: pd.DataFrame) -> str:
    """Burda et al.'s Table 2 layout: each continued trial beside its parent, with the published
    pair where the two stages' objectives match one."""
    continued = frame[frame["sweep_stage"] == 2]
    if continued.empty:
        return ""
    by_name = {row["trial_name"]: row for _, row in frame.iterrows()}
    pairs = published()[TABLE_2]
    lines = [
        "Table 2: second stage continued from the first stage's best checkpoint",
        "| first stage | NLL | AU | second stage | NLL | AU | paper (first → second) |",
        "|---|---|---|---|---|---|---|",
    ]

    def nll_au(row: pd.Series) -> str:
        star = "" if row["comparable_to_papers"] else "*"
        return f"{row['test_nll']:.2f}{star}{doubts(row)} | {'+'.join(map(str, row['active_units']))}"

    for _, child in continued.sort_values("trial_name").iterrows():
        parent = by_name.get(child["parent_trial_name"])
        first = nll_au(parent) if parent is not None else "(not in these results) | "
        paper = next(
            (
                f"{p['first_nll']:.2f} ({p['first_au']}) → {p['second_nll']:.2f} ({p['second_au']})"
                for p in pairs
                if parent is not None
                and child["layers"] == 1
                and child["dataset"] == "mnist"
                and all(parent[k] == v for k, v in p["first"].items())
                and all(child[k] == v for k, v in p["second"].items())
            ),
            "",
        )
        lines.append(
            f"| {child['parent_trial_name']} | {first} | {variant(child)} k={child['k']} | {nll_au(child)} | {paper} |"
        )
    return "\n".join(lines)


def summarise(frame: pd.DataFrame, baseline: tuple[pd.DataFrame, pd.Series] | None = None) -> pd.DataFrame:
    """One row per (dataset, layers, M, K, variant): mean NLL over seeds, its spread, active units and
    the published value; with `baseline` (per-image table, baseline row), the cell's mean
    per-image difference to the baseline checkpoint and its paired standard error. Second-stage
    (continued) trials are left to `table2`."""
    frame = first_stage(frame)
    if frame.empty:
        return pd.DataFrame()
    frame = frame.assign(variant=frame.apply(variant, axis=1) + other_settings(frame))
    if baseline is not None:
        per_image, base = baseline
        base_nll = mean_image_nll(per_image, base.to_frame().T)
    groups = []
    for (dataset, layers, m, k, name), cell in frame.groupby(["dataset", *KEY, "variant"], sort=False):
        units = [sum(u[i] for u in cell["active_units"]) / len(cell) for i in range(layers)]
        seeds = len(cell)
        groups.append(
            {
                "dataset": dataset,
                "layers": layers,
                "m": m,
                "k": k,
                "variant": name,
                "seeds": seeds,
                "test_nll": cell["test_nll"].mean(),
                # one seed: the Monte-Carlo/image standard error; several: the spread across seeds
                "test_nll_se": cell["test_nll_se"].iloc[0] if seeds == 1 else cell["test_nll"].std() / seeds**0.5,
                "active_units": "+".join(f"{u:.0f}" if seeds == 1 else f"{u:.1f}" for u in units),
                "test_bound": cell["test_bound"].mean(),
                "comparable_to_papers": bool(cell["comparable_to_papers"].all()),
                "eval_k": int(cell["eval_k"].min()),
                "eval_images": int(cell["eval_images"].min()),
                "passes": int(cell["passes"].min()),
                "pareto_k_above_0_7": cell["pareto_k_above_0_7"].mean(),
                **ais_gap(cell),
            }
        )
        if baseline is not None:
            d = difference(mean_image_nll(per_image, cell), base_nll)
            groups[-1].update(vs_baseline=d.mean, vs_baseline_se=d.paired_se)
    summary = pd.DataFrame(groups)
    reference = reference_values()[["dataset", *KEY, "variant", "paper", "nll"]].rename(columns={"nll": "paper_nll"})
    summary = summary.merge(reference, on=["dataset", *KEY, "variant"], how="left")
    summary["difference"] = summary["test_nll"] - summary["paper_nll"]
    order = {name.upper(): i for i, name in enumerate(OBJECTIVES)}
    summary["_order"] = summary["variant"].map(lambda v: order.get(v.split("(")[0].split("+")[0], 99))
    summary["_dataset"] = summary["dataset"].map(lambda d: list(DATASETS).index(d))
    return (
        summary.sort_values(["_dataset", *KEY, "_order", "variant"])
        .drop(columns=["_dataset", "_order"])
        .reset_index(drop=True)
    )


def ais_gap(cell: pd.DataFrame) -> dict:
    """AIS - IS of a cell's rows that ran AIS (NaN: none did): one seed's paired mean and SE over
    images; several seeds' mean and the spread across them, as for the NLL."""
    gaps = cell[cell["ais_minus_is"].notna()]
    if len(gaps) < 2:
        se = gaps["ais_minus_is_se"].mean()  # NaN without rows
    else:
        se = gaps["ais_minus_is"].std() / len(gaps) ** 0.5
    return {
        "ais_minus_is": gaps["ais_minus_is"].mean(),
        "ais_minus_is_se": se,
        "ais_images": gaps["ais_images"].min(),
    }


def doubts(row: pd.Series) -> str:
    """What the diagnostics say of an IS estimate (a results or summary row): the share of its
    images with PSIS k̂ > 0.7 and, where AIS ran, AIS - IS."""
    text = ""
    if pd.notna(row["pareto_k_above_0_7"]):
        text += f" k̂>{PARETO_K_THRESHOLD} {row['pareto_k_above_0_7']:.0%}"
    if pd.notna(row["ais_minus_is"]):
        text += f" AIS−IS {row['ais_minus_is']:+.2f} ± {row['ais_minus_is_se']:.2f}"
    return text


def doubts_notes(frame: pd.DataFrame) -> list[str]:
    """The notes that explain `doubts` for the rows of `frame`."""
    notes = []
    if frame["pareto_k_above_0_7"].notna().any():
        notes.append(
            f"k̂>{PARETO_K_THRESHOLD}: the share of test images whose PSIS k̂ exceeds {PARETO_K_THRESHOLD}, where "
            f"the k-sample estimate rests on a few samples and is unreliable (docs/analyses.md)."
        )
    if frame["ais_minus_is"].notna().any():
        images = frame["ais_images"].dropna()
        on = f"{int(images.min())}" if images.min() == images.max() else f"{int(images.min())}–{int(images.max())}"
        notes.append(
            f"AIS−IS: log p(x) by annealed importance sampling minus the IS estimate, paired on the same first "
            f"{on} test images, ± its SE; > 0: the IS estimate falls at least about this far below log p(x); "
            f"< 0 by more than its SE: too few AIS distributions (docs/ais.md)."
        )
    return notes


def cell_text(row: pd.Series) -> str:
    text = f"{row['test_nll']:.2f} ({row['active_units']})"
    if not row["comparable_to_papers"]:
        text += "*"
    if pd.notna(row["paper_nll"]):
        text += f" [paper {row['paper_nll']:.2f}, {row['difference']:+.2f}]"
    text += doubts(row)
    if "vs_baseline" in row:
        text += f" Δ {row['vs_baseline']:+.3f} ± {row['vs_baseline_se']:.3f}"
    return text


def markdown_table(summary: pd.DataFrame, baseline: str | None = None) -> str:
    """One table per dataset (titled), then the notes."""
    lines = []
    for dataset, part in summary.groupby("dataset", sort=False):
        variants = list(dict.fromkeys(part["variant"]))
        lines += [
            *([""] if lines else []),
            f"{DATASETS[dataset].title}:",
            "| layers | M | K | " + " | ".join(variants) + " |",
            "|---|---|---|" + "---|" * len(variants),
        ]
        for (layers, m, k), row_cells in part.groupby(KEY, sort=True):
            cells = {row["variant"]: cell_text(row) for _, row in row_cells.iterrows()}
            lines.append(f"| {layers} | {m} | {k} | " + " | ".join(cells.get(v, "") for v in variants) + " |")
    notes = [
        "",
        "Cells: test NLL in nats (active units per layer); [published value, our difference].",
        *doubts_notes(summary),
    ]
    if baseline:
        notes.append(
            f"Δ: mean per-image NLL difference to {baseline} on the same test images ± its paired standard error."
        )
    if not summary["comparable_to_papers"].all():
        short = summary[~summary["comparable_to_papers"]].iloc[0]
        notes.append(
            f"* not comparable to the papers: e.g. {short['passes']} of 3,280 passes, k={short['eval_k']}, "
            f"{short['eval_images']} test images (the papers: full schedule, k=5000, the whole test set)."
        )
    return "\n".join(lines + notes)


def plot(summary: pd.DataFrame, path: str) -> None:
    """Test NLL against the number of samples M*K, one line per objective and layer count,
    the published values as hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    reference = reference_values()
    several = summary["dataset"].nunique() > 1
    for (dataset, name, layers), group in summary.groupby(["dataset", "variant", "layers"]):
        label = f"{dataset}: " * several + f"{name}, {layers} layer(s)"
        group = group.assign(samples=group["m"] * group["k"]).sort_values("samples")
        (line,) = axis.plot(group["samples"], group["test_nll"], "o-", label=label)
        paper = reference[
            (reference["dataset"] == dataset) & (reference["variant"] == name) & (reference["layers"] == layers)
        ]
        if len(paper):
            paper = paper.assign(samples=paper["m"] * paper["k"]).sort_values("samples")
            axis.plot(
                paper["samples"], paper["nll"], "o--", mfc="none", color=line.get_color(), label=f"{label}, paper"
            )
    axis.set_xscale("log")
    axis.set_xlabel("samples per image (M·K)")
    axis.set_ylabel("test NLL (nats, lower is better)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_results(rows: list[dict], path: str) -> None:
    frame = pd.DataFrame(rows)
    print()
    if frame["searched"].notna().any():  # the evaluated trials; sweep.query shows them all
        trials = frame[[name for name in TRIALS_SCHEMA.names if name != "status"]].assign(status="finished")
        print(search_table(trials, frame))
        print("(the evaluated trials: python -m sweep.query SWEEP_DIR lists every trial of the search)")
    else:
        print(tables(frame, summarise(frame)))
    print()
    best = frame.sort_values("test_nll").head(5)
    width = max(28, *map(len, best["trial_name"]))
    print("Best configurations (test NLL, nats):")
    for _, row in best.iterrows():
        print(
            f"  {row['trial_name']:<{width}} {row['test_nll']:8.2f} ± {row['test_nll_se']:.2f}  "
            f"active units {'+'.join(map(str, row['active_units']))}{doubts(row)}"
        )
    print(f"\nResults: {path} ({len(rows)} rows)")


def snr_plot(frame: pd.DataFrame, path: str) -> None:
    """Encoder and decoder gradient SNR against M*K, log-log, one line per objective/estimator
    and layer count, like Rainforth et al. (2018)'s figures."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    frame = frame[frame["snr_encoder_mean"].notna()]
    if frame.empty:
        raise ResultsError(
            "no gradient SNR in these results: train with `training: snr_every: N` in the space file "
            "(search_spaces/rainforth2018.yaml does), or --snr-every N in python -m iwae_model.train"
        )
    frame = frame.assign(variant=frame.apply(variant, axis=1), samples=frame["m"] * frame["k"])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for axis, side in zip(axes, ("encoder", "decoder")):
        for (name, layers), group in frame.groupby(["variant", "layers"]):
            means = group.groupby("samples")[f"snr_{side}_mean"].mean()
            axis.plot(means.index, means.values, "o-", label=f"{name}, {layers} layer(s)")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("samples per image (M·K)")
        axis.set_ylabel(f"{side} gradient SNR (mean over components)")
        axis.set_title("encoder (φ)" if side == "encoder" else "decoder (θ)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def tables(frame: pd.DataFrame, summary: pd.DataFrame, baseline: str | None = None) -> str:
    """The Table-1 layout of the first stage, then Table 2's of a continued stage, if any."""
    parts = [markdown_table(summary, baseline)] if len(summary) else []
    return "\n\n".join([*parts, table2(frame)]).strip("\n")


def table_text(frame: pd.DataFrame, summary: pd.DataFrame, fmt: str, baseline: str | None = None) -> str:
    if fmt == "markdown":
        return tables(frame, summary, baseline)
    if fmt == "csv":
        return summary.to_csv(index=False)
    return summary.to_json(orient="records", indent=1)
