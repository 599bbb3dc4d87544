"""The columns of the sweep's three Parquet files, each once: its name, its type and what it holds.
They make the files' pyarrow schemas (each field's description in its metadata, so a reader of the
file without this package sees it too) and docs/columns.md (`python -m sweep.columns`)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from iwae_model.objectives import OBJECTIVES, ObjectiveDefinitionError, parameters


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    description: str
    optional: bool = False  # added within this schema version: files written before lack it (absent is null)


@dataclass(frozen=True)
class Schema:
    file: str  # under the sweep folder
    version: int
    version_key: str  # in the file's metadata
    about: str
    columns: tuple[Column, ...]  # those every file of this version has
    parameters_after: str | None = None  # where the objectives' parameters go, one column each

    def all_columns(self) -> tuple[Column, ...]:
        """The columns with the registered objectives' parameters (plugins add theirs; a file
        written without a plugin has none of its columns, which readers take as absent)."""
        if self.parameters_after is None:
            return self.columns
        at = [c.name for c in self.columns].index(self.parameters_after) + 1
        return (*self.columns[:at], *parameter_columns(), *self.columns[at:])

    def arrow(self) -> pa.Schema:
        return pa.schema(
            [pa.field(c.name, c.type, metadata={"description": c.description}) for c in self.all_columns()],
            metadata={self.version_key: str(self.version)},
        )


def parameter_columns() -> tuple[Column, ...]:
    """One column per objective parameter: its value on every row, the default where the row's
    objective does not take it (as TrainConfig holds it). A parameter named like another column
    (or a space file's `mk`) is refused, naming its class."""
    taken = {c.name for schema in SCHEMAS for c in schema.columns} | {"mk"}
    for cls in OBJECTIVES.values():
        if clash := sorted(taken & {p.name for p in cls.parameters}):
            raise ObjectiveDefinitionError(
                f"objective class {cls.__qualname__} (name {cls.name!r}): its parameter(s) {clash} are the names of "
                f"results columns or space-file keys; rename them"
            )
    return tuple(
        Column(
            p.name,
            INT if p.integer else FLOAT,
            f"the trial's configuration: {' and '.join(o.name for o in OBJECTIVES.values() if p in o.parameters)}'s "
            f"{p.name}, {p.help} (its default {p.default:g} on other objectives' rows)",
        )
        for p in parameters().values()
    )


def _columns(*specs: tuple[str, pa.DataType, str]) -> tuple[Column, ...]:
    return tuple(Column(*spec) for spec in specs)


STRING, INT, FLOAT = pa.string(), pa.int64(), pa.float64()

RESULTS = Schema(
    "results/results.parquet",
    6,
    "iwae_sweep.schema_version",
    "one row per evaluated checkpoint",
    _columns(
        ("sweep", STRING, "the sweep's name"),
        ("trial_id", STRING, "Ray's trial id"),
        ("trial_name", STRING, "the configuration's label, e.g. iwae_L1_M1_K5_s0"),
        ("objective", STRING, "the trial's configuration: its training objective"),
        ("m", INT, "the trial's configuration: MIWAE's M (1 otherwise)"),
        ("k", INT, "the trial's configuration: importance samples per bound"),
        ("layers", INT, "the trial's configuration: stochastic layers"),
        ("estimator", STRING, "the trial's configuration: gradient estimator"),
        ("seed", INT, "the trial's configuration: seed"),
        ("passes", INT, "the trial's configuration: passes over the training set"),
        ("schedule", STRING, "the trial's configuration: learning-rate schedule"),
        ("dataset", STRING, "the trial's configuration: dataset"),
        (
            "binarization",
            STRING,
            "of the data evaluated on: dynamic, static, threshold, or fixed (binarized_mnist: the files' bits)",
        ),
        ("train_images", INT, "the trial's configuration: training images (null: the whole training set)"),
        ("data_files", STRING, "the files the evaluation read, as JSON {file name: SHA-256}"),
        ("eval_k", INT, "importance samples of the NLL estimate"),
        ("eval_images", INT, "test images of the NLL estimate"),
        (
            "comparable_to_papers",
            pa.bool_(),
            "the dataset's binarization, full training set and schedule, k >= 5000, the whole test set",
        ),
        ("test_nll", FLOAT, "-mean log p(x) over the test images (nats)"),
        ("test_nll_se", FLOAT, "test_nll's standard error"),
        ("test_bound", FLOAT, "the training objective's bound on the same images"),
        ("test_bound_name", STRING, "that bound's name, e.g. IWAE(K=5)"),
        ("train_bound", FLOAT, "the training bound at the evaluated checkpoint's last pass"),
        ("valid_bound", FLOAT, "the validation bound at the evaluated checkpoint's last pass"),
        (
            "active_units",
            pa.list_(pa.field("element", INT)),
            "per stochastic layer (Burda: variance of the posterior mean > 0.01)",
        ),
        ("epochs", INT, "passes trained at the checkpoint"),
        ("train_seconds", FLOAT, "wall-clock training seconds at the checkpoint"),
        ("eval_seconds", FLOAT, "the evaluation's wall clock (s)"),
        ("device", STRING, "the evaluation's device"),
        ("checkpoint_uri", STRING, "where the evaluated checkpoint lies"),
        ("project_version", STRING, "iwae-sweep's version"),
        ("timestamp", pa.timestamp("ms", tz="UTC"), "UTC time of the evaluation"),
        ("config", STRING, "the trial's whole iwae_model.TrainConfig as JSON (lr, schedule, ...)"),
        (
            "plugins",
            STRING,
            "the plugins that define the trial's objective and dataset, as a JSON list of {module, file, sha256} "
            "(null: built-in ones)",
            True,
        ),
        ("ess_mean", FLOAT, "effective sample size of the k importance weights, mean over test images"),
        ("ess_median", FLOAT, "effective sample size of the k importance weights, median over test images"),
        ("pareto_k_above_0_7", FLOAT, "share of test images whose PSIS k̂ > 0.7 (NLL estimate unreliable)"),
        ("pareto_k_max", FLOAT, "the largest PSIS k̂ over test images"),
        ("noise", STRING, "the q-noise stream: rows with equal values saw the same noise per image"),
        ("evaluation_id", STRING, "this checkpoint's evaluation; its per-image rows carry the same id"),
        ("snr_epoch", INT, "the pass of the last gradient-SNR measurement (null: none was made)"),
        (
            "snr_encoder_mean",
            FLOAT,
            "encoder gradient SNR |mean| / std (Rainforth et al.), mean over parameter components",
        ),
        ("snr_encoder_median", FLOAT, "encoder gradient SNR, median over parameter components"),
        ("snr_decoder_mean", FLOAT, "decoder gradient SNR, mean over parameter components"),
        ("snr_decoder_median", FLOAT, "decoder gradient SNR, median over parameter components"),
        ("snr", STRING, "every SNR figure of that pass as JSON (per stochastic layer for 2 layers)"),
        ("sweep_stage", INT, "1, or 2 for a trial of the space's `continue` stage (Burda's Table 2)"),
        ("parent_trial_name", STRING, "a stage-2 trial's parent"),
        ("parent_checkpoint_uri", STRING, "the checkpoint a stage-2 trial started from"),
        (
            "train_device",
            STRING,
            "the evaluated checkpoint's last run's device (cpu also where Ray gave a rehearsal node's advertised GPU)",
        ),
        ("train_node_id", STRING, "the Ray node of the evaluated checkpoint's last run"),
        ("train_node_ip", STRING, "that node's IP"),
        ("train_hostname", STRING, "that node's host name"),
        (
            "train_nodes",
            STRING,
            "every run of the trial up to that checkpoint as JSON: node, device, float32, gpu_name, "
            "gpu_capability, Ray GPU ids, gpus_advertised_only, started_at (Unix time), first_epoch (a restart "
            "after a crash or node loss adds one), generator_reseeded (that run resumed on another device type)",
        ),
        ("eval_node_id", STRING, "the Ray node that ran the evaluation"),
        ("eval_node_ip", STRING, "that node's IP"),
        ("eval_hostname", STRING, "that node's host name"),
        ("eval_float32", STRING, "float32 precision of matmuls and convolutions in the evaluation: ieee (no TF32)"),
        ("eval_gpu_name", STRING, "on CUDA, the evaluation's GPU (null on CPU)"),
        ("eval_gpu_capability", STRING, "on CUDA, its compute capability (null on CPU)"),
        ("train_float32", STRING, "float32 precision of matmuls and convolutions in that run: ieee (no TF32)"),
        ("train_gpu_name", STRING, "on CUDA, that run's GPU (null on CPU)"),
        ("train_gpu_capability", STRING, "on CUDA, its compute capability (null on CPU)"),
        (
            "generator_reseeded_at",
            INT,
            "the first pass trained after a resume on another device type (its generator seeded from "
            "(seed, step)): from it on the run is not bit-identical to one that never moved; null: never",
        ),
        (
            "rank_metric",
            STRING,
            "what ranked the trials and checkpoints (never a test figure): valid_ll, an importance-sampled "
            "log-likelihood on the validation images, where trials differ in objective, K or M and are ranked "
            "against each other; else valid_bound",
        ),
        ("rank_metric_k", INT, "valid_ll's k (null with valid_bound)"),
        ("rank_metric_value", FLOAT, "the ranking metric at the evaluated checkpoint"),
        ("searched", STRING, "a search's drawn values as JSON {key: value} (null: a grid)"),
        (
            "ais_steps",
            INT,
            "AIS, with the space's evaluation.ais (every ais_ column null where it is off; docs/ais.md): "
            "annealing distributions",
        ),
        ("ais_chains", INT, "AIS chains per image"),
        ("ais_start", STRING, "where AIS chains start: encoder or prior"),
        ("ais_leapfrog", INT, "leapfrog steps per HMC transition"),
        ("ais_images", INT, "the first test images AIS ran on (at most eval_images)"),
        ("ais_nll", FLOAT, "-mean AIS log p(x) over those images (nats)"),
        ("ais_nll_se", FLOAT, "ais_nll's standard error"),
        ("ais_is_nll", FLOAT, "the IS estimate (test_nll's) on the same images"),
        ("ais_is_nll_se", FLOAT, "ais_is_nll's standard error"),
        (
            "ais_minus_is",
            FLOAT,
            "paired AIS - IS in log p(x) on those images, mean over images (> 0: the IS estimate falls at least "
            "about this far below log p(x))",
        ),
        ("ais_minus_is_se", FLOAT, "ais_minus_is's standard error over images"),
        ("ais_acceptance", FLOAT, "mean HMC acceptance probability (about 0.65 once step sizes adapted)"),
        ("ais_log_weight_sd_median", FLOAT, "median over images of the chains' log-weight SD (nats)"),
        ("ais_seconds", FLOAT, "AIS's wall clock (eval_seconds is the IS evaluation's)"),
    ),
    parameters_after="k",
)

TRIALS = Schema(
    "results/trials.parquet",
    1,
    "iwae_sweep.trials_schema_version",
    "one row per trial, evaluated or not (a search's analyses need every trial, `best: top` evaluates a few)",
    _columns(
        ("trial_id", STRING, "Ray's trial id"),
        ("trial_name", STRING, "the configuration's label"),
        (
            "status",
            STRING,
            "finished, not finished (stopped early by ASHA), failed, or while the sweep runs, running, waiting "
            "(to resume) or paused",
        ),
        ("epochs", INT, "passes trained"),
        ("searched", STRING, "the values a search drew, as JSON (null: a grid)"),
        ("rank_metric", STRING, "what ranked the trials: valid_ll or valid_bound"),
        ("rank_metric_k", INT, "valid_ll's k (null with valid_bound)"),
        ("rank_metric_value", FLOAT, "the trial's best kept checkpoint's ranking metric"),
    ),
)

PER_IMAGE = Schema(
    "results/per_image.parquet",
    2,
    "iwae_sweep.per_image_schema_version",
    "one row per evaluated checkpoint and test image",
    _columns(
        ("evaluation_id", STRING, "which evaluation (results.parquet's evaluation_id)"),
        ("trial_id", STRING, "Ray's trial id"),
        ("trial_name", STRING, "the configuration's label"),
        ("checkpoint_uri", STRING, "the evaluated checkpoint"),
        ("image", INT, "index into the fixed-binarised test set"),
        ("nll", FLOAT, "-log p(x) estimate (nats)"),
        ("ess", FLOAT, "effective sample size of the k importance weights"),
        ("pareto_k", FLOAT, "PSIS k̂ (NaN for k < 25)"),
        ("ais_nll", FLOAT, "-log p(x) by AIS (nats); null beyond the first ais_images images, or AIS off"),
    ),
)

SCHEMAS = (RESULTS, TRIALS, PER_IMAGE)


def markdown() -> str:
    """docs/columns.md: every file's columns, as the schemas above say."""
    parts = [
        "# The results' columns\n\n"
        "Written by `python -m sweep.columns` from `sweep/columns.py`, which also makes the files' schemas;\n"
        "each file's schema holds the same descriptions, `pyarrow.parquet.read_schema(path).field(name).metadata`\n"
        "(files written before the descriptions were added have none).\n"
    ]
    for schema in SCHEMAS:
        parts.append(
            f"\n## {schema.file}\n\n{schema.about[0].upper()}{schema.about[1:]}; schema version {schema.version} "
            f"(`{schema.version_key}` in the file's metadata).\n\n| column | type | what it holds |\n|---|---|---|\n"
        )
        parts.extend(
            f"| `{c.name}` | `{c.type}` | {c.description.replace('|', '&#124;')} |\n" for c in schema.all_columns()
        )
    return "".join(parts)


if __name__ == "__main__":
    print(markdown(), end="")
