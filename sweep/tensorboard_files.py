"""TensorBoard event files into a sweep folder on any storage: written to a local temp folder,
then copied through the storage's filesystem (TensorBoard's writer cannot write to S3)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

from pyarrow import fs as pafs
from torch.utils.tensorboard import SummaryWriter

EVENTS_PREFIX = "events.out.tfevents."


@contextlib.contextmanager
def events_written_to(destination: str, filesystem: pafs.FileSystem, kind: str) -> Iterator[SummaryWriter]:
    """A SummaryWriter whose events land in `destination` on `filesystem` when the block ends,
    replacing the earlier ones of the same `kind` there (a file-name suffix: `evaluation`,
    `hparams`): TensorBoard reads all the event files of a folder as one run, and the same figure
    written again would be a second point."""
    with tempfile.TemporaryDirectory() as local:
        with SummaryWriter(local, filename_suffix=f".{kind}") as writer:
            yield writer
        filesystem.create_dir(destination, recursive=True)
        for earlier in filesystem.get_file_info(pafs.FileSelector(destination)):
            if earlier.base_name.startswith(EVENTS_PREFIX) and earlier.base_name.endswith(f".{kind}"):
                filesystem.delete_file(earlier.path)
        pafs.copy_files(local, destination, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
