"""Search-space files (`search_spaces/*.yaml`): what a sweep trains and how it is evaluated.

Format (every section but `experiments` is optional; defaults below):

    name: quick                   # the sweep's folder name under --storage
    description: free text
    plugins: [my_bounds.py]       # optional: your own objectives, .py files relative to this file
                                  # or module names (as sweep.run --plugin; docs/plugins.md)
    experiments:                  # a list of grids; the sweep is the union of their products
      - objective: [vae, iwae]    # a list is a grid axis, a scalar a constant
        k: [1, 5]
        layers: 1
      - objective: miwae
        mk: [[4, 16], [8, 8]]     # (M, K) pairs; with `mk_product`, each must multiply to it
    mk_product: 64                # optional: the declared M*K of every `mk` pair in the file
    seeds: [0]                    # every configuration is trained once per seed
    training:                     # iwae_model.TrainConfig fields shared by all trials
      passes: 3280                # the full Burda schedule; fewer compresses or truncates it
      schedule: compressed
    evaluation:
      k: 5000
      images: null                # null: the whole test set (comparable to the papers)
      best: each                  # each: the best checkpoint of every trial; top: the `top` best trials
      top: 5
      ais:                        # optional (absent: off): annealed importance sampling beside the
        steps: 1000               # IS estimate, in the same task, on its first `images` test images
        images: 100               # (default 100, or evaluation.images if fewer; null: all IS evaluates)
        chains: 16                # chains per image (Wu et al.: 16)
        start: encoder            # encoder (q(h|x), "AIS + encoder") or prior (docs/ais.md)
    resources:
      cpus_per_trial: 1
      gpus_per_trial: 0           # fractions allowed: 0.25 runs four trials per GPU
      eval_gpus: 0                # GPUs for each evaluation (0: CPU)
      eval_actors: 1              # evaluations at once after training, sharing the cores (with
                                  # best: each, each trial's starts when it finishes, if resources
                                  # are free and no trial waits for them)
    tracker: mlflow               # optional (absent: none): each trial an MLflow or W&B run, as
                                  # sweep.run --tracker; mlflow=URI logs to that tracking server,
                                  # mlflow alone to a store in the sweep folder; wandb to Weights &
                                  # Biases (WANDB_MODE=offline: files in the sweep folder) (docs/trackers.md)
    checkpoints:
      keep: 2                     # Ray keeps the best `keep` by the ranking metric, plus the latest
      every: 1                    # passes between checkpoints (the last pass always has one)
    continue:                     # optional second stage (Burda et al.'s Table 2), trained after the first:
      training: {passes: 2187, lr: 0.0001, schedule: constant}   # TrainConfig fields for every stage-2 trial
      switch:                     # each first-stage trial matching `from` continues with `to`'s settings,
        - from: {objective: vae, k: 1}      # from its best checkpoint (by the ranking metric)
          to: {objective: iwae, k: 50}

Experiment keys: objective, k, m, mk, layers, estimator, the objectives' parameters (CIWAE's
beta, VR's alpha, a plugin's own), plus any `training` key.

A search (instead of only grids): any trial or training key, in `experiments` or `training`,
may be a distribution instead of a constant or a grid list, and a `search` section says how
the trials are drawn:

    experiments:
      - objective: ciwae
        k: 64
        beta: {uniform: [0.0, 1.0]}        # also loguniform: [low, high], randint / lograndint:
    training:                               # [low, high) integers, choice: [a, b, ...] any values
      lr: {loguniform: [1.0e-4, 3.0e-3]}
    search:
      algorithm: random                     # random (Ray Tune's own sampling) or optuna (TPE)
      samples: 20                           # trials drawn (random: per grid point)
      max_concurrent: 4                     # trials at once (default: as many as fit)
      seed: 0                               # the searcher's seed: the same seed draws the same trials
      asha: false                           # stop poor trials early (as sweep.run --asha)

A distribution applies to every grid point of the file. A search, a grid under ASHA
(sweep.run --asha) and `best: top` rank trials, for the searcher, ASHA and the evaluation, by
`valid_ll` (an importance-sampled log-likelihood estimate on the validation images, k = FAIR_K
unless `training.valid_ll_k` says otherwise) whenever the trials can differ in objective, K, M
or CIWAE's beta, since each objective's own bound is not comparable across them; otherwise by
`valid_bound`. Never by a test-set figure.

Errors name the file, the key, the value and what is allowed, before any trial starts. So
does a setting whose trial or evaluation would need more memory than one may use
(MEMORY_LIMIT, 16 GiB, estimated from the model's layer sizes on the device the resources
give it): a K, M, batch size, likelihood k, AIS chains or SNR setting far past the papers'.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from iwae_model import TrainConfig, build_model
from iwae_model.ais import STARTS, TUNING_CHAINS
from iwae_model.config import settings
from iwae_model.datasets import DATASETS
from iwae_model.errors import IWAEError
from iwae_model.likelihood import default_image_batch
from iwae_model.objectives import OBJECTIVES, ObjectiveDefinitionError, parameters
from iwae_model.plugins import PluginError, load_plugin, load_recorded

from .columns import parameter_columns

SPACES_DIR = Path(__file__).resolve().parent / "search_spaces"  # the checkout's search_spaces/, linked
DEFAULT_SPACE = "quick"


def shipped_spaces() -> list[str]:
    """The names of the spaces in search_spaces/, for `--space NAME`."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def trial_keys() -> tuple[str, ...]:
    """What an experiment's grid says of a trial: the objective, its samples and parameters
    (every registered objective's: plugins add theirs), the model and estimator."""
    return ("objective", "k", "m", *parameters(), "layers", "estimator")


def training_keys() -> tuple[str, ...]:
    """The other training settings, shared by a file's trials under `training`. init_* are set
    by a `continue` section, never by hand: a sweep's parents are its own trials."""
    trial = trial_keys()
    return tuple(s.name for s in settings() if s.name not in (*trial, "seed") and not s.name.startswith("init_"))


def likelihood_key(config: TrainConfig) -> tuple:
    """What makes two trials' own bounds incomparable: objective, K, M and the objective's own
    parameters (CIWAE's beta mixes two bounds)."""
    own = tuple(getattr(config, p.name) for p in OBJECTIVES[config.objective].parameters)
    return (config.objective, config.k, config.m, *own)


AIS_SECTION = {"steps": int, "images": (int, type(None)), "chains": int, "start": str}
AIS_IMAGES = 100  # evaluation.ais.images unless given (or evaluation.images if fewer), as evaluate's --ais-images
SEARCH_SECTION = {"algorithm": str, "samples": int, "max_concurrent": int, "seed": int, "asha": bool}
ALGORITHMS = ("random", "optuna")
RANGES = {"uniform": float, "loguniform": float, "randint": int, "lograndint": int}  # the kind of key each takes
DISTRIBUTIONS = (*RANGES, "choice")
# Trials that differ in likelihood_key (their bounds differ) are ranked by valid_ll, never by their
# own bounds. FAIR_K is that estimate's k (docs/search.md: the k=5000 order at a fifth of its cost).
FAIR_K = 1000
# What a stage-2 trial's init_from held, in the specs of sweeps started before init_label alone
# named its parent until its best checkpoint is known.
STAGE_1 = "stage 1: "
BEST_MODES = ("each", "top")
TRACKERS = ("mlflow", "wandb")  # sweep.trackers


class SpaceError(IWAEError, ValueError):
    """A search-space file that cannot be run; the message names the file, key and fix."""


class SettingError(SpaceError):
    """A sweep setting's bad value, raised by the setting itself: `key` as a space file spells it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message

    def __reduce__(self) -> tuple:
        return SettingError, (self.key, self.message)


def yaml_key(default: Any, types: type | tuple[type, ...]) -> Any:
    """A field of a space file's section: its default and the YAML types it takes (SECTIONS)."""
    return field(default=default, metadata={"types": types})


FOLDER_NAME_RULE = "must be a folder name of letters, digits, '_', '-' and '.'"


def is_folder_name(name: Any) -> bool:
    """A sweep's name (the space file's `name`, sweep.run's --name): one folder right under the
    storage, never a path that leaves it or nests."""
    return isinstance(name, str) and re.fullmatch(r"[\w.-]+", name) is not None and name not in (".", "..")


@dataclass(frozen=True)
class AISSettings:
    """`evaluation.ais`: AIS beside the IS estimate on its first `images` test images (None: all
    that IS evaluates), `steps` distributions, `chains` chains per image (iwae_model.ais)."""

    steps: int
    images: int | None = AIS_IMAGES
    chains: int = 16
    start: str = "encoder"

    def images_of(self, evaluated: int) -> int:
        """The images AIS runs on where IS evaluates the first `evaluated`: AIS is compared with IS
        on the same images, so never more (`sweep.evaluate --images` may lower IS's)."""
        return min(self.images or evaluated, evaluated)


@dataclass(frozen=True)
class EvaluationSettings:
    k: int = yaml_key(5000, int)
    images: int | None = yaml_key(None, (int, type(None)))
    best: str = yaml_key("each", str)
    top: int = yaml_key(5, int)
    ais: AISSettings | None = yaml_key(None, (dict, type(None)))  # None: off; a dict in the file

    def __post_init__(self) -> None:
        if self.best not in BEST_MODES:
            raise SettingError("evaluation.best", f"{self.best!r}: choose one of {', '.join(BEST_MODES)}")
        if self.k < 1 or self.top < 1 or (self.images is not None and self.images < 1):
            raise SettingError("evaluation", "k, top and images must be positive")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvaluationSettings:
        ais = d.get("ais")  # absent in the spec of a sweep started before AIS
        return cls(**{**d, "ais": AISSettings(**ais) if ais else None})


@dataclass(frozen=True)
class Resources:
    cpus_per_trial: float = yaml_key(1, (int, float))
    gpus_per_trial: float = yaml_key(0, (int, float))
    eval_gpus: float = yaml_key(0, (int, float))
    eval_actors: int = yaml_key(1, int)

    def __post_init__(self) -> None:
        for f in fields(self):
            if not math.isfinite(getattr(self, f.name)):
                raise SettingError(f"resources.{f.name}", f"{getattr(self, f.name)!r}: must be a finite number")
        if self.cpus_per_trial <= 0:
            raise SettingError(
                "resources.cpus_per_trial", f"{self.cpus_per_trial}: must be > 0 (Ray refuses an empty bundle)"
            )
        if self.gpus_per_trial < 0 or self.eval_gpus < 0 or self.eval_actors < 1:
            raise SettingError("resources", "GPU counts must be >= 0 and eval_actors >= 1")
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise SettingError("resources.gpus_per_trial", f"{self.gpus_per_trial}: above 1, ask for whole GPUs")


@dataclass(frozen=True)
class Checkpoints:
    keep: int = yaml_key(2, int)
    every: int = yaml_key(1, int)

    def __post_init__(self) -> None:
        if self.keep < 1 or self.every < 1:
            raise SettingError("checkpoints", "keep and every must be positive")


# A space file's settings sections: their keys and the YAML types each takes, from the fields.
SECTIONS = {
    name: {f.name: f.metadata["types"] for f in fields(cls)}
    for name, cls in (("evaluation", EvaluationSettings), ("resources", Resources), ("checkpoints", Checkpoints))
}
TOP_LEVEL = {
    "name",
    "description",
    "plugins",
    "experiments",
    "mk_product",
    "seeds",
    "training",
    "continue",
    "search",
    "tracker",
}
TOP_LEVEL.update(SECTIONS)


@dataclass(frozen=True)
class Distribution:
    """One searched key's distribution: a range (`low`, `high`) or the choices."""

    kind: str
    values: tuple

    def to_dict(self) -> dict[str, list]:
        return {self.kind: list(self.values)}

    def __str__(self) -> str:
        return f"{self.kind}{list(self.values)}"


@dataclass(frozen=True)
class Search:
    algorithm: str = "random"
    samples: int = 10
    max_concurrent: int | None = None
    seed: int = 0
    asha: bool = False
    distributions: dict[str, Distribution] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "distributions"},
            "distributions": {key: d.to_dict() for key, d in self.distributions.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Search:
        return cls(
            **{
                **d,
                "distributions": {
                    key: Distribution(kind, tuple(values))
                    for key, value in d["distributions"].items()
                    for kind, values in value.items()
                },
            }
        )


@dataclass(frozen=True)
class SweepSpace:
    name: str
    source: str
    trials: list[TrainConfig]
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    resources: Resources = field(default_factory=Resources)
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    description: str = ""
    # Stage 2: trials that start from a stage-1 trial's best checkpoint; init_label names it, and
    # init_from is None until the sweep knows the checkpoint.
    continued: list[TrainConfig] = field(default_factory=list)
    # sweep.run --init-from-sweep: stage 1 is that sweep's (finished) trials, not trained here.
    init_from_sweep: str | None = None
    # A search: `trials` are its grid points, each with the distributions' keys still at their
    # defaults; the searcher draws those.
    search: Search | None = None
    # sweep.run --asha on a grid (a search says it in its `search` section).
    asha: bool = False
    # "mlflow", "mlflow=URI" or "wandb" (sweep.trackers); fixed when the sweep starts.
    tracker: str | None = None
    # The plugins defining its objectives (iwae_model.plugins records: module, file, SHA-256),
    # shipped to every Ray node and checked unchanged on resume.
    plugins: tuple[dict[str, str], ...] = ()

    @property
    def early_stopped(self) -> bool:
        """Whether ASHA stops poor trials early."""
        return self.asha or bool(self.search and self.search.asha)

    @property
    def ranked_by_likelihood(self) -> bool:
        """Whether trials ranked against each other (a search, ASHA, `best: top`) can differ in
        objective, K, M or the objective's parameters, whose bounds are not comparable."""
        ranked = {"objective", "k", "m", *parameters()}
        differ = len({likelihood_key(t) for t in self.trials}) > 1 or bool(
            self.search and set(self.search.distributions) & ranked
        )
        return differ and (self.search is not None or self.asha or self.evaluation.best == "top")

    def with_asha(self) -> SweepSpace:
        """This sweep with ASHA stopping poor trials early, its trials measuring the metric that
        ranks them."""
        return dataclasses.replace(self, asha=True).measuring_rank()

    def measuring_rank(self) -> SweepSpace:
        """Where `ranked_by_likelihood`, every trial measures valid_ll (at FAIR_K unless it says)."""
        if not self.ranked_by_likelihood:
            return self

        def measured(configs: list[TrainConfig]) -> list[TrainConfig]:
            return [t if t.valid_ll_k else dataclasses.replace(t, valid_ll_k=FAIR_K) for t in configs]

        return dataclasses.replace(self, trials=measured(self.trials), continued=measured(self.continued))

    @property
    def metric(self) -> str:
        """What ranks trials and checkpoints: valid_ll where `ranked_by_likelihood` (its trials
        measure it: parse_space sets their valid_ll_k), else valid_bound."""
        measured = all(t.valid_ll_k for t in [*self.trials, *self.continued])
        return "valid_ll" if self.ranked_by_likelihood and measured else "valid_bound"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "description": self.description,
            "trials": [t.to_dict() for t in self.trials],
            "continued": [t.to_dict() for t in self.continued],
            "init_from_sweep": self.init_from_sweep,
            "evaluation": dataclasses.asdict(self.evaluation),
            "resources": dataclasses.asdict(self.resources),
            "checkpoints": dataclasses.asdict(self.checkpoints),
            "search": self.search.to_dict() if self.search else None,
            "asha": self.asha,
            "tracker": self.tracker,
            "plugins": list(self.plugins),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpace:
        """The space a sweep's spec recorded; its plugins loaded first (their objectives are its
        trials'), each refused if its code changed since."""
        plugins = tuple(d.get("plugins", ()))
        for record in plugins:
            load_recorded(record, "the sweep's spec")
        return cls(
            name=d["name"],
            source=d["source"],
            description=d["description"],
            trials=[TrainConfig.from_dict(t) for t in d["trials"]],
            evaluation=EvaluationSettings.from_dict(d["evaluation"]),
            resources=Resources(**d["resources"]),
            checkpoints=Checkpoints(**d["checkpoints"]),
            continued=[
                TrainConfig.from_dict({**t, "init_from": None} if str(t.get("init_from")).startswith(STAGE_1) else t)
                for t in d.get("continued", [])
            ],
            init_from_sweep=d.get("init_from_sweep"),
            search=Search.from_dict(d["search"]) if d.get("search") else None,
            asha=d.get("asha", False),
            tracker=parse_tracker(d["tracker"], "tracker") if d.get("tracker") is not None else None,
            plugins=plugins,
        )


def resolve_space_path(space: str) -> Path:
    """A path to a YAML file, or the name of one shipped in search_spaces/ (e.g. `quick`)."""
    path = Path(space)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SpaceError(f"--space {space}: no such file")
        return path
    shipped = SPACES_DIR / f"{space}.yaml"
    if not shipped.is_file():
        names = ", ".join(shipped_spaces())
        raise SpaceError(f"--space {space}: not a file and not a shipped space (shipped: {names})")
    return shipped


def load_space(space: str | Path = DEFAULT_SPACE) -> SweepSpace:
    path = resolve_space_path(str(space))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SpaceError(f"{path}: cannot be read as UTF-8 text ({error}); a search space is a YAML file") from None
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as error:
        raise SpaceError(f"{path}: not valid YAML: {error}") from None
    return parse_space(raw, str(path))


def parse_tracker(value: Any, where: str) -> str:
    """A tracker setting, `mlflow`, `mlflow=TRACKING_URI` or `wandb`, as given; `where` names it in the error."""
    kind, equals, uri = value.partition("=") if isinstance(value, str) else ("", "", "")
    if kind not in TRACKERS or (equals and (kind != "mlflow" or not uri.strip())):
        raise SpaceError(
            f"{where}: {value!r}: expected mlflow (a store in the sweep folder), "
            f"mlflow=TRACKING_URI (e.g. mlflow=http://mlflow.internal:5000) or wandb (Weights & Biases)"
        )
    return value


def parse_space(raw: Any, source: str) -> SweepSpace:
    def fail(key: str, message: str) -> SpaceError:
        return SpaceError(f"{source}: {key}: {message}")

    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: expected a mapping of sections ({', '.join(sorted(TOP_LEVEL))})")
    for key in raw:
        if key not in TOP_LEVEL:
            raise fail(key, f"unknown key; allowed top-level keys: {', '.join(sorted(TOP_LEVEL))}")
    name = raw.get("name", Path(source).stem)
    if not is_folder_name(name):
        raise fail("name", f"{name!r}: {FOLDER_NAME_RULE}")
    plugins = _plugins(raw.get("plugins", []), Path(source).parent, fail)

    sections = {}
    for section, schema in SECTIONS.items():
        values = raw.get(section)
        values = {} if values is None else values
        if not isinstance(values, dict):
            raise fail(section, f"expected a mapping with keys {', '.join(schema)}")
        for key, value in values.items():
            if key not in schema:
                raise fail(f"{section}.{key}", f"unknown key; allowed: {', '.join(schema)}")
            if not isinstance(value, schema[key]) or isinstance(value, bool):
                raise fail(f"{section}.{key}", f"{value!r} has the wrong type; expected {_type_names(schema[key])}")
        sections[section] = values
    try:
        ais = sections["evaluation"].get("ais")
        evaluation = EvaluationSettings(**{**sections["evaluation"], "ais": None})
        evaluation = dataclasses.replace(evaluation, ais=_ais(ais, evaluation.images, fail))
        resources = Resources(**sections["resources"])
        checkpoints = Checkpoints(**sections["checkpoints"])
    except SettingError as error:
        raise fail(error.key, error.message) from None

    training = raw.get("training")
    training = {} if training is None else training
    training_allowed = training_keys()
    if not isinstance(training, dict):
        raise fail("training", f"expected a mapping of TrainConfig fields ({', '.join(training_allowed)})")
    for key in training:
        if key not in training_allowed:
            raise fail(f"training.{key}", f"unknown key; allowed: {', '.join(training_allowed)}")
    distributions: dict[str, tuple[str, Distribution]] = {}  # key: (where, distribution)
    training = _take_distributions(training, "training", distributions, fail)
    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise fail("seeds", f"{seeds!r}: expected a non-empty list of integers")
    mk_product = raw.get("mk_product")
    if mk_product is not None and (not isinstance(mk_product, int) or isinstance(mk_product, bool) or mk_product < 1):
        raise fail("mk_product", f"{mk_product!r}: expected a positive integer")

    experiments = raw.get("experiments")
    if not isinstance(experiments, list) or not experiments:
        raise fail("experiments", "expected a non-empty list of grids, e.g. [{objective: [vae, iwae], k: [1, 5]}]")
    # Deduplicated by hash, in order: a list's `in` made a 20,000-trial grid 200 million comparisons.
    unique: dict[TrainConfig, None] = {}
    for index, grid in enumerate(experiments):
        where = f"experiments[{index}]"
        if not isinstance(grid, dict):
            raise fail(where, "expected a mapping such as {objective: iwae, k: [5, 50]}")
        grid = _take_distributions(grid, where, distributions, fail)
        for point in _expand(grid, where, mk_product, fail):
            for seed in seeds:
                config = _config(TrainConfig, {**training, **point, "seed": seed}, where, point, fail)
                unique.setdefault(config)
    trials = list(unique)
    search = _search(raw.get("search"), distributions, trials, fail)
    if search and raw.get("continue") is not None:
        raise fail("continue", "a search has no second stage: a `continue` stage continues a grid's trials")
    continued = _continued(raw.get("continue"), trials, fail)
    space = SweepSpace(
        name=name,
        source=source,
        trials=trials,
        evaluation=evaluation,
        resources=resources,
        checkpoints=checkpoints,
        description=str(raw.get("description", "")).strip(),
        continued=continued,
        search=search,
        tracker=None if raw.get("tracker") is None else parse_tracker(raw["tracker"], f"{source}: tracker"),
        plugins=plugins,
    ).measuring_rank()
    _check_ais_images(space)
    check_memory(space)
    return space


def _plugins(specs: Any, folder: Path, fail) -> tuple[dict[str, str], ...]:
    """Load the `plugins` a space file names (before its experiments, which may use their
    objectives) and return their records."""
    if not isinstance(specs, list) or not all(isinstance(s, str) and s for s in specs):
        raise fail("plugins", f"{specs!r}: expected a list of .py files (relative to this file) or module names")
    try:
        records = tuple(load_plugin(spec, folder).record() for spec in specs)
        parameter_columns()  # a parameter named like a results column is refused before anything runs
    except (PluginError, ObjectiveDefinitionError) as error:
        raise fail("plugins", str(error)) from None
    return records


def _ais(section: dict | None, evaluated: int | None, fail) -> AISSettings | None:
    """The `evaluation.ais` section (None: AIS off) checked key by key; `evaluated`: the test
    images IS evaluates (None: the whole test set)."""
    if section is None:
        return None
    for key, value in section.items():
        if key not in AIS_SECTION:
            raise fail(f"evaluation.ais.{key}", f"unknown key; allowed: {', '.join(AIS_SECTION)}")
        if not isinstance(value, AIS_SECTION[key]) or isinstance(value, bool):
            raise fail(
                f"evaluation.ais.{key}", f"{value!r} has the wrong type; expected {_type_names(AIS_SECTION[key])}"
            )
    if "steps" not in section:
        raise fail("evaluation.ais.steps", "missing: give the number of annealing distributions, e.g. steps: 1000")
    ais = AISSettings(**{"images": min(AIS_IMAGES, evaluated or AIS_IMAGES), **section})
    for key, fix in (
        ("steps", "the number of annealing distributions, e.g. 1000; docs/ais.md"),
        ("chains", "chains per image; Wu et al. use 16"),
        ("images", "AIS needs a test image; null runs it on every image IS evaluates"),
    ):
        value = getattr(ais, key)
        if value is not None and value < 1:
            raise fail(f"evaluation.ais.{key}", f"{value}: must be at least 1 ({fix})")
    if ais.start not in STARTS:
        raise fail("evaluation.ais.start", f"{ais.start!r}: choose one of {', '.join(STARTS)}")
    if evaluated is not None and ais.images is not None and ais.images > evaluated:
        raise fail(
            "evaluation.ais.images",
            f"{ais.images}: more than the {evaluated} test images IS evaluates (evaluation.images); AIS is "
            f"compared with IS on the same images: raise evaluation.images to {ais.images} or lower ais.images",
        )
    return ais


def _check_ais_images(space: SweepSpace) -> None:
    """evaluation.ais.images within the test set of every dataset the trials can use."""
    ais = space.evaluation.ais
    if ais is None or ais.images is None:
        return
    datasets = {t.dataset for t in [*space.trials, *space.continued]}
    if space.search and "dataset" in space.search.distributions:
        datasets |= set(_probes(space.search.distributions["dataset"]))
    for dataset in sorted(datasets):
        test_images = DATASETS[dataset].splits[2]
        if ais.images > test_images:
            raise SpaceError(
                f"{space.source}: evaluation.ais.images: {ais.images}: the {dataset} test set has "
                f"{test_images:,} images; pass at most {test_images}, or null for every image IS evaluates"
            )


def _number_keys() -> dict[str, type]:
    """The numeric training settings, by kind (their annotations are strings: `from __future__`)."""
    kinds = {"int": int, "int | None": int, "float": float}
    return {s.name: kinds[s.type] for s in settings() if s.type in kinds}


def _take_distributions(mapping: dict, where: str, found: dict[str, tuple[str, Distribution]], fail) -> dict:
    """`mapping` without its distributions (`{uniform: [0, 1]}` and the like), which go to `found`."""
    plain = {}
    searchable, numbers = (*trial_keys(), *training_keys()), _number_keys()
    for key, value in mapping.items():
        if not isinstance(value, dict):
            plain[key] = value
            continue
        here = f"{where}.{key}"
        if key not in searchable:
            raise fail(
                here,
                f"{value!r}: only trial and training keys can be searched "
                f"({', '.join(searchable)}); give m and k their own distributions",
            )
        if key in found:
            raise fail(
                here, f"already searched at {found[key][0]}: a distribution applies to the whole file, give it once"
            )
        if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
            raise fail(
                here,
                f"{value!r}: expected one distribution, e.g. {{loguniform: [1.0e-4, 3.0e-3]}}; known: "
                f"{', '.join(DISTRIBUTIONS)}",
            )
        kind, values = next(iter(value.items()))
        if not isinstance(values, list) or not values:
            raise fail(
                here,
                f"{kind}: {values!r}: expected a non-empty list"
                + (" of choices" if kind == "choice" else ", [low, high]"),
            )
        if kind in RANGES:
            expected, number = RANGES[kind], numbers.get(key)
            if number is not expected:
                takes = {
                    int: "an integer: randint, lograndint or choice",
                    float: "a real number: uniform, loguniform or choice",
                }.get(number, "only choice: [...]")
                raise fail(here, f"{kind}: {key} takes {takes}")
            if (
                len(values) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
                or (expected is int and not all(isinstance(v, int) for v in values))
            ):
                raise fail(
                    here,
                    f"{kind}: {values!r}: expected [low, high], two {'integers' if expected is int else 'numbers'}",
                )
            low, high = values
            if not low < high:
                raise fail(here, f"{kind}: [{low}, {high}]: low must be below high")
            if kind.startswith("log") and low <= 0:
                raise fail(
                    here,
                    f"{kind}: [{low}, {high}]: a log range must stay above 0; use uniform or randint to reach {low}",
                )
        found[key] = (here, Distribution(kind, tuple(values)))
    return plain


def _search(section: Any, found: dict[str, tuple[str, Distribution]], trials: list[TrainConfig], fail) -> Search | None:
    """The `search` section with the file's distributions; each distribution's values are
    checked on every grid point (a choice of k: [0] fails here, not in a trial)."""
    if section is None:
        if found:
            where = next(iter(found.values()))[0]
            raise fail(
                where, "a distribution needs a `search` section (algorithm, samples) saying how trials are drawn"
            )
        return None
    if not isinstance(section, dict):
        raise fail("search", f"expected a mapping with keys {', '.join(SEARCH_SECTION)}")
    for key, value in section.items():
        if key not in SEARCH_SECTION:
            raise fail(f"search.{key}", f"unknown key; allowed: {', '.join(SEARCH_SECTION)}")
        if not isinstance(value, SEARCH_SECTION[key]) or (SEARCH_SECTION[key] is int and isinstance(value, bool)):
            raise fail(f"search.{key}", f"{value!r} has the wrong type; expected {_type_names(SEARCH_SECTION[key])}")
    search = Search(**section, distributions={key: d for key, (_, d) in found.items()})
    if search.algorithm not in ALGORITHMS:
        raise fail("search.algorithm", f"{search.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    if search.samples < 1 or (search.max_concurrent is not None and search.max_concurrent < 1):
        raise fail("search", "samples and max_concurrent must be positive")
    if not found:
        raise fail(
            "search",
            "no key is a distribution, so every sample would train the same trials again; make a "
            "key a distribution (e.g. lr: {loguniform: [1.0e-4, 3.0e-3]}) or drop the section",
        )
    if search.algorithm == "optuna" and len(trials) > 1:
        raise fail(
            "search.algorithm",
            f"optuna cannot take a grid axis: the experiments give {len(trials)} "
            f"configurations ({', '.join(t.label() for t in trials[:4])}...); make each "
            f"axis a distribution (e.g. k: {{choice: [1, 5, 50]}}), or use random",
        )
    for key, (where, distribution) in found.items():
        if (
            search.algorithm == "optuna"
            and distribution.kind == "choice"
            and not all(isinstance(v, (int, float, str, bool)) for v in distribution.values)
        ):
            raise fail(
                where, f"{distribution}: optuna's choices are numbers or strings; use random for a choice of lists"
            )
        for trial in trials:
            for value in _probes(distribution):
                _config(trial.with_changes, {key: value}, where, {key: value}, fail)
    return search


def _probes(distribution: Distribution) -> list:
    """The values that stand for a distribution in checks: every choice, or a range's ends."""
    if distribution.kind == "choice":
        return list(distribution.values)
    low, high = distribution.values
    return [low, high - 1 if RANGES[distribution.kind] is int else high]


def _continued(section: Any, trials: list[TrainConfig], fail) -> list[TrainConfig]:
    """The stage-2 trials of a `continue` section: one per (switch, matching stage-1 trial)."""
    if section is None:
        return []
    if not isinstance(section, dict) or set(section) - {"training", "switch"} or "switch" not in section:
        raise fail(
            "continue", "expected a mapping with `switch` (a list of {from: ..., to: ...}) and optional `training`"
        )
    training = section.get("training") or {}
    if not isinstance(training, dict):
        raise fail("continue.training", "expected a mapping of TrainConfig fields")
    trial_allowed, training_allowed = (*trial_keys(), "seed"), training_keys()
    for key, value in training.items():
        if key not in training_allowed:
            raise fail(f"continue.training.{key}", f"unknown key; allowed: {', '.join(training_allowed)}")
        if isinstance(value, dict):
            raise fail(
                f"continue.training.{key}",
                f"{value!r}: a distribution inside `continue`; a second stage "
                f"continues each first-stage trial with constant settings",
            )
    switches = section["switch"]
    if not isinstance(switches, list) or not switches:
        raise fail("continue.switch", "expected a non-empty list of {from: {...}, to: {...}}")
    labels = [t.label() for t in trials]
    continued: dict[TrainConfig, None] = {}  # deduplicated by hash, in order
    for index, switch in enumerate(switches):
        where = f"continue.switch[{index}]"
        if (
            not isinstance(switch, dict)
            or set(switch) != {"from", "to"}
            or not all(isinstance(switch[side], dict) for side in ("from", "to"))
        ):
            raise fail(where, "expected {from: {objective: vae, k: 1}, to: {objective: iwae, k: 50}}")
        for side in ("from", "to"):
            for key in switch[side]:
                if key not in (*trial_allowed, *training_allowed):
                    raise fail(
                        f"{where}.{side}.{key}",
                        f"unknown key; allowed: {', '.join(trial_allowed)} and training keys",
                    )
        parents = [t for t in trials if all(getattr(t, k) == v for k, v in switch["from"].items())]
        if not parents:
            raise fail(f"{where}.from", f"{switch['from']} matches no first-stage trial ({', '.join(labels)})")
        for parent in parents:
            if labels.count(parent.label()) > 1:
                raise fail(
                    f"{where}.from",
                    f"first-stage trials share the label {parent.label()!r} (they differ only "
                    f"in a training setting), so a second stage cannot name its parent",
                )
            changes = {**training, **switch["to"], "init_label": parent.label()}
            child = _config(parent.with_changes, changes, where, switch["to"], fail)
            continued.setdefault(child)
    return list(continued)


def _config(make: Callable[..., TrainConfig], values: dict, where: str, shown: dict, fail) -> TrainConfig:
    """`make(**values)` (TrainConfig, or a configuration's with_changes), or an error naming
    `where` and the settings `shown` there."""
    try:
        return make(**values)
    except (ValueError, TypeError) as error:
        raise fail(where, f"{shown}: {error}") from None


def _expand(grid: dict, where: str, mk_product: int | None, fail) -> list[dict]:
    allowed = (*trial_keys(), "mk", *training_keys())
    axes = {}
    for key, value in grid.items():
        if key not in allowed:
            raise fail(f"{where}.{key}", f"unknown key; allowed: {', '.join(allowed)}")
        axes[key] = value if isinstance(value, list) and key != "mk" else [value]
        if not axes[key]:
            raise fail(f"{where}.{key}", "an empty list gives no trials; give at least one value")
    if "mk" in axes:
        if "m" in axes or "k" in axes:
            raise fail(f"{where}.mk", "give either mk pairs or m and k, not both")
        pairs = axes.pop("mk")[0]
        if (
            not isinstance(pairs, list)
            or not pairs
            or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p) for p in pairs
            )
        ):
            raise fail(f"{where}.mk", f"{pairs!r}: expected a list of [M, K] pairs of positive integers")
        for m, k in pairs:
            if mk_product is not None and m * k != mk_product:
                raise fail(f"{where}.mk", f"[{m}, {k}]: M*K = {m * k}, but mk_product declares {mk_product}")
        axes["mk"] = pairs
    points = []
    for combo in itertools.product(*axes.values()):
        point = dict(zip(axes, combo, strict=True))
        if "mk" in point:
            point["m"], point["k"] = point.pop("mk")
        points.append(point)
    return points


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


# What one trial or one evaluation may ask for. 16 GiB: two thirds of the A10G (24 GB) that
# cluster.yaml's GPU workers have, and what a laptop or a CPU node can spare for one process.
# Burda's largest settings need far less (2 layers, k=50: 30 MB per training step; evaluation
# k=5000: 0.7 GB on a GPU, 0.1 GB on a CPU); a value over it is a typo, found before any trial
# starts rather than as allocation tracebacks in every trial or after the training.
MEMORY_LIMIT = 16 * 2**30


@dataclass(frozen=True)
class _Sizes:
    """An architecture's memory per unit of work, from its layer sizes."""

    row: int  # bytes per sample row of a training step: 4 floats per Linear output and latent
    # after the first encoder (output, activation and both gradients); measured on CPU, Burda's
    # 1- and 2-layer models keep 10 and 20 KB per row, this says 20 and 33 KB
    noise: int  # bytes per (sample, image) of an evaluation's noise, drawn up front (likelihood.py):
    # 2 floats per latent unit (the draw and its slice; measured: 1 to 2)
    parameters: int  # bytes of the parameters (one row of an SNR measurement's gradient draws)


_SIZES: dict[tuple, _Sizes] = {}


def _sizes(config: TrainConfig) -> _Sizes:
    key = (config.layers, config.latent_dims, config.hidden_dims, config.pixels)
    if key not in _SIZES:
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = build_model(*key[:3], x_dim=key[3])
        sampled = [*model.encoders[1:], *model.priors, model.decoder]  # run once per sample
        outputs = sum(m.out_features for part in sampled for m in part.modules() if isinstance(m, torch.nn.Linear))
        latents = sum(model.latent_dims)
        _SIZES[key] = _Sizes(
            row=4 * 4 * (outputs + latents),
            noise=2 * 4 * latents,
            parameters=4 * sum(p.numel() for p in model.parameters()),
        )
    return _SIZES[key]


def _image_batch(gpus: float) -> int:
    """Images evaluated at once on the device `gpus` GPUs (0: the CPU) give a trial or evaluation."""
    return default_image_batch(torch.device("cuda" if gpus else "cpu"))


def _gib(size: float) -> str:
    return f"{size / 2**30:,.1f} GiB"


def _check_needs(where: str, needs: list[tuple[str, int, int, str, str]], config: TrainConfig | None = None) -> None:
    """Refuse the first (key, value, bytes per unit of value, what needs it, other fixes) of
    `needs` whose value passes MEMORY_LIMIT, naming `where` and `config`'s label."""
    for key, value, unit, what, fix in needs:
        if value * unit > MEMORY_LIMIT:
            where += f": {config.label()}" if config else ""  # only here: labels cost, and grids are large
            raise SpaceError(
                f"{where}: {key}={value}: {what} needs about {_gib(value * unit)} of memory, over the "
                f"{_gib(MEMORY_LIMIT)} one trial or evaluation may use (sweep.space.MEMORY_LIMIT); lower {key} to "
                f"at most {MEMORY_LIMIT // unit:,}{fix}"
            )


def _check_trial_memory(config: TrainConfig, where: str, gpus: float) -> None:
    """A trial's training step, SNR measurement and per-pass likelihood estimates, on the
    device `gpus` gives it."""
    try:
        sizes = _sizes(config)
    except ValueError as error:  # e.g. layers: 3 without latent_dims and hidden_dims
        raise SpaceError(f"{where}: {config.label()}: {error}") from None
    samples = config.build_objective().num_samples
    per_k = _image_batch(gpus) * sizes.noise
    needs = [
        (
            "k",
            config.k,
            config.batch_size * config.m * sizes.row,
            f"a training step (batch_size {config.batch_size} x M {config.m} x K sample rows)",
            ", or m or batch_size",
        ),
        ("valid_ll_k", config.valid_ll_k, per_k, "the validation likelihood estimate", ""),
    ]
    if config.nll_every:
        needs.append(("nll_k", config.nll_k, per_k, "the test NLL estimate", ", or set nll_every: 0"))
    if config.snr_every:
        needs += [
            (
                "snr_images",
                config.snr_images,
                samples * sizes.row,
                f"a gradient-SNR draw (snr_images x M*K {samples} sample rows)",
                ", or set snr_every: 0",
            ),
            (
                "snr_draws",
                config.snr_draws,
                sizes.parameters,
                "the SNR's gradient draws (the parameters once per draw)",
                ", or set snr_every: 0",
            ),
        ]
    _check_needs(where, needs, config)


def check_memory(space: SweepSpace) -> None:
    """Raise SpaceError naming the key, its value and the fix when a trial or an evaluation of
    `space` would need more than MEMORY_LIMIT on the device its resources give it (GPUs take
    more images at once). Estimated from the model's layer sizes: an upper estimate."""
    gpus = space.resources.gpus_per_trial
    for where, configs in (("experiments", space.trials), ("continue", space.continued)):
        for config in configs:
            _check_trial_memory(config, f"{space.source}: {where}", gpus)
    for key, distribution in (space.search.distributions if space.search else {}).items():
        where = f"{space.source}: search: {key} ~ {distribution}"
        for value in _probes(distribution):
            for config in space.trials:
                _check_trial_memory(config.with_changes(**{key: value}), where, gpus)
    eval_gpus = space.resources.eval_gpus
    images = _image_batch(eval_gpus)
    configs = space.trials + space.continued
    where = f"{'a GPU' if eval_gpus else 'the CPU'} ({images} images at once)"
    on_cpu = ", or evaluate on the CPU (resources.eval_gpus: 0)" if eval_gpus else ""
    needs = [
        (
            "evaluation.k",
            space.evaluation.k,
            images * max(_sizes(t).noise for t in configs),
            f"the final evaluation on {where}",
            on_cpu,
        )
    ]
    if space.evaluation.ais:
        needs.append(
            (
                "evaluation.ais.chains",
                space.evaluation.ais.chains,
                images * max(_sizes(t).row for t in configs),
                f"AIS ({TUNING_CHAINS} tuning chains more per image) on {where}",
                on_cpu,
            )
        )
    _check_needs(space.source, needs)
