"""TensorBoard event files for a run dir on any storage (``tensorboard --logdir <run>/tensorboard``).

TensorBoard's writer only writes local files, so for an ``s3://``/``gs://`` run dir the
events are written to a local temp dir and each event file is uploaded (atomically, whole)
after every flush. A resumed run starts a new event file beside the old ones; TensorBoard
reads them all.
"""

from __future__ import annotations

import os
import tempfile

from raylens.storage import Storage, join, split_uri

SKIP = {"epoch", "step", "best", "epoch_end", "resumes"}


class EventLog:
    """Scalars of a run's metric rows, keyed by optimizer step, in ``logdir`` (the run
    dir's TensorBoard dir, :attr:`raylens.rundir.RunDir.tensorboard`)."""

    def __init__(self, storage: Storage, logdir: str):
        from torch.utils.tensorboard import SummaryWriter

        scheme, path = split_uri(logdir)
        self.storage = storage
        self.remote = logdir if scheme != "file" else None
        self._tmp = tempfile.TemporaryDirectory(prefix="raylens-tb-") if self.remote else None
        self.local = self._tmp.name if self._tmp else path
        self.writer = SummaryWriter(log_dir=self.local)

    def add(self, row: dict) -> None:
        step = int(row.get("step", 0))
        for key, value in row.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if not self.remote:
            return
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as f:
                self.storage.write_bytes(join(self.remote, name), f.read())

    def close(self) -> None:
        self.writer.close()
        self._upload()
        if self._tmp:
            self._tmp.cleanup()
