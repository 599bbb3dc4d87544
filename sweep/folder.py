"""A sweep folder, `<storage>/<name>`, as run, evaluate and query share it: its spec file
(`iwae_sweep.json`: the space and the data folder) and the paths inside it. Ray Tune's saved
state is `tune_state`'s; a trial's name and record are `trials`'."""

from __future__ import annotations

import json

from pyarrow import fs as pafs

from iwae_model.errors import IWAEError
from iwae_model.plugins import PluginError

from .space import SettingError, SweepSpace
from .storage import write_whole

SPEC_FILE = "iwae_sweep.json"  # the sweep's space and data dir, written by sweep.run
STAGE_2 = "stage2"  # a `continue` stage's Tune experiment, inside the sweep folder


def stage_storage(storage: str, name: str) -> str:
    """The storage location (path or URI, its query kept) of the experiments inside sweep `name`."""
    path, sep, query = storage.partition("?")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


class SweepFolderError(IWAEError, ValueError):
    """A sweep folder that cannot be resumed or evaluated as it is; the message names it and the fix."""


def write_spec(experiment_path: str, filesystem: pafs.FileSystem, space: SweepSpace, data_dir: str) -> None:
    spec = json.dumps({"space": space.to_dict(), "data_dir": data_dir}, indent=1).encode()
    write_whole(spec, f"{experiment_path}/{SPEC_FILE}", filesystem)


def read_spec(experiment_path: str, filesystem: pafs.FileSystem) -> tuple[SweepSpace, str]:
    path = f"{experiment_path}/{SPEC_FILE}"
    try:
        with filesystem.open_input_stream(path) as stream:
            spec = json.loads(stream.read())
        return SweepSpace.from_dict(spec["space"]), str(spec["data_dir"])
    except FileNotFoundError:
        raise SweepFolderError(
            f"{experiment_path}: no {SPEC_FILE}, so this is not a sweep folder made by python -m "
            f"sweep.run (pass <storage>/<name>)"
        ) from None
    except PluginError as error:
        raise SweepFolderError(f"{path}: {error}") from None
    except SettingError as error:
        raise SweepFolderError(
            f"{path}: {error}, a setting this version refuses; correct it in that file, or use the iwae-sweep "
            f"version that started the sweep"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SweepFolderError(
            f"{path}: damaged ({type(error).__name__}: {str(error)[:300]}). sweep.run writes it "
            f"when the sweep starts; restore it from a copy (the trials' checkpoints are not "
            f"affected)"
        ) from None
