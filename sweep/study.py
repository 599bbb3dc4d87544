"""A search's trials (results/trials.parquet: every trial, with its drawn values and the metric
that ranked it) as a table, best first, beside the test NLL of the evaluated ones
(results.parquet), and as an Optuna study for the figures people expect from sweep tools: each
searched parameter's importance, parallel coordinates, the metric against each parameter.

The study is built in memory from the Parquet rows (Optuna need not have run the trials, and
random search works the same); each parameter's distribution is the space file's (log scales
kept), or, for a bare Parquet file, the range of the values drawn. Its objective is the ranking
metric on the validation images, never the test NLL.
"""

from __future__ import annotations

import json
import warnings

import optuna
import pandas as pd

from .results import ResultsError
from .space import Distribution

MIN_TRIALS_PER_PARAMETER = 10  # below this, importance figures are mostly noise (a forest of few points)


def searched(frame: pd.DataFrame) -> pd.DataFrame:
    """The drawn values of the trials that reported the metric, one column per searched key;
    ResultsError unless these rows are a search's."""
    rows = frame[frame["searched"].notna() & frame["rank_metric_value"].notna()]
    if rows.empty:
        raise ResultsError(
            "these results are not a search's: no row has drawn values (`searched`); a grid sweep's "
            "table is python -m sweep.query SWEEP_DIR without --importance or --parallel-plot"
        )
    return pd.DataFrame([json.loads(values) for values in rows["searched"]], index=rows.index)


def search_table(trials: pd.DataFrame, results: pd.DataFrame) -> str:
    """The trials best first by the metric that ranked them, the drawn values as columns, the
    k-sample test NLL of the evaluated ones beside them."""
    values = searched(trials)
    rows = trials.loc[values.index].assign(**{f"drawn {key}": values[key] for key in values.columns})
    rows = rows.merge(results[["trial_id", "test_nll", "test_nll_se"]], on="trial_id", how="left")
    rows = rows.sort_values("rank_metric_value", ascending=False)
    metric, k = rows["rank_metric"].iloc[0], rows["rank_metric_k"].iloc[0]
    metric_name = f"{metric} (k={int(k)})" if pd.notna(k) else metric
    header = ["trial", *values.columns, metric_name, "passes", f"test NLL (k={int(results['eval_k'].min())})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in rows.iterrows():
        drawn = [_shown(row[f"drawn {key}"]) for key in values.columns]
        nll = f"{row['test_nll']:.2f} ± {row['test_nll_se']:.2f}" if pd.notna(row["test_nll"]) else "not evaluated"
        passes = str(row["epochs"]) + (f" ({row['status']})" if row["status"] != "finished" else "")
        lines.append(
            f"| {row['trial_name']} | " + " | ".join(drawn) + f" | {row['rank_metric_value']:.2f} | {passes} | {nll} |"
        )
    failed = int((trials["status"] == "failed").sum())
    return "\n".join(
        [
            f"Search: {len(rows)} trials, best first by {metric_name} on the validation images "
            f"(higher is better; the test NLL is shown, never used to rank)" + (f"; {failed} failed" if failed else ""),
            *lines,
        ]
    )


def _shown(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else str(value)


def study(frame: pd.DataFrame, space: dict[str, Distribution] | None = None) -> optuna.Study:
    """The search as a finished Optuna study, maximising the ranking metric; `space`: the
    search's distributions, where known."""
    values = searched(frame)
    space = space or {}
    distributions = {key: _optuna(space[key]) if key in space else _distribution(values[key]) for key in values.columns}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = optuna.create_study(direction="maximize")
    for index, row in values.iterrows():
        params = {key: _param(row[key]) for key in values.columns}
        result.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=distributions, value=float(frame.loc[index, "rank_metric_value"])
            )
        )
    return result


def _param(value):
    return json.dumps(value) if isinstance(value, list) else value


def _optuna(distribution: Distribution) -> optuna.distributions.BaseDistribution:
    kind, values = distribution.kind, distribution.values
    if kind == "choice":
        return optuna.distributions.CategoricalDistribution([_param(v) for v in values])
    low, high = values
    if kind in ("uniform", "loguniform"):
        return optuna.distributions.FloatDistribution(low, high, log=kind == "loguniform")
    return optuna.distributions.IntDistribution(low, high - 1, log=kind == "lograndint")  # Tune's high is excluded


def _distribution(column: pd.Series) -> optuna.distributions.BaseDistribution:
    drawn = [_param(value) for value in column]
    if all(isinstance(v, bool) or isinstance(v, str) for v in drawn) or column.nunique() < 2:
        return optuna.distributions.CategoricalDistribution(sorted(set(drawn), key=str))
    if all(isinstance(v, int) for v in drawn):
        return optuna.distributions.IntDistribution(min(drawn), max(drawn))
    return optuna.distributions.FloatDistribution(min(drawn), max(drawn))


def importance_text(frame: pd.DataFrame, space: dict[str, Distribution] | None = None) -> str:
    """Each searched parameter's importance (Optuna's fANOVA) for the ranking metric."""
    found = study(frame, space)
    parameters = len(found.trials[0].params)
    if len(found.trials) < 2:
        raise ResultsError("--importance needs at least 2 finished trials of the search")
    importances = optuna.importance.get_param_importances(
        found, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
    )
    metric = frame["rank_metric"].dropna().iloc[0]
    lines = [
        f"Importance of each searched parameter for {metric} (Optuna's fANOVA, {len(found.trials)} trials; "
        f"shares sum to 1):"
    ]
    lines += [f"  {name:<14} {share:6.3f}" for name, share in importances.items()]
    needed = MIN_TRIALS_PER_PARAMETER * parameters
    if len(found.trials) < needed:
        lines.append(
            f"Only {len(found.trials)} trials for {parameters} parameter(s): the figures become meaningful "
            f"with about {needed} ({MIN_TRIALS_PER_PARAMETER} per parameter); below that they are mostly "
            f"noise of the random forest."
        )
    return "\n".join(lines)


def save_plots(
    frame: pd.DataFrame, parallel: str | None, slices: str | None, space: dict[str, Distribution] | None = None
) -> None:
    """Optuna's parallel-coordinates plot and the metric against each parameter, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import NullFormatter

    found = study(frame, space)
    metric = frame["rank_metric"].dropna().iloc[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        from optuna.visualization import matplotlib as optuna_plots

        for path, draw in ((parallel, optuna_plots.plot_parallel_coordinate), (slices, optuna_plots.plot_slice)):
            if path is None:
                continue
            axes = draw(found, target_name=metric)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.set_size_inches(max(7.0, 3.5 * len(found.trials[0].params) + 2), 4.8)
            for axis in figure.axes:  # a log axis's minor labels run into each other
                axis.xaxis.set_minor_formatter(NullFormatter())
            figure.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(figure)
