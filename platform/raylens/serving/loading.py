"""A model id → the loaded model, or the error the server answers with.

The model server loads a model when a request first names it (Serve multiplexing); this
is that load with its failures sorted: an unknown id or a missing run dir is
:class:`~raylens.serving.errors.ModelNotFound` (404), any other failure (a broken
config, an unknown backbone, a corrupt checkpoint) is
:class:`~raylens.serving.errors.ModelLoadError` (503) naming the model and the cause.
Messages never carry a credential (:meth:`raylens.storage.Storage.scrub`). Pure: no Ray.
"""

from __future__ import annotations

import logging

from raylens.serving.errors import ModelLoadError, ModelNotFound
from raylens.serving.models import ServedModel, load_served_model
from raylens.serving.settings import ServeConfig
from raylens.storage import Storage

log = logging.getLogger("ray.serve")


def load_model(cfg: ServeConfig, storage: Storage, model_id: str, *, device: str) -> ServedModel:
    """Loads ``model_id`` as ``cfg`` serves it (its run's eval transform, ``cfg.amp``).

    Raises:
        ModelNotFound: no such model id, or no run dir where it points.
        ModelLoadError: the model exists but does not load.
    """
    try:
        entry = cfg.entry(model_id)
    except ModelNotFound:
        raise ModelNotFound(f"unknown model {model_id!r}") from None
    try:
        return load_served_model(
            entry, storage, device=device, amp=cfg.amp, max_pixels=cfg.limits.max_image_pixels
        )
    except FileNotFoundError as err:
        raise ModelNotFound(storage.scrub(str(err))) from None
    except Exception as err:
        log.exception("model %s failed to load", model_id)
        raise ModelLoadError(
            storage.scrub(f"model {model_id!r} does not load: {type(err).__name__}: {err}")
        ) from None
