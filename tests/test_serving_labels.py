"""Label decoding (raylens.serving.labels): the one scores → labels decision that Serve's
/v1/classify answers with and the training reports use. Pure: numpy only."""

from __future__ import annotations

import numpy as np
import pytest
from raylens.serving.errors import RequestError
from raylens.serving.labels import (
    BACKBONE,
    CLASSIFY,
    METRIC,
    MULTILABEL,
    choose,
    decode,
    labels_body,
    probabilities,
    require_labels,
)
from raylens.serving.prototypes import PrototypeStore
from raylens.storage import Storage

CLASSES = ["cat", "dog", "eel", "fox"]


def test_classify_gives_the_top_k_best_first_and_ties_keep_class_order():
    probs = np.array([0.1, 0.4, 0.25, 0.25], np.float32)
    assert decode(probs, kind=CLASSIFY, classes=CLASSES, k=3) == [
        {"label": "dog", "score": 0.4},
        {"label": "eel", "score": 0.25},  # tied with fox: the earlier class first
        {"label": "fox", "score": 0.25},
    ]
    assert choose(probs, kind=CLASSIFY, k=1) == [1]
    assert choose(probs, kind=CLASSIFY, k=10) == [1, 2, 3, 0]  # k over C: every class
    # ties, many classes (where an unstable sort reorders them): class order within a score
    scores = np.random.default_rng(0).integers(0, 3, 200) / 4
    got = choose(scores, kind=CLASSIFY, k=200)
    want = [i for v in (0.5, 0.25, 0.0) for i in range(200) if scores[i] == v]
    assert got == want
    got = decode(np.array([0.12345678, 0.87654322]), kind=CLASSIFY, classes=["a", "b"], k=2)
    assert got == [{"label": "b", "score": 0.876543}, {"label": "a", "score": 0.123457}]


def test_multilabel_gives_every_class_at_or_over_the_threshold_whatever_k():
    probs = np.array([0.6, 0.5, 0.49, 0.9], np.float32)
    got = decode(probs, kind=MULTILABEL, classes=CLASSES, k=1, threshold=0.5)
    assert [x["label"] for x in got] == ["fox", "cat", "dog"]  # 0.5 itself counts
    assert decode(probs, kind=MULTILABEL, classes=CLASSES, threshold=0.95) == []
    assert choose(probs, kind=MULTILABEL, k=1, threshold=0.0) == [3, 0, 1, 2]


def test_metric_gives_the_k_nearest_prototypes(tmp_path):
    sims = np.array([0.2, -0.1, 0.9], np.float32)
    got = decode(sims, kind=METRIC, classes=["a", "b", "c"], k=2)
    assert got == [{"label": "c", "score": 0.9}, {"label": "a", "score": 0.2}]
    # through a prototype store's cosine similarities
    store = PrototypeStore(Storage(), str(tmp_path / "run"), 3).load()
    assert decode(store.similarities(np.ones((1, 3))), kind=METRIC, classes=[], k=3) == [[]]
    e = np.eye(3, dtype=np.float32)
    store.enroll("x", e[:1])
    store.enroll("y", e[1:2])
    sims = store.similarities(np.array([[0.2, 1.0, 0.0]]))
    got = decode(sims, kind=METRIC, classes=store.names, k=5)[0]
    assert [x["label"] for x in got] == ["y", "x"]
    assert got[0]["score"] == pytest.approx(1 / np.sqrt(1.04), abs=1e-6)


def test_a_batch_decodes_row_by_row():
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.0, 0.1, 0.2, 0.7]])
    got = decode(probs, kind=CLASSIFY, classes=CLASSES, k=1)
    assert got == [[{"label": "cat", "score": 0.7}], [{"label": "fox", "score": 0.7}]]


def test_labels_body_says_what_the_scores_are():
    probs = np.array([0.1, 0.7, 0.2, 0.0])
    body = labels_body(probs, kind=CLASSIFY, classes=CLASSES, k=2)
    assert body == {
        "labels": [{"label": "dog", "score": 0.7}, {"label": "eel", "score": 0.2}],
        "score": "probability",
    }
    body = labels_body(probs, kind=MULTILABEL, classes=CLASSES, k=2, threshold=0.15)
    assert body["score"] == "probability" and body["threshold"] == 0.15
    assert [x["label"] for x in body["labels"]] == ["dog", "eel"]
    body = labels_body(probs, kind=METRIC, classes=CLASSES, k=1)
    assert body == {"labels": [{"label": "dog", "score": 0.7}], "score": "cosine_similarity"}


def test_probabilities_from_logits():
    logits = np.array([[2.0, 1.0, 0.0, -1.0], [1000.0, 0.0, 0.0, 0.0]])
    p = probabilities(logits, kind=CLASSIFY)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    assert choose(p[0], kind=CLASSIFY, k=4) == [0, 1, 2, 3] and p[1, 0] == 1.0  # no overflow
    s = probabilities(np.array([0.0, 3.0, -3.0, 0.0]), kind=MULTILABEL)
    np.testing.assert_allclose(s, [0.5, 0.952574, 0.047426, 0.5], atol=1e-6)


def test_bad_kinds_and_shapes_are_refused():
    with pytest.raises(ValueError, match="run kind 'backbone' has no labels"):
        decode(np.zeros(4), kind=BACKBONE, classes=CLASSES)
    with pytest.raises(ValueError, match="run kind 'nope'"):
        choose(np.zeros(4), kind="nope", k=1)
    with pytest.raises(ValueError, match=r"scores of shape \(3,\) for 4 classes"):
        decode(np.zeros(3), kind=CLASSIFY, classes=CLASSES)
    with pytest.raises(ValueError, match="one image's scores"):
        choose(np.zeros((2, 4)), kind=CLASSIFY, k=1)
    require_labels("m", CLASSIFY)
    with pytest.raises(RequestError) as err:
        require_labels("bb", BACKBONE)
    assert (err.value.status, err.value.error) == (422, "not_a_classifier")
    assert err.value.detail == "model 'bb' is a bare backbone: use /v1/embed"
