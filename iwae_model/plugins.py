"""A researcher's own objectives and datasets, from a module outside this package: `--plugin
my_bounds.py` on the command-line tools, `plugins: [my_bounds.py]` in a space file.

Importing the module is what adds them: each subclass of objectives.Objective or
data.DatasetSource with a `name` registers itself. A plugin is recorded by its module name, file
and SHA-256, so that a resumed sweep, a checkpoint and a results row say which code made them,
and a changed file is found before any of it runs again (docs/plugins.md)."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from .config import TrainConfig
from .datasets import DATASETS
from .errors import IWAEError
from .objectives import OBJECTIVES

PACKAGE = __name__.rsplit(".", 1)[0]


class PluginError(IWAEError, ValueError):
    """A plugin that cannot be used; the message names its file and the fix."""


@dataclass(frozen=True)
class Plugin:
    """A loaded plugin: its module name, its file (a .py file or a package's folder) and the
    SHA-256 of its code."""

    module: str
    file: str
    sha256: str
    defines: tuple[str, ...]  # what it registered, e.g. ("objective tempered", "dataset synthetic")

    def record(self) -> dict[str, str]:
        return {"module": self.module, "file": self.file, "sha256": self.sha256}


_LOADED: dict[str, Plugin] = {}  # by module name


def code_digest(path: Path) -> str:
    """SHA-256 of a module's code: the file, or every .py file of a package folder by name."""
    digest = hashlib.sha256()
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def load_plugin(spec: str, relative_to: Path | None = None) -> Plugin:
    """Import plugin `spec`: a `.py` file (relative to `relative_to`, else the working folder) or
    the name of an importable top-level module or package. Loading one module twice returns the
    first load."""
    is_file = spec.endswith(".py") or "/" in spec
    path = ((relative_to or Path.cwd()) / Path(spec).expanduser()).resolve() if is_file else None
    if path is not None and not path.is_file():
        raise PluginError(f"plugin {spec}: no such file ({path}); give a .py file or an importable module's name")
    name = path.stem if path is not None else spec
    where = path or spec
    if not name.isidentifier():
        raise PluginError(
            f"plugin {where}: {name!r} is not a top-level module name (Ray's nodes import the plugin by it); "
            f"name the file like a Python module, e.g. my_bounds.py, or give a package's name without dots"
        )
    if name in _LOADED:
        loaded = _LOADED[name]
        if path is not None and Path(loaded.file) != path:
            raise PluginError(
                f"plugin {path}: its module name {name!r} is already {loaded.file}'s; rename one of the files"
            )
        return loaded
    if path is not None and _taken(name, path):
        raise PluginError(
            f"plugin {path}: its module name {name!r} is an installed module's, which it would hide from "
            f"everything else in this process; rename the file"
        )
    before = {*OBJECTIVES, *DATASETS}
    digest = code_digest(path) if path is not None else ""  # of the code as it is imported
    try:
        module = _import(name, path)
        source = _source_path(module)
    except Exception as error:  # the user's code: anything
        for registry in (OBJECTIVES, DATASETS):  # a module that failed half-way registers nothing
            for added in set(registry) - before:
                del registry[added]
        _forget(name)
        if isinstance(error, IWAEError):  # a class that cannot be registered, a module without a file
            raise PluginError(f"plugin {where}: {error}") from None
        message = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        raise PluginError(f"plugin {where}: does not import ({message}); fix the module and run again") from None
    added = tuple(
        f"{kind} {key}"
        for kind, registry in (("objective", OBJECTIVES), ("dataset", DATASETS))
        for key in registry
        if key not in before
    )
    if not added:
        _forget(name)
        raise PluginError(
            f"plugin {where}: defines no objective or dataset; subclass iwae_model.objectives.Objective or "
            f"iwae_model.data.DatasetSource with a `name` (docs/plugins.md)"
        )
    plugin = Plugin(name, str(source), digest or code_digest(source), added)
    _LOADED[name] = plugin
    return plugin


def _forget(name: str) -> None:
    """Drop module `name` and its submodules, half-imported, so that a fixed file loads anew.
    Only its own: the modules it imported (torch's, say) stay, as re-importing them can fail."""
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def _taken(name: str, path: Path) -> bool:
    """Whether module `name` is another module than the file `path`: the standard library's, an
    installed package's, or one this process imported."""
    if name in sys.stdlib_module_names or name == PACKAGE:
        return True
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return found is not None and (found.origin is None or Path(found.origin).resolve() != path)


def _import(name: str, path: Path | None) -> ModuleType:
    if path is None:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: pickling its classes needs the name
    spec.loader.exec_module(module)
    return module


def _source_path(module: ModuleType) -> Path:
    """The file to ship and hash: a plain module's .py file, a package's folder."""
    if not getattr(module, "__file__", None):
        raise PluginError(f"module {module.__name__} has no file (a namespace package?): give its .py file")
    file = Path(module.__file__)
    return file.parent if file.name == "__init__.py" else file


def load_recorded(record: dict[str, Any], where: str, shipped: bool = False) -> Plugin:
    """Load the plugin a sweep's spec or a trial recorded, refusing it if its code changed since,
    before running it. From its file; with `shipped` (a trial or an evaluation on a Ray node),
    by its module name where that imports: the copy Ray's runtime environment shipped. A record
    read from a file names code to run, so it is never imported by name on the driver: a sweep
    folder from elsewhere could name any installed module. `where` names the record in errors."""
    name, path, expected = record["module"], Path(record["file"]), record["sha256"]

    def changed(found: str) -> PluginError:
        return PluginError(
            f"{where}: plugin {path} changed since the sweep started (SHA-256 {expected[:12]}... then, "
            f"{found[:12]}... now): its trials must keep the code that trained them; restore the file, or start "
            f"a new sweep with the new code"
        )

    if name not in _LOADED:
        if shipped and importlib.util.find_spec(name) is not None:
            _LOADED[name] = replace(load_plugin(name), file=str(path))  # recorded as the user's file
        elif not path.exists():
            raise PluginError(
                f"{where}: plugin {name} ({path}) is missing: put the file back where it was (its SHA-256 was "
                f"{expected[:12]}...); on a cluster the sweep ships it to every node itself"
            )
        elif (found := code_digest(path)) != expected:
            raise changed(found)
        elif path.is_dir():  # a package given by its module name: it must import from that folder
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None or Path(spec.origin).parent != path:
                raise PluginError(
                    f"{where}: plugin {name} is the package {path}, which `import {name}` does not find here; "
                    f"put its parent folder on PYTHONPATH"
                )
            load_plugin(name)
        else:
            load_plugin(str(path))
    if _LOADED[name].sha256 != expected:
        raise changed(_LOADED[name].sha256)
    return _LOADED[name]


def sources_of(config: TrainConfig) -> list[dict[str, str]]:
    """The records of the loaded plugins that define `config`'s objective and dataset ([] for
    this package's own, or classes defined without a plugin): what its checkpoints and results
    rows say made them."""
    made = {f"objective {config.objective}", f"dataset {config.dataset}"}
    return [plugin.record() for plugin in _LOADED.values() if made & set(plugin.defines)]


def loaded() -> list[Plugin]:
    return list(_LOADED.values())


def add_plugin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE",
        help="a .py file (or an importable module's name) defining objectives or datasets of your own; they "
        "join the built-in ones (--objective, --dataset, their parameters as flags); repeat for several "
        "(docs/plugins.md)",
    )


def load_flagged_plugins(argv: list[str] | None) -> list[Plugin]:
    """Load the plugins --plugin names in `argv`, before the parser that needs their objectives
    (their parameters are flags) is built."""
    early = argparse.ArgumentParser(add_help=False)
    add_plugin_flag(early)
    return [load_plugin(spec) for spec in early.parse_known_args(argv)[0].plugin]
