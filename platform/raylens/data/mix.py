"""Mixup / CutMix with timm's semantics (``timm.data.Mixup``), in one of two places.

- On the consumer, for ordinary training: :func:`build_mixer` returns a :class:`Mixer`, which
  IS ``timm.data.Mixup`` (plus odd batches), mixing the normalized float batch and returning
  soft targets ``[b, C]`` for the task's ``soft_loss``.
- At decode time, for stored-target distillation (:func:`decode_time_mixing`): the teacher
  must score exactly the mixed image the student later trains on, whatever the number of
  train workers, so mixing cannot depend on how rows reach a worker. The mixing unit is one
  Parquet row group of the prepared dataset (``prepare`` writes rows in a seeded shuffled
  order, so a row group is class-mixed): :func:`decode_unit` decodes and augments its rows
  with their per-sample seeds, pairs them by a permutation seeded from
  ``(run.seed, epoch, shard file, row group)`` and draws lambda and the CutMix box with
  timm's own code under that seed (:func:`plan_unit`). Each row then carries
  ``mix_partner`` (the partner's id; its own when unmixed), ``mix_lam`` (the weight of its own
  image after box clipping; 1 when unmixed) and ``mix_label`` (the partner's label).

Pure: numpy, torch, timm and pyarrow; no Ray.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

from raylens.data.transforms import ImageTransform, decode_and_transform, sample_seed
from raylens.data.units import Unit  # the mixing unit is a read unit
from raylens.schema import MixConfig, RunConfig

MIX_KEYS = ("mixup_alpha", "cutmix_alpha", "cutmix_minmax", "prob", "switch_prob", "mode")


def decode_time_mixing(cfg: RunConfig) -> bool:
    """Whether the run mixes at decode time: stored-target distillation with ``mix`` on (the
    teacher pass, the student and the store check mix the same rows the same way)."""
    return cfg.mix.enabled and cfg.task.name == "distill" and cfg.distill.mode == "stored"


def mix_settings(mix: MixConfig) -> dict | None:
    """The ``mix.*`` keys as plain JSON values (a teacher store's card); None when off."""
    if not mix.enabled:
        return None
    out = {k: getattr(mix, k) for k in MIX_KEYS}
    if out["cutmix_minmax"] is not None:
        out["cutmix_minmax"] = [float(v) for v in out["cutmix_minmax"]]
    return out


def timm_args(mix: MixConfig) -> dict:
    """``timm.data.Mixup`` keyword arguments from ``cfg.mix`` (lambda correction on, as timm's
    train script)."""
    minmax = mix.cutmix_minmax
    return {
        "mixup_alpha": mix.mixup_alpha,
        "cutmix_alpha": mix.cutmix_alpha,
        "cutmix_minmax": None if minmax is None else tuple(float(v) for v in minmax),
        "prob": mix.prob,
        "switch_prob": mix.switch_prob,
        "mode": mix.mode,
        "correct_lam": True,
    }


# ----------------------------------------------------------------------------- consumer side


class Mixer(Mixup):
    """``timm.data.Mixup`` that also takes odd batches.

    ``(x float [b, 3, h, w], y) -> (x mixed, soft target float [b, C])``; ``y`` is int64 [b]
    (single-label) or a float multi-hot [b, C] (``multi_label``, timm's dense mixing). timm
    asserts an even batch (it pairs ``i`` with ``b-1-i``); here an odd batch (a train
    epoch's last) mixes its first ``b-1`` samples as timm would and leaves the last one
    unmixed, with its (smoothed) one-hot target.
    """

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2 == 0:
            return super().__call__(x, target)
        last = mixup_target(
            target[-1:], self.num_classes, 1.0, self.label_smoothing, self.multi_label
        )
        if len(x) == 1:
            return x, last
        head, soft = super().__call__(x[:-1], target[:-1])
        return torch.cat((head, x[-1:])), torch.cat((soft, last))


def build_mixer(cfg: RunConfig, num_classes: int, multi_label: bool) -> Mixer | None:
    """The consumer-side mixer of a run, or None: ``mix`` off, or mixing at decode time
    (:func:`decode_time_mixing`).

    Single-label targets get ``task.label_smoothing`` (timm's smoothed one-hot); multi-label
    targets are mixed unsmoothed, as the multi-label task trains without smoothing.
    """
    if not cfg.mix.enabled or decode_time_mixing(cfg):
        return None
    return Mixer(
        **timm_args(cfg.mix),
        label_smoothing=0.0 if multi_label else cfg.task.label_smoothing,
        num_classes=num_classes,
        multi_label=multi_label,
    )


# ----------------------------------------------------------------------------- decode side

_NUMPY_GLOBAL = threading.Lock()


@contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    """timm draws lambda and boxes from numpy's global generator: seed it for the block
    and restore the caller's state after."""
    with _NUMPY_GLOBAL:
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def unit_seed(seed: int, epoch: int, file: str, row_group: int) -> int:
    """A stable 32-bit seed for mixing one row group (``file`` relative to the dataset, so a
    copy of the dataset elsewhere mixes the same)."""
    key = f"mix:{seed}:{epoch}:{file}:{row_group}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


@dataclass(frozen=True)
class UnitPlan:
    """How the ``n`` rows of one unit mix; arrays indexed by row (after class selection).

    ``order`` is timm's batch order (position ``k`` holds row ``order[k]``, paired with
    position ``n-1-k``); the other arrays give each row its partner row (itself when
    unmixed), the weight of its own image, whether it takes a CutMix box and the box
    ``(y0, y1, x0, x1)`` copied from the partner.
    """

    order: np.ndarray  # int64 [n]
    partner: np.ndarray  # int64 [n]
    lam: np.ndarray  # float32 [n]
    cutmix: np.ndarray  # bool [n]
    box: np.ndarray  # int64 [n, 4]


def plan_unit(mix: MixConfig, n: int, size: int, seed: int) -> UnitPlan:
    """Pairs ``n`` rows and draws lambda (and CutMix boxes on ``size`` x ``size`` images) as
    ``timm.data.Mixup`` draws them for a batch of ``n`` in ``mix.mode``, from ``seed``.

    With ``np.random.seed(seed)`` before it, ``Mixup(**timm_args(mix))`` on the rows in
    ``order`` mixes exactly as this plan says (tests/test_mix.py checks). An odd ``n``
    leaves the middle row (paired with itself) unmixed.
    """
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    lam_pos = np.ones(n, dtype=np.float32)
    cut_pos = np.zeros(n, dtype=bool)
    box_pos = np.zeros((n, 4), dtype=np.int64)
    # timm's private draw helpers, called in the order its _mix_batch/_mix_pair/_mix_elem
    # call them, so the draws are timm's own (Mixup has no public "draw only" API)
    timm = Mixup(**timm_args(mix))
    shape = (size, size)

    def cut(k: int, lam: float) -> float:
        box, lam = cutmix_bbox_and_lam(shape, lam, ratio_minmax=timm.cutmix_minmax)
        box_pos[k], cut_pos[k] = [int(v) for v in box], True
        return lam

    with _numpy_global_seed(seed):
        if mix.mode == "batch":
            lam, use_cutmix = timm._params_per_batch()
            if lam != 1.0:
                if use_cutmix:
                    lam = cut(0, lam)
                    box_pos[:], cut_pos[:] = box_pos[0], True
                lam_pos[:] = lam
        elif mix.mode == "pair":
            lams, use_cutmix = timm._params_per_elem(n // 2)
            for i in range(n // 2):
                lam, j = lams[i], n - 1 - i
                if lam != 1.0:
                    if use_cutmix[i]:
                        lam = cut(i, lam)
                        box_pos[j], cut_pos[j] = box_pos[i], True
                    lam_pos[i] = lam_pos[j] = lam
        else:
            lams, use_cutmix = timm._params_per_elem(n)
            for i in range(n):
                lam = lams[i]
                if lam != 1.0:
                    lam_pos[i] = cut(i, lam) if use_cutmix[i] else lam
    partner_pos = n - 1 - np.arange(n)
    if n % 2:
        mid = n // 2
        lam_pos[mid], cut_pos[mid] = 1.0, False
    partner = np.empty(n, dtype=np.int64)
    partner[order] = order[partner_pos]
    lam, cutmix, box = (np.empty_like(a) for a in (lam_pos, cut_pos, box_pos))
    lam[order], cutmix[order], box[order] = lam_pos, cut_pos, box_pos
    return UnitPlan(order, partner, lam, cutmix, box)


def apply_plan(
    plan: UnitPlan, pixels: np.ndarray, ok: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mixes ``pixels`` uint8 [n, 3, s, s] by ``plan``; rows with ``ok`` False are absent.

    Returns ``(mixed uint8 [n, 3, s, s], partner row [n], lam float32 [n])``. A row mixes
    with its partner's original image: CutMix copies the partner's box, mixup is
    ``rint(lam * own + (1 - lam) * partner)`` in float32 (timm's ``FastCollateMixup``
    rounding), so it is bit-for-bit the same on every machine. A row whose partner is
    absent, or whose lambda came out 1, stays unmixed: partner itself, lam 1.

    Own code rather than timm's ``Mixup.__call__``: that mixes a full float batch in place
    and has no notion of a row that failed to decode; the draws it would make are the plan's.
    """
    n = len(plan.order)
    rows = np.arange(n)
    mixes = ok & ok[plan.partner] & (plan.partner != rows) & (plan.lam < 1.0)
    partner = np.where(mixes, plan.partner, rows)
    lam = np.where(mixes, plan.lam, np.float32(1.0)).astype(np.float32)
    out = pixels.copy()
    for r in np.flatnonzero(mixes):
        p = partner[r]
        if plan.cutmix[r]:
            y0, y1, x0, x1 = plan.box[r]
            out[r, :, y0:y1, x0:x1] = pixels[p, :, y0:y1, x0:x1]
        else:
            w = lam[r]
            blend = pixels[r].astype(np.float32) * w + pixels[p].astype(np.float32) * (1 - w)
            out[r] = np.rint(blend).astype(np.uint8)
    return out, partner, lam


def decode_unit(
    ids: Sequence[str],
    images: Sequence[bytes],
    labels: np.ndarray,
    *,
    transform: ImageTransform,
    mix: MixConfig,
    seed: int,
    epoch: int,
    unit: Unit,
    only: set[str] | None = None,
) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Decodes, augments and mixes one unit's rows (single-label).

    Each row is augmented with ``sample_seed(seed, id, epoch)``, as the ordinary ingest does,
    then mixed by :func:`plan_unit` with ``unit_seed(seed, epoch, unit)``. ``only``: emit just
    these ids, decoding no more than them and their partners (a store check).

    Returns:
        ``(columns, failures)``: columns ``id``, ``image`` uint8 [m, 3, s, s], ``aug_seed``,
        ``label``, ``mix_partner`` (ids), ``mix_lam`` float32, ``mix_label``, rows in timm's
        batch order; ``failures`` ``[(id, reason)]`` for rows that did not decode (dropped;
        their partners stay unmixed).
    """
    ids = np.asarray([str(i) for i in ids], dtype=object)
    labels = np.asarray(labels, dtype=np.int64)
    n, size = len(ids), transform.size
    plan = plan_unit(mix, n, size, unit_seed(seed, epoch, unit.file, unit.row_group))
    seeds = np.array([sample_seed(seed, i, epoch) for i in ids], dtype=np.int64)
    want = np.ones(n, dtype=bool) if only is None else np.isin(ids, list(only))
    need = want.copy()
    need[plan.partner[want]] = True
    rows = np.flatnonzero(need)
    decoded, kept, failed = decode_and_transform([images[r] for r in rows], transform, seeds[rows])
    pixels = np.zeros((n, 3, size, size), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    pixels[rows[kept]], ok[rows[kept]] = decoded, True
    mixed, partner, lam = apply_plan(plan, pixels, ok)
    emit = plan.order[(ok & want)[plan.order]]
    out = {
        "id": ids[emit],
        "image": mixed[emit],
        "aug_seed": seeds[emit],
        "label": labels[emit],
        "mix_partner": ids[partner[emit]],
        "mix_lam": lam[emit],
        "mix_label": labels[partner[emit]],
    }
    return out, [(str(ids[rows[i]]), reason) for i, reason in failed]
