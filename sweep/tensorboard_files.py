"""TensorBoard event files into a sweep folder on any storage: written to a local temp folder,
then copied through the storage's filesystem (TensorBoard's writer cannot write to S3)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

from pyarrow import fs as pafs
from torch.utils.tensorboard import SummaryWriter


@contextlib.contextmanager
def events_written_to(destination: str, filesystem: pafs.FileSystem) -> Iterator[SummaryWriter]:
    """A SummaryWriter whose events land in `destination` on `filesystem` when the block ends."""
    with tempfile.TemporaryDirectory() as local:
        with SummaryWriter(local) as writer:
            yield writer
        filesystem.create_dir(destination, recursive=True)
        pafs.copy_files(local, destination, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
