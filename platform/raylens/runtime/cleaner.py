"""Ray Train's placement-group cleaner, made safe on Ray 2.60 (see
:class:`SafePlacementGroupCleaner`); :class:`raylens.runtime.launch.Trainer` launches it.

A module of its own, importing no torch: the cleaner is a detached actor whose process
imports this module to unpickle its class, once per Train run (torch would cost it ~1.5
CPU-s of a run's start-up).
"""

from __future__ import annotations

import logging
import time

import ray

# Ray Train 2.60 internals (Ray is pinned in pyproject.toml): the placement-group cleaner
# that SafePlacementGroupCleaner fixes and the callback that launches it. A Ray upgrade
# that moves them fails here, at import, not silently in a run.
from ray.train.v2._internal.callbacks.placement_group_callback import (
    PlacementGroupCleanerCallback,
)
from ray.train.v2._internal.execution.controller.placement_group_cleaner import (
    PlacementGroupCleaner,
)

log = logging.getLogger("raylens")


def first_line(err: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error's message (its class name when empty), cut
    at ``limit`` characters: a one-line cause for logs and events."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


class SafePlacementGroupCleaner(PlacementGroupCleaner):
    """Ray Train's detached placement-group cleaner, with a liveness check that only acts on
    a DEAD record of the run's controller.

    Ray 2.60's check (``ray.train.v2._internal.state.util.is_actor_alive``) asks the
    dashboard's state API for the controller and takes "no record" for dead: when the API
    misses the record under load, the cleaner removes the live run's placement group and
    its workers die (``make demo`` lost its worker after epoch 9 this way; it went on only
    because ``ray.max_failures`` restarted it). Its query also finds the cluster by address
    auto-detection, which raises "Found multiple active Ray instances" as soon as another
    local Ray runs on the machine (``serve run``, a second job): the exception ends the
    cleaner's monitor thread, and every cleanup with it. Here the query names the cluster
    this actor runs in, and no record or no answer counts as alive (logged); a controller
    that really died has a DEAD record (Ray keeps dead actors' records).

    Upstream discusses the check on https://github.com/ray-project/ray/pull/65447 (review:
    "Live PGs cleaned after false death"); remove this class, :class:`SafeCleanerCallback`
    and :data:`raylens.runtime.launch.PATCHED_RAY` once the pinned Ray has the fix.
    """

    warn_every_s = 60.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from ray.train.v2._internal.execution.controller import placement_group_cleaner

        # Ray's monitor loop calls this module's is_actor_alive. A detached actor has a
        # process of its own: the replacement reaches no other code.
        placement_group_cleaner.is_actor_alive = self.controller_alive
        self._warned_at: float | None = None

    def actor_state(self, actor_id: str, timeout: float) -> str | None:
        """The state API's record of ``actor_id`` in this actor's own cluster (ALIVE, DEAD,
        ...), None without one. Raises when the API does not answer."""
        from ray.util.state import get_actor

        address = ray.get_runtime_context().gcs_address  # never auto-detected
        record = get_actor(actor_id, address=address, timeout=int(timeout))
        return None if record is None else record.state

    def controller_alive(self, actor_id: str, timeout: float) -> bool:
        """False only on a DEAD record; a missing record or no answer is unknown: alive."""
        try:
            state = self.actor_state(actor_id, timeout)
            why = "no record"
        except Exception as err:  # any failure to ask: unknown, never a death
            state, why = None, f"no answer ({type(err).__name__}: {first_line(err)})"
        if state is not None:
            self._warned_at = None
            return state != "DEAD"
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= self.warn_every_s:
            self._warned_at = now
            log.warning(
                "placement-group cleaner: the state API gave %s for the Train controller %s; "
                "taking it as alive (its placement group is kept)",
                why,
                actor_id,
            )
        return True


class SafeCleanerCallback(PlacementGroupCleanerCallback):
    """Ray Train's cleaner callback, launching ``cleaner`` (a class) instead of Ray's."""

    def __init__(self, cleaner: type = SafePlacementGroupCleaner):
        super().__init__()
        self.cleaner = cleaner

    def after_controller_start(self, train_run_context) -> None:
        from ray.train.v2._internal.callbacks import placement_group_callback

        # Ray's hook launches the class its module names; the controller has a process of
        # its own, so this reaches only this run's cleaner.
        placement_group_callback.PlacementGroupCleaner = self.cleaner
        super().after_controller_start(train_run_context)
