"""The serving layer without Ray: settings, input checks, models and NCM prototypes."""

from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from raylens.data.images import encode_png
from raylens.predict import Predictor
from raylens.serving.errors import RequestError
from raylens.serving.inputs import check_uri, decode_base64, probe_image
from raylens.serving.labels import METRIC, decode
from raylens.serving.models import load_served_model
from raylens.serving.prototypes import PrototypeStore, check_class_name
from raylens.serving.settings import ModelEntry
from raylens.storage import Storage, join

from tests.test_embed import make_run

MB = 1_000_000


def _png(size=(20, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def test_base64_and_data_uris():
    png = _png()
    b64 = base64.b64encode(png).decode()
    assert decode_base64(b64, "x", max_bytes=MB) == png
    assert decode_base64(f"data:image/png;base64,{b64}", "x", max_bytes=MB) == png
    cases = {
        "@@@": (422, "invalid_base64"),
        f"data:text/plain;base64,{b64}": (415, "unsupported_media_type"),
        "data:image/png,raw": (422, "invalid_field"),
        "": (422, "invalid_field"),
    }
    for value, (status, error) in cases.items():
        with pytest.raises(RequestError) as err:
            decode_base64(value, "image_b64", max_bytes=MB)
        assert (err.value.status, err.value.error) == (status, error), value
        assert "image_b64" in err.value.detail
    with pytest.raises(RequestError, match="more than 10 bytes") as err:
        decode_base64(b64, "x", max_bytes=10)
    assert err.value.status == 413


def test_uris_only_under_the_allow_list():
    allowed = ["s3://bucket/images/", "gs://b/p"]
    assert check_uri("s3://bucket/images/a/b.png", "uri", allowed) == "s3://bucket/images/a/b.png"
    assert check_uri("gs://b/p/x.png", "uri", allowed) == "gs://b/p/x.png"
    refused = [
        "s3://bucket/images/../secret.png",
        "s3://bucket/imagesX/a.png",
        "s3://bucket/a.png",
        "gs://b/px/y.png",
        "http://bucket/images/a.png",
        "file:///etc/passwd",
        "s3://bucket/images/./a.png",
    ]
    for uri in refused:
        with pytest.raises(RequestError) as err:
            check_uri(uri, "uri", allowed)
        assert err.value.status == 403 and err.value.error == "uri_not_allowed", uri
    with pytest.raises(RequestError, match="fetches no URIs"):
        check_uri("s3://bucket/images/a.png", "uri", [])
    with pytest.raises(RequestError) as err:
        check_uri("not a uri", "uri", allowed)
    assert err.value.status == 422


def test_probe_refuses_bombs_from_the_header_and_non_images():
    info = probe_image(_png((20, 12)), "img", max_pixels=1000, max_bytes=MB)
    assert (info.width, info.height, info.format) == (20, 12, "PNG")
    with pytest.raises(RequestError) as err:
        probe_image(_png((2000, 2000), "L"), "img", max_pixels=1000, max_bytes=MB)
    assert (err.value.status, err.value.error) == (413, "image_too_large")
    assert "4000000 pixels > limit 1000" in err.value.detail
    with pytest.raises(RequestError) as err:
        probe_image(b"%PDF-1.7 not an image", "img", max_pixels=1000, max_bytes=MB)
    assert (err.value.status, err.value.error) == (415, "not_an_image")
    with pytest.raises(RequestError) as err:
        probe_image(b"", "img", max_pixels=1000, max_bytes=MB)
    assert (err.value.status, err.value.error) == (400, "empty_image")


def test_classifier_model_matches_the_predictor_and_isolates_bad_images(tmp_path):
    run = str(tmp_path / "run")
    make_run(Storage(), run)
    model = load_served_model(ModelEntry(id="r", run=run), Storage())
    assert model.kind == "classify" and model.classes == ["cat", "dog", "eel"]
    rng = np.random.default_rng(0)
    images = [encode_png(rng.integers(0, 255, (20, 24, 3), np.uint8)) for _ in range(3)]
    outs = model.infer([images[0], b"garbage", images[1], images[2][:60]])
    assert outs[1].error.startswith("undecodable") and outs[3].error.startswith("undecodable")
    pred = Predictor.load(run)
    pixels, _, _ = pred.preprocess(images[:2])
    feats, logits = pred.embed_and_logits(pred.normalize(torch.from_numpy(pixels)))
    for out, f, p in zip([outs[0], outs[2]], feats, pred.probs(logits), strict=True):
        assert out.error is None
        np.testing.assert_allclose(out.embedding, f.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.probs, p.numpy(), rtol=1e-5, atol=1e-6)
    ml = str(tmp_path / "ml")
    make_run(Storage(), ml, task="multi_label")
    m = load_served_model(ModelEntry(id="m", run=ml), Storage())
    assert m.kind == "multilabel" and m.describe()["threshold"] == 0.5
    (out,) = m.infer(images[:1])
    assert out.probs.shape == (3,) and not np.isclose(out.probs.sum(), 1.0)
    with pytest.raises(FileNotFoundError, match="not a run dir"):
        load_served_model(ModelEntry(id="x", run=str(tmp_path / "none")), Storage())
    # what /v1/embed names as the source of an embedding: an id, not the checkpoint's path
    assert model.model_id == "r@epoch=2" and model.describe()["model_id"] == "r@epoch=2"
    pinned = load_served_model(
        ModelEntry(id="r1", run=run, checkpoint="checkpoints/epoch=1"), Storage()
    )
    assert pinned.model_id == "r1@epoch=1"
    bare = load_served_model(ModelEntry(id="bb", backbone="vgg_s8"), Storage())
    assert bare.model_id == "bb@vgg_s8" and bare.describe()["model_id"] == "bb@vgg_s8"


def test_prototypes_enrol_update_replace_delete_and_persist(tmp_path):
    storage, run = Storage(), str(tmp_path / "run")
    store = PrototypeStore(storage, run, 4).load()
    assert store.source == "" and store.similarities(np.ones((1, 4))).shape == (1, 0)
    e = np.eye(4, dtype=np.float32)
    assert store.enroll("a", e[:1] * 3) == {"class": "a", "created": True, "count": 1}
    store.enroll("b", np.stack([e[1], e[1] + 0.1 * e[2]]))
    info = store.enroll("a", e[1:2])  # update: the mean of 2 unit vectors
    assert info == {"class": "a", "created": False, "count": 2}
    np.testing.assert_allclose(store.protos[0], [0.70710677, 0.70710677, 0, 0], atol=1e-6)
    sims = store.similarities(np.array([[0, 1.0, 0.05, 0]]))
    top = decode(sims, kind=METRIC, classes=store.names, k=2)[0]
    assert [x["label"] for x in top] == ["b", "a"] and top[0]["score"] > top[1]["score"]
    store.enroll("a", e[3:4], replace=True)
    np.testing.assert_allclose(store.protos[0], e[3], atol=1e-6)
    assert store.delete("b") and not store.delete("b")
    again = PrototypeStore(storage, run, 4).load()  # a restarted replica
    assert again.list() == [{"class": "a", "count": 1, "seen_in_training": False, "enrolled": True}]
    assert again.source == join(run, "serving/prototypes.parquet")
    assert again.origin == "serving" and store.origin == "serving"  # /v1/classes: no path
    assert PrototypeStore(storage, str(tmp_path / "none"), 4).load().origin is None
    assert pq.read_table(again.source).num_rows == 1
    for bad in ("", " a", "a\n", "x" * 129, 3):
        with pytest.raises(ValueError):
            check_class_name(bad)
    with pytest.raises(ValueError, match=r"embeddings \[n >= 1, 4\]"):
        store.enroll("c", np.ones((2, 5)))


def test_a_12_mp_jpeg_decodes_reduced_for_the_eval_box(tmp_path, monkeypatch):
    """Serving decodes a large JPEG at the DCT scale the eval transform's center box allows
    (decode_transform), close to the full decode's pixels, in a fraction of its time."""
    import time

    from raylens.data import transforms
    from raylens.data.images import decode_rgb

    run = str(tmp_path / "run")
    make_run(Storage(), run)
    model = load_served_model(ModelEntry(id="r", run=run), Storage())
    tf = model.predictors[0].transform
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8))
    buf = io.BytesIO()
    small.resize((4000, 3000), Image.BICUBIC).save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    scales, real = [], transforms.apply_draft

    def spy(img, scale):
        scales.append(real(img, scale))
        return scales[-1]

    monkeypatch.setattr(transforms, "apply_draft", spy)
    (pixels,) = model.preprocess(jpeg)
    assert scales == [8]  # 3000 px center box / 8 still >= the gap x the eval size
    full = tf(decode_rgb(jpeg))
    assert pixels.shape == full.shape == (3, tf.size, tf.size)
    assert np.abs(pixels.astype(int) - full.astype(int)).mean() < 4
    (out,) = model.infer([jpeg])
    ref = model.forward([[full]])[0]
    np.testing.assert_allclose(out.probs, ref.probs, atol=0.05)

    def fastest(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    assert fastest(lambda: model.preprocess(jpeg)) < fastest(lambda: decode_rgb(jpeg)) / 2


def test_topology_one_hop_for_one_model_else_split():
    from raylens.serving.settings import load_settings

    one = {"models": [{"id": "a", "run": "r/a"}]}
    assert load_settings(one).one_hop
    assert not load_settings({**one, "topology": "split"}).one_hop
    assert not load_settings({**one, "runs_root": "runs"}).one_hop
    two = {"models": [{"id": "a", "run": "r/a"}, {"id": "b", "run": "r/b"}]}
    assert not load_settings(two).one_hop
    assert load_settings({**two, "topology": "one_hop"}).one_hop
    with pytest.raises(Exception, match="topology"):
        load_settings({**one, "topology": "three_hop"})
