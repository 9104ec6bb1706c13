"""Scores → labels: the one decision of which classes an image gets, for Serve and reports.

    decode(probs, kind=CLASSIFY, classes=["cat", "dog", "eel"], k=2)
    # [{"label": "dog", "score": 0.7}, {"label": "cat", "score": 0.2}]

- ``classify``: the ``k`` most probable classes (softmax probabilities), best first.
- ``multilabel``: every class whose sigmoid probability is ``>= threshold``, best first
  (``k`` does not cut them).
- ``metric``: the ``k`` nearest classes by cosine similarity to their Nearest-Class-Mean
  prototypes, best first.

Ties keep the classes' order (a stable sort), so equal scores always decode the same way.
Scores are rounded to 6 decimals. Pure: no Ray. Kinds are :mod:`raylens.rundir`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raylens.rundir import BACKBONE, CLASSIFY, METRIC, MULTILABEL
from raylens.serving.errors import RequestError

__all__ = ["BACKBONE", "CLASSIFY", "METRIC", "MULTILABEL", "decode"]

_TOP_K = (CLASSIFY, METRIC)

SCORE = {CLASSIFY: "probability", MULTILABEL: "probability", METRIC: "cosine_similarity"}


def _check(kind: str) -> None:
    if kind not in _TOP_K and kind != MULTILABEL:
        raise ValueError(
            f"run kind {kind!r} has no labels; expected {CLASSIFY}, {MULTILABEL} or {METRIC}"
        )


def probabilities(logits: np.ndarray, *, kind: str) -> np.ndarray:
    """A head's logits ``[..., C]`` → probabilities: softmax (``classify``) or sigmoid
    (``multilabel``), in float32."""
    _check(kind)
    x = np.asarray(logits, np.float64)
    if kind == MULTILABEL:
        p = 1.0 / (1.0 + np.exp(-x))
    else:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
    return p.astype(np.float32)


def choose(scores: np.ndarray, *, kind: str, k: int, threshold: float = 0.5) -> list[int]:
    """The class indices one image gets (``scores [C]``), best first; see the module doc."""
    _check(kind)
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"choose takes one image's scores [C], got shape {s.shape}")
    order = np.argsort(-s, kind="stable")
    if kind == MULTILABEL:
        return [int(i) for i in order if s[i] >= threshold]
    return [int(i) for i in order[:k]]


def decode(
    scores: np.ndarray,
    *,
    kind: str,
    classes: Sequence[str],
    k: int = 5,
    threshold: float = 0.5,
) -> list[dict] | list[list[dict]]:
    """Scores → ``[{"label": class, "score": rounded score}, ...]`` best first.

    Args:
        scores: ``[C]`` for one image (one list back) or ``[N, C]`` (N lists back):
            probabilities for ``classify``/``multilabel``, cosine similarities to the
            class prototypes for ``metric``.
        kind: ``classify``, ``multilabel`` or ``metric``.
        classes: the ``C`` class names, in score order.
        k: most labels (``classify``, ``metric``).
        threshold: the probability from which a class is given (``multilabel``).
    """
    s = np.asarray(scores)
    if s.ndim == 2:
        return [decode(row, kind=kind, classes=classes, k=k, threshold=threshold) for row in s]
    if s.shape != (len(classes),):
        raise ValueError(f"scores of shape {s.shape} for {len(classes)} classes")
    idx = choose(s, kind=kind, k=k, threshold=threshold)
    return [{"label": classes[i], "score": round(float(s[i]), 6)} for i in idx]


def labels_body(
    scores: np.ndarray,
    *,
    kind: str,
    classes: Sequence[str],
    k: int,
    threshold: float = 0.5,
) -> dict:
    """``/v1/classify``'s labels for one image: ``{"labels", "score"}`` (what the scores
    are), plus ``threshold`` for a multilabel run."""
    labels = decode(scores, kind=kind, classes=classes, k=k, threshold=threshold)
    body = {"labels": labels, "score": SCORE.get(kind, SCORE[CLASSIFY])}
    if kind == MULTILABEL:
        body["threshold"] = threshold
    return body


def require_labels(model_id: str, kind: str) -> None:
    """Refuses (422) to classify with a bare backbone (it has embeddings, no classes)."""
    if kind == BACKBONE:
        raise RequestError(
            422, "not_a_classifier", f"model {model_id!r} is a bare backbone: use /v1/embed"
        )
