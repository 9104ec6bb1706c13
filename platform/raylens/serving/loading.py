"""A model id → the loaded model, or the error the server answers with.

The model server loads a model when a request first names it (Serve multiplexing); this
is that load with its failures sorted:

- an id that is not configured, or an on-demand id with no run under ``runs_root``:
  :class:`~raylens.serving.errors.ModelNotFound` (404 ``unknown_model``);
- a configured model whose run is missing, or any model that does not load (a broken
  config, an unknown backbone, a missing or corrupt checkpoint):
  :class:`~raylens.serving.errors.ModelLoadError` (503 ``model_unavailable``).

Messages name the model and its run by name (the run dir's last part), say what is wrong
in one line, and carry no path and no credential (:func:`~raylens.serving.errors.one_line`,
:meth:`raylens.storage.Storage.scrub`); the full exception goes to the server's log.
Pure: no Ray.
"""

from __future__ import annotations

import logging

from raylens.rundir import RunDir
from raylens.serving.errors import ModelLoadError, ModelNotFound, one_line
from raylens.serving.models import ServedModel, load_served_model
from raylens.serving.settings import ModelEntry, ServeConfig, run_name
from raylens.storage import Storage

log = logging.getLogger("ray.serve")


def load_model(cfg: ServeConfig, storage: Storage, model_id: str, *, device: str) -> ServedModel:
    """Loads ``model_id`` as ``cfg`` serves it (its run's eval transform, ``cfg.amp``).

    Raises:
        ModelNotFound: no such model id, or no run under ``runs_root`` for it.
        ModelLoadError: a configured model whose run is missing, or a model that does not
            load.
    """
    try:
        entry = cfg.entry(model_id)
    except ModelNotFound:
        raise ModelNotFound(f"unknown model {model_id[:128]!r}") from None
    try:
        return load_served_model(
            entry, storage, device=device, amp=cfg.amp, max_pixels=cfg.limits.max_image_pixels
        )
    except Exception as err:
        log.exception("model %s failed to load", model_id)
        raise _load_failure(cfg, storage, entry, err) from None


def _load_failure(
    cfg: ServeConfig, storage: Storage, entry: ModelEntry, err: Exception
) -> ModelNotFound | ModelLoadError:
    """The error a failed load answers with (see the module docstring)."""
    mid = entry.id
    missing = bool(entry.run) and isinstance(err, FileNotFoundError) and not _is_run(entry, storage)
    if missing and mid not in cfg.ids:  # an on-demand id: no such run
        return ModelNotFound(f"unknown model {mid!r}: no run {mid!r} under the runs root")
    if missing:
        why = (
            f"model {mid!r} is unavailable: its run {run_name(entry.run)!r} is missing "
            "(not trained yet, or moved)"
        )
    else:
        text = str(err)
        plain = type(err) in (ValueError, FileNotFoundError) and text  # our own messages
        why = f"model {mid!r} does not load: {text if plain else f'{type(err).__name__}: {text}'}"
    return ModelLoadError(one_line(storage.scrub(why)))


def _is_run(entry: ModelEntry, storage: Storage) -> bool:
    """Whether the entry's run dir holds a run (its labels), whatever else is wrong."""
    try:
        return RunDir(entry.run, storage).is_run()
    except Exception:  # an unreadable location: as good as missing
        return False
