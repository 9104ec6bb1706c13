"""Ray Serve: real HTTP requests to the raylens app on 127.0.0.1, serving runs these tests
train on a Fashion-MNIST subset (a classifier and a metric-learning run over it), the
classifier also from real S3 (SeaweedFS) and GCS (fake-gcs-server), and a broken run.

Checked: classification at the run's own test accuracy; embeddings equal to the embed job's;
OpenAI-style embeddings; class enrolment (NCM) seen by the next classify call and kept across
a Prototypes replica restart; every bad input answered with its 4xx JSON error while the
server keeps serving; configured runs that are missing, corrupt or broken answered 503
naming them (and so reported by /readyz), every error body one short line with nothing of
Ray's traceback or the server's paths; overload answered 429 + Retry-After; an API key; a
model replica killed under steady load (the error rate during recovery is printed)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import gzip
import io
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from raylens import config as C
from raylens.config import ConfigError
from raylens.data import fashion_mnist as fm
from raylens.data.images import encode_png
from raylens.predict import Predictor
from raylens.schema import RunConfig
from raylens.serving.settings import load_settings
from raylens.storage import Storage, join

from tests.sourcegen import prepare_quiet, read_prepared
from tests.stores import gcs_storage, s3_storage
from tests.test_serving_calls import LEAKS, assert_clean

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        not os.path.exists(fm.DEBIAN_DIR),
        reason="needs the Debian package dataset-fashion-mnist (installed by .ci/run)",
    ),
]

API_KEY = "test-key-7f3a"
KEY_ENV = "RAYLENS_TEST_API_KEY"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
UNLOADABLE = ("broken", "corrupt", "missing")  # configured models that answer 503
TRAIN, VAL, TEST = 80, 10, 30  # images per class


def _names() -> list[str]:
    return [c.replace("/", "-") for c in fm.CLASSES]  # folder names: no "/"


def _idx(name: str) -> np.ndarray:
    with open(os.path.join(fm.DEBIAN_DIR, fm.FILES[name] + ".gz"), "rb") as f:
        return fm.parse_idx(gzip.decompress(f.read()))


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """A Fashion-MNIST subset (80/10/30 per class), a classifier run and a metric run."""
    from raylens.train import finetune

    root = tmp_path_factory.mktemp("serve")
    storage = Storage()
    names = _names()
    train_x, train_y = _idx("train_images"), _idx("train_labels")
    test_x, test_y = _idx("test_images"), _idx("test_labels")
    for c, name in enumerate(names):
        tr = np.nonzero(train_y == c)[0][: TRAIN + VAL]
        te = np.nonzero(test_y == c)[0][: TEST + 10]  # 10 more: enrolment's own images
        for i, j in enumerate(tr):
            split = "train" if i < TRAIN else "val"
            storage.write_bytes(str(root / f"raw/{split}/{name}/{j}.png"), encode_png(train_x[j]))
        for i, j in enumerate(te):
            where = "raw/test" if i < TEST else "extra"
            storage.write_bytes(str(root / f"{where}/{name}/{j}.png"), encode_png(test_x[j]))
    prepare_quiet(storage, str(root / "raw"), str(root / "ds"))
    common = [
        f"data.dataset={root / 'ds'}",
        f"run.output_dir={root / 'runs'}",
        "data.image_size=28",
        "data.eval_crop_pct=1.0",
        "data.mean=[0.286, 0.286, 0.286]",
        "data.std=[0.353, 0.353, 0.353]",
        "data.rrc_scale=[0.8, 1.0]",
        "data.batch_size=64",
        "train.warmup_epochs=0.5",
        "ray.num_workers=1",
    ]
    clf = finetune(
        C.load(
            RunConfig,
            None,
            [*common, "run.name=fm", "model.backbone=vgg_s16", "train.epochs=4", "train.lr=0.004"],
        )
    )
    metric = finetune(
        C.load(
            RunConfig,
            None,
            [
                *common,
                "run.name=fm-metric",
                "task.name=metric",
                f"metric.backbones=[{clf['run_dir']}]",
                f"metric.cache={root / 'cache'}",
                "metric.train_classes=[T-shirt-top, Pullover, Dress, Coat, Sandal, Shirt]",
                "metric.fusion_hidden=[128]",
                "metric.embedding_dim=64",
                "train.epochs=4",
                "train.lr=0.001",
            ],
        )
    )
    # the embed job's output for the classifier (before Serve holds any CPU)
    from raylens.infer.embed import embed

    out = str(root / "emb")
    embed(
        C.load(
            RunConfig,
            None,
            [
                f"data.dataset={root / 'ds'}",
                f"embed.model={clf['run_dir']}",
                f"embed.output={out}",
                "embed.splits=[test]",
            ],
        )
    )
    return {
        "embed_job": {r["id"]: np.array(r["embedding"]) for r in pq.read_table(out).to_pylist()},
        "root": root,
        "ds": str(root / "ds"),
        "clf": clf["run_dir"],
        "clf_test": clf["test"],
        "metric": metric["run_dir"],
        "extra": root / "extra",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_dir(src: str, storage: Storage, dst: str) -> None:
    for path in Path(src).rglob("*"):
        if path.is_file():
            storage.write_bytes(join(dst, str(path.relative_to(src))), path.read_bytes())


def settings(runs, seaweed, fake_gcs) -> dict:
    """Three local models, the classifier copied to real S3 and GCS, a broken run; images
    fetched only from one local folder and one S3 prefix."""
    allowed = runs["root"] / "allowed"
    allowed.mkdir(exist_ok=True)
    bucket = f"serve-{uuid.uuid4().hex[:8]}"
    seaweed.create_bucket(bucket)
    fake_gcs.create_bucket(bucket)
    s3, gcs = s3_storage(seaweed), gcs_storage(fake_gcs)
    _copy_dir(runs["clf"], s3, f"s3://{bucket}/runs/fm")
    _copy_dir(runs["clf"], gcs, f"gs://{bucket}/runs/fm")
    broken = runs["root"] / "broken"
    _copy_dir(runs["clf"], Storage(), str(broken))
    (broken / "config.yaml").write_text("model: {backbone: 3}\n")
    corrupt = runs["root"] / "corrupt"  # its best checkpoint's weights: not safetensors
    _copy_dir(runs["clf"], Storage(), str(corrupt))
    best = json.loads((corrupt / "best.json").read_text())["checkpoint"]
    (corrupt / best / "model.safetensors").write_bytes(b"\x00" * 64)
    bag = sorted((runs["root"] / "raw/test/Bag").glob("*.png"))[0]
    s3.write_bytes(f"s3://{bucket}/images/bag.png", bag.read_bytes())
    s3.write_bytes(f"s3://{bucket}/private/bag.png", bag.read_bytes())
    return {
        "models": [
            {"id": "fm", "run": runs["clf"]},
            {"id": "fm-metric", "run": runs["metric"]},
            {"id": "bb", "backbone": "vgg_s8"},
            {"id": "fm-s3", "run": f"s3://{bucket}/runs/fm"},
            {"id": "fm-gcs", "run": f"gs://{bucket}/runs/fm"},
        ],
        "runs_root": str(runs["root"] / "runs"),  # any run there by id, on demand
        "storage": {
            "s3_endpoint_url": seaweed.endpoint_url,
            "s3_region": seaweed.region,
            "s3_access_key_id": seaweed.access_key,
            "s3_secret_access_key": seaweed.secret_key,
            "gcs_endpoint_url": fake_gcs.endpoint_url,
            "gcs_anonymous": True,
        },
        "allowed_uri_prefixes": [f"file://{allowed}/", f"s3://{bucket}/images/"],
        "max_models_per_replica": 2,  # five models: the LRU evicts
        "bucket": bucket,
        "broken": str(broken),
        "corrupt": str(corrupt),
        "api_key_env": KEY_ENV,
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.01},
        "limits": {
            "max_request_bytes": 1_000_000,
            "max_image_pixels": 4_000_000,
            "max_images": 16,
            "max_inflight": 12,
        },
    }


@pytest.fixture(scope="module")
def server(runs, seaweed, fake_gcs):
    import httpx
    from ray import serve

    from serve.app import make_app

    args = settings(runs, seaweed, fake_gcs)
    bucket, broken, corrupt = args.pop("bucket"), args.pop("broken"), args.pop("corrupt")
    args["models"] += [
        {"id": "broken", "run": broken},  # a config that does not load
        {"id": "corrupt", "run": corrupt},  # a checkpoint that does not load
        {"id": "missing", "run": str(runs["root"] / "untrained/fm-next")},  # no run there
    ]
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = make_app(
        args,
        model_options={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}},
        ingress_options={
            "ray_actor_options": {"num_cpus": 0, "runtime_env": {"env_vars": {KEY_ENV: API_KEY}}}
        },
    )
    serve.run(app, name="raylens", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=HEADERS, timeout=60)
    deadline = time.time() + 120
    while True:  # every model loads but the three bad ones: not ready, and it says which
        r = client.get("/readyz")
        models = r.json().get("models", {})
        if models and all(v == "loaded" for k, v in models.items() if k not in UNLOADABLE):
            break
        assert time.time() < deadline, r.text
        time.sleep(0.5)
    assert r.status_code == 503 and not r.json()["ready"]
    assert models["broken"].startswith("model 'broken' does not load: run"), models
    assert "config.yaml does not load" in models["broken"]
    assert models["corrupt"].startswith("model 'corrupt' does not load: SafetensorError"), models
    assert models["missing"] == (
        "model 'missing' is unavailable: its run 'fm-next' is missing (not trained yet, or moved)"
    )
    assert not LEAKS.search(r.text), r.text  # no frames, Ray reprs or paths in any of it
    for mid in UNLOADABLE:
        assert_clean(models[mid], runs["root"])
    yield {
        "client": client,
        "url": f"http://127.0.0.1:{port}",
        "bucket": bucket,
        "secret": seaweed.secret_key,
        **runs,
    }
    client.close()
    serve.shutdown()


def _test_rows(ds: str) -> list[dict]:
    _, rows = read_prepared(Storage(), ds)
    return sorted((r for r in rows if r["split"] == "test"), key=lambda r: r["id"])


def _png(path) -> bytes:
    return open(path, "rb").read()


def _classify(client, image: bytes, model: str = "fm", **params) -> dict:
    r = client.post(
        "/v1/classify",
        content=image,
        headers={"content-type": "image/png"},
        params={"model": model, **params},
    )
    assert r.status_code == 200, r.text
    return r.json()


# ----------------------------------------------------------------------------- settings


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'batching.max_batch'"):
        load_settings({"models": [{"id": "a", "run": "r"}], "batching": {"max_batch": 4}})
    with pytest.raises(ConfigError, match=r"models\[0\]\.id"):
        load_settings({"models": [{"id": "../etc", "run": "r"}]})
    with pytest.raises(ConfigError, match="exactly one of 'run' or 'backbone'"):
        load_settings({"models": [{"id": "a"}]})
    with pytest.raises(ConfigError, match="http\\(s\\) URLs are never fetched"):
        load_settings({"models": [{"id": "a", "run": "r"}], "allowed_uri_prefixes": ["http://x/"]})
    with pytest.raises(ConfigError, match="'ftp://host/images/'.*scheme 'ftp' is never fetched"):
        load_settings(
            {"models": [{"id": "a", "run": "r"}], "allowed_uri_prefixes": ["ftp://host/images/"]}
        )
    with pytest.raises(ConfigError, match="default_model"):
        load_settings({"models": [{"id": "a", "run": "r"}], "default_model": "b"})


# ----------------------------------------------------------------------------- serving


def test_classify_held_out_images_at_the_runs_accuracy(server):
    client = server["client"]
    rows = _test_rows(server["ds"])
    assert len(rows) == 10 * TEST
    classes = json.loads(Storage().read_text(join(server["clf"], "labels.json")))["classes"]

    def one(row):
        return _classify(client, row["image"])

    with cf.ThreadPoolExecutor(8) as pool:  # concurrent: batched on the server
        got = list(pool.map(one, rows))
    assert all(g["kind"] == "classify" and len(g["labels"]) == 5 for g in got)
    served = np.array([classes.index(g["labels"][0]["label"]) for g in got])
    labels = np.array([r["label"] for r in rows])
    acc = float((served == labels).mean())
    # the same images through the run's own test evaluation (Ray Data ingest)
    want = server["clf_test"]["top1"]
    assert want > 0.6, f"the test run learned too little ({want})"
    assert abs(acc - want) <= 1 / len(rows) + 1e-9, (acc, want)
    # and image by image, the offline predictor's argmax
    pred = Predictor.load(server["clf"])
    pixels, _, _ = pred.preprocess([r["image"] for r in rows])
    import torch

    offline = pred.logits(pred.normalize(torch.from_numpy(pixels))).argmax(1).numpy()
    assert (offline != served).sum() <= 1
    # the same run served from real S3 and GCS answers the same
    for mid in ("fm-s3", "fm-gcs"):
        for row, want_labels in list(zip(rows, got, strict=True))[::50]:
            labels = _classify(client, row["image"], mid)["labels"]
            assert [x["label"] for x in labels] == [x["label"] for x in want_labels["labels"]]
            np.testing.assert_allclose(  # other batch compositions: float noise only
                [x["score"] for x in labels],
                [x["score"] for x in want_labels["labels"]],
                atol=1e-4,
                err_msg=mid,
            )
    scores = [x["score"] for x in got[0]["labels"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-5


def test_embed_equals_the_embed_job_and_openai_shape(server):
    client = server["client"]
    job = server["embed_job"]
    rows = _test_rows(server["ds"])[::37][:8]
    for row in rows:
        r = client.post(
            "/v1/embed", files={"image": ("x.png", row["image"], "image/png")}, data={"model": "fm"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        best = json.loads(Storage().read_text(join(server["clf"], "best.json")))["checkpoint"]
        assert body["dim"] == len(job[row["id"]]) == 64
        assert body["model_id"] == "fm@" + best.rsplit("/", 1)[-1]  # an id, not a path
        np.testing.assert_allclose(body["embedding"], job[row["id"]], rtol=1e-4, atol=1e-4)
    # OpenAI embeddings: data URIs in, float and base64 encodings out
    uris = ["data:image/png;base64," + base64.b64encode(r["image"]).decode() for r in rows[:3]]
    r = client.post("/v1/embeddings", json={"model": "fm", "input": uris})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    for d, row in zip(body["data"], rows[:3], strict=True):
        np.testing.assert_allclose(d["embedding"], job[row["id"]], rtol=1e-4, atol=1e-4)
    r = client.post(
        "/v1/embeddings", json={"model": "fm", "input": uris[0], "encoding_format": "base64"}
    )
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vec, job[rows[0]["id"]], rtol=1e-4, atol=1e-4)
    # a bare backbone serves embeddings, not classes
    r = client.post("/v1/embed", json={"model": "bb", "image_b64": uris[0], "normalize": True})
    assert r.status_code == 200 and abs(np.linalg.norm(r.json()["embedding"]) - 1) < 1e-5
    r = client.post("/v1/classify", json={"model": "bb", "image_b64": uris[0]})
    assert r.status_code == 422 and r.json()["error"] == "not_a_classifier"


def test_enrolled_class_is_recognised_and_survives_a_restart(server):
    import ray

    client = server["client"]
    extra = sorted((server["extra"] / "Trouser").glob("*.png"))
    test_trousers = sorted((server["root"] / "raw/test/Trouser").glob("*.png"))
    assert len(extra) == 10 and len(test_trousers) == TEST
    r = client.get("/v1/classes", params={"model": "fm-metric"})
    assert r.status_code == 200 and "Trouser" in [c["class"] for c in r.json()["classes"]]
    r = client.delete("/v1/classes/Trouser", params={"model": "fm-metric"})
    assert r.status_code == 200, r.text
    r = client.delete("/v1/classes/Trouser", params={"model": "fm-metric"})
    assert r.status_code == 404 and r.json()["error"] == "unknown_class"
    before = [_classify(client, _png(p), "fm-metric")["labels"][0]["label"] for p in test_trousers]
    assert "Trouser" not in before
    # enrol from 5 images (JSON, data URIs)
    images = ["data:image/png;base64," + base64.b64encode(_png(p)).decode() for p in extra[:5]]
    r = client.post(
        "/v1/enroll", json={"model": "fm-metric", "name": "trousers-new", "images": images}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "model": "fm-metric",
        "class": "trousers-new",
        "created": True,
        "count": 5,
        "images": 5,
    }
    after = [_classify(client, _png(p), "fm-metric")["labels"][0]["label"] for p in test_trousers]
    hit = after.count("trousers-new") / len(after)
    assert hit >= 0.8, after
    # update the class with 5 more (multipart upload)
    files = [("images", (p.name, _png(p), "image/png")) for p in extra[5:]]
    r = client.post("/v1/enroll", files=files, data={"model": "fm-metric", "name": "trousers-new"})
    assert r.status_code == 200 and r.json()["count"] == 10 and not r.json()["created"]
    # persisted in the run dir; a restarted Prototypes replica loads it
    table = pq.read_table(join(server["metric"], "serving/prototypes.parquet")).to_pylist()
    names = [t["class"] for t in table]
    assert "trousers-new" in names and "Trouser" not in names
    assert "Trouser" in [
        t["class"] for t in pq.read_table(join(server["metric"], "prototypes.parquet")).to_pylist()
    ]
    replica = next(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "#Prototypes#" in a["name"]
    )
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
    deadline = time.time() + 60
    while True:
        r = client.get("/v1/classes", params={"model": "fm-metric"})
        if r.status_code == 200:
            break
        assert time.time() < deadline, r.text
        time.sleep(0.5)
    got = {c["class"]: c for c in r.json()["classes"]}
    assert got["trousers-new"]["count"] == 10 and got["trousers-new"]["enrolled"]
    assert "Trouser" not in got
    assert (
        _classify(client, _png(test_trousers[0]), "fm-metric")["labels"][0]["label"]
        == "trousers-new"
    )
    # a classifier run has no prototypes to enrol into
    r = client.post("/v1/enroll", json={"model": "fm", "name": "x", "images": images[:1]})
    assert r.status_code == 409 and r.json()["error"] == "not_a_metric_model"


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buf, format="PNG")  # 16 M pixels in ~16 KB
    return buf.getvalue()


def test_every_bad_input_gets_its_4xx_and_the_server_keeps_serving(server, capsys):
    client = server["client"]
    good = _png(sorted((server["root"] / "raw/test/Bag").glob("*.png"))[0])
    bucket = server["bucket"]
    allowed = server["root"] / "allowed"
    (allowed / "bag.png").write_bytes(good)
    (server["root"] / "secret.png").write_bytes(good)
    png = {"content-type": "image/png"}
    b64 = base64.b64encode(good).decode()
    bad = {
        "oversized body": (
            lambda: client.post("/v1/classify", content=b"\0" * 1_200_000, headers=png),
            413,
            "request_too_large",
        ),
        "decompression bomb": (
            lambda: client.post("/v1/classify", content=_bomb(), headers=png),
            413,
            "image_too_large",
        ),
        "non-image bytes": (
            lambda: client.post("/v1/classify", content=b"GIF89a-not-really", headers=png),
            415,
            "not_an_image",
        ),
        "truncated png": (
            lambda: client.post("/v1/classify", content=good[: len(good) // 2], headers=png),
            415,
            "not_an_image",
        ),
        "wrong content type": (
            lambda: client.post(
                "/v1/classify", content=good, headers={"content-type": "text/plain"}
            ),
            415,
            "unsupported_media_type",
        ),
        "malformed json": (
            lambda: client.post(
                "/v1/classify",
                content=b'{"image_b64": ',
                headers={"content-type": "application/json"},
            ),
            400,
            "malformed_json",
        ),
        "bad base64": (
            lambda: client.post("/v1/classify", json={"image_b64": "@@not base64@@"}),
            422,
            "invalid_base64",
        ),
        "unknown model": (
            lambda: client.post("/v1/classify", json={"image_b64": b64, "model": "nope"}),
            404,
            "unknown_model",
        ),
        "model id with a path": (
            lambda: client.post("/v1/classify", json={"image_b64": b64, "model": "../fm"}),
            404,
            "unknown_model",
        ),
        "unknown model header": (
            lambda: client.post(
                "/v1/classify", content=good, headers={**png, "serve_multiplexed_model_id": "x"}
            ),
            404,
            "unknown_model",
        ),
        "uri outside the allow-list": (
            lambda: client.post(
                "/v1/classify", json={"uri": f"file://{server['root']}/secret.png"}
            ),
            403,
            "uri_not_allowed",
        ),
        "uri escaping the allow-list": (
            lambda: client.post("/v1/classify", json={"uri": f"file://{allowed}/../secret.png"}),
            403,
            "uri_not_allowed",
        ),
        "http uri (ssrf)": (
            lambda: client.post("/v1/classify", json={"uri": "http://169.254.169.254/latest/"}),
            403,
            "uri_not_allowed",
        ),
        "missing object": (
            lambda: client.post("/v1/classify", json={"uri": f"file://{allowed}/none.png"}),
            404,
            "uri_not_found",
        ),
        "too many images": (
            lambda: client.post("/v1/embeddings", json={"model": "fm", "input": [b64] * 17}),
            413,
            "too_many_images",
        ),
        "bad top_k": (
            lambda: client.post("/v1/classify", content=good, headers=png, params={"top_k": "x"}),
            422,
            "invalid_field",
        ),
        "bad class name": (
            lambda: client.post(
                "/v1/enroll", json={"model": "fm-metric", "name": " x\n", "images": [b64]}
            ),
            422,
            "invalid_field",
        ),
        "s3 uri outside the allowed prefix": (
            lambda: client.post("/v1/classify", json={"uri": f"s3://{bucket}/private/bag.png"}),
            403,
            "uri_not_allowed",
        ),
        "a run that does not load": (
            lambda: client.post("/v1/classify", json={"image_b64": b64, "model": "broken"}),
            503,
            "model_unavailable",
        ),
        "a run whose checkpoint is corrupt": (
            lambda: client.post("/v1/embed", json={"image_b64": b64, "model": "corrupt"}),
            503,
            "model_unavailable",
        ),
        "a configured run that is missing": (
            lambda: client.post("/v1/classify", json={"image_b64": b64, "model": "missing"}),
            503,
            "model_unavailable",
        ),
        "an on-demand run that does not exist": (
            lambda: client.post("/v1/classify", json={"image_b64": b64, "model": "fm-none"}),
            404,
            "unknown_model",
        ),
        "unknown route": (lambda: client.get("/v1/nothing"), 404, "not_found"),
        "no api key": (
            lambda: client.post("/v1/classify", content=good, headers={**png, "authorization": ""}),
            401,
            "unauthorized",
        ),
        "wrong api key": (
            lambda: client.post(
                "/v1/classify", content=good, headers={**png, "authorization": "Bearer nope"}
            ),
            401,
            "unauthorized",
        ),
    }
    sizes = {}
    for what, (call, status, error) in bad.items():
        r = call()
        sizes[what] = len(r.content)
        assert r.status_code == status, (what, r.status_code, r.text)
        body = r.json()
        assert body["error"] == error and body["detail"], (what, body)
        assert_clean(r.text, server["root"])  # short; no frames, Ray reprs or paths
        assert API_KEY not in r.text and server["secret"] not in r.text, what
        if status == 503:
            assert r.headers["retry-after"] == "1", what
        if r.request.headers.get("content-type") == "application/json" and error in (
            "model_unavailable",
            "unknown_model",
        ):  # names the model asked for
            assert repr(json.loads(r.request.content)["model"]) in body["detail"], what
        ok = _classify(client, good)  # and the server keeps serving
        assert ok["labels"][0]["label"] == "Bag", (what, ok)
    longest = max(sizes, key=sizes.get)
    with capsys.disabled():
        print(f"\n[serve] {len(sizes)} error bodies, longest {sizes[longest]} B ({longest})")
    for uri in (f"file://{allowed}/bag.png", f"s3://{bucket}/images/bag.png"):
        r = client.post("/v1/classify", json={"uri": uri})
        assert r.status_code == 200 and r.json()["labels"][0]["label"] == "Bag", r.text
    # no key needed for liveness and the API docs
    import httpx

    assert httpx.get(server["url"] + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server["url"] + "/docs").status_code == 200
    paths = httpx.get(server["url"] + "/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/embed", "/v1/enroll", "/v1/embeddings", "/v1/classes"} <= set(
        paths
    )


@pytest.mark.timeout(120)
def test_responses_name_models_and_runs_not_locations(server, capsys):
    client, root = server["client"], str(server["root"])
    r = client.get("/v1/models")
    assert r.status_code == 200 and root not in r.text and "s3://" not in r.text, r.text
    models = {m["id"]: m for m in r.json()["models"]}
    assert models["fm"]["run"] == "fm" and models["missing"]["run"] == "fm-next"
    assert models["bb"] == {"id": "bb", "run": None, "backbone": "vgg_s8"}
    assert r.json()["on_demand"] is True
    r = client.get("/v1/classes", params={"model": "fm-metric"})
    assert r.status_code == 200 and r.json()["source"] in ("trained", "serving"), r.text
    assert root not in r.text
    r = client.get("/readyz")  # per model, each bad one in one clean line
    assert r.status_code == 503 and root not in r.text and not LEAKS.search(r.text), r.text
    assert [m for m, v in r.json()["models"].items() if v != "loaded"] == list(UNLOADABLE)
    with capsys.disabled():
        print(f"\n[serve] /readyz: {len(r.content)} B: {r.text}")


def test_overload_answers_429_with_retry_after(server):
    import httpx

    good = _png(sorted((server["root"] / "raw/test/Bag").glob("*.png"))[0])

    def one(_):
        with httpx.Client(base_url=server["url"], headers=HEADERS, timeout=60) as c:
            return c.post("/v1/classify", content=good, headers={"content-type": "image/png"})

    with cf.ThreadPoolExecutor(64) as pool:
        got = list(pool.map(one, range(192)))
    codes = [r.status_code for r in got]
    assert set(codes) <= {200, 429}, codes
    refused = [r for r in got if r.status_code == 429]
    assert refused, "no request was refused at max_inflight=12 with 64 clients"
    assert all(
        r.headers["retry-after"] == "1" and r.json()["error"] == "overloaded" for r in refused
    )
    assert codes.count(200) >= 12
    assert _classify(server["client"], good)["labels"][0]["label"] == "Bag"


@pytest.mark.faults
def test_killing_a_model_replica_under_load_recovers(server, capsys):
    import ray
    from ray import serve

    images = [r["image"] for r in _test_rows(server["ds"])[:40]]
    stop = threading.Event()
    log: list[tuple[float, int]] = []
    lock = threading.Lock()

    def client_loop(seed: int):
        import httpx

        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server["url"], headers=HEADERS, timeout=60) as c:
            while not stop.is_set():
                img = images[int(rng.integers(len(images)))]
                try:
                    code = c.post(
                        "/v1/classify", content=img, headers={"content-type": "image/png"}
                    ).status_code
                except Exception:
                    code = -1
                with lock:
                    log.append((time.time(), code))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    victim = next(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "#ModelServer#" in a["name"]
    )
    killed_at = time.time()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

    def running() -> int:
        dep = serve.status().applications["raylens"].deployments["ModelServer"]
        return dep.replica_states.get("RUNNING", 0)

    deadline = time.time() + 90
    while not (running() == 2 and time.time() - killed_at > 5):
        assert time.time() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    recovered_at = time.time()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    during = [c for ts, c in log if killed_at <= ts <= recovered_at]
    after = [c for ts, c in log if ts > recovered_at]
    errors = sum(c != 200 for c in during)
    rate = errors / max(len(during), 1)
    with capsys.disabled():
        print(
            f"\n[serve] replica killed under 4-client load: {errors}/{len(during)} requests "
            f"failed during recovery ({rate:.1%}), recovery {recovered_at - killed_at:.1f}s, "
            f"{len(after)} requests after, all ok: {all(c == 200 for c in after)}"
        )
    assert len(during) > 10 and after and all(c == 200 for c in after)
    assert rate <= 0.05, f"{errors}/{len(during)} failed during recovery"


def test_prometheus_metrics_count_requests_rejects_and_batches(server):
    """Ray's metrics endpoint on this node exports the app's counters next to Serve's."""
    import httpx
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    want = (
        "raylens_requests",
        "raylens_rejects",
        "raylens_request_latency_ms",
        "raylens_batch_size",
    )
    deadline = time.time() + 60
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in want):
            break
        assert time.time() < deadline, [w for w in want if w not in text]
        time.sleep(2)
    lines = text.splitlines()
    ok = [x for x in lines if x.startswith("ray_raylens_requests") and 'status="200"' in x]
    assert ok and sum(float(x.rsplit(" ", 1)[1]) for x in ok) > 300
    rejected = [x for x in lines if x.startswith("ray_raylens_rejects") and "uri_not_allowed" in x]
    assert rejected and float(rejected[0].rsplit(" ", 1)[1]) >= 2
    assert "ray_serve_num_http_requests" in text  # Serve's own metrics too


# ----------------------------------------------------------------------------- topologies


@pytest.fixture(scope="module")
def topologies(server):
    """The classifier alone, served one-hop (the model deployment is the ingress) and split
    (ingress → model deployment), side by side on the module's Serve instance."""
    import httpx
    from ray import serve

    from serve.app import make_app

    env = {"runtime_env": {"env_vars": {KEY_ENV: API_KEY}}}
    args = {
        "models": [{"id": "fm", "run": server["clf"]}],
        "api_key_env": KEY_ENV,
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.01},
        "limits": {"max_request_bytes": 8_000_000, "max_image_pixels": 15_000_000},
    }
    clients = {}
    for topology in ("one_hop", "split"):
        app = make_app(
            {**args, "topology": topology},
            model_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0, **env}},
            ingress_options={"ray_actor_options": {"num_cpus": 0, **env}},
        )
        serve.run(app, name=f"fm-{topology}", route_prefix=f"/{topology}")
        clients[topology] = httpx.Client(
            base_url=f"{server['url']}/{topology}", headers=HEADERS, timeout=60
        )
    deployments = {
        t: set(serve.status().applications[f"fm-{t}"].deployments) for t in ("one_hop", "split")
    }
    assert deployments == {
        "one_hop": {"ModelServer", "Prototypes"},
        "split": {"Ingress", "ModelServer", "Prototypes"},
    }
    yield clients
    for topology, client in clients.items():
        client.close()
        serve.delete(f"fm-{topology}")


def _same_answers(clients: dict, request) -> dict:
    """``request(client)`` through both topologies: the same status, headers that matter
    and body (scores and embeddings within 1e-6); the one-hop answer."""
    one, split = request(clients["one_hop"]), request(clients["split"])
    assert one.status_code == split.status_code, (one.text, split.text)
    assert one.headers.get("retry-after") == split.headers.get("retry-after")
    a, b = one.json(), split.json()
    _close(a, b)
    return {"status": one.status_code, "body": a}


def _close(a, b, where="body") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a, b)
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-6, (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_one_hop_and_split_answer_alike(topologies, server):
    rows = _test_rows(server["ds"])[:12]
    png = {"content-type": "image/png"}
    for row in rows:  # the same labels and probabilities (both batch: several at once)
        with cf.ThreadPoolExecutor(4) as pool:
            got = list(
                pool.map(
                    lambda c, img=row["image"]: c.post("/v1/classify", content=img, headers=png),
                    topologies.values(),
                )
            )
        assert [r.status_code for r in got] == [200, 200], [r.text for r in got]
        _close(got[0].json(), got[1].json())
    good = rows[0]["image"]
    b64 = base64.b64encode(good).decode()
    requests = {
        "classify top_k": lambda c: c.post(
            "/v1/classify", content=good, headers=png, params={"top_k": 3}
        ),
        "embed": lambda c: c.post("/v1/embed", json={"image_b64": b64, "normalize": True}),
        "embeddings": lambda c: c.post("/v1/embeddings", json={"input": [b64, b64]}),
        "models": lambda c: c.get("/v1/models"),
        "classes": lambda c: c.get("/v1/classes"),
        "readyz": lambda c: c.get("/readyz"),
        "healthz": lambda c: c.get("/healthz"),
        "no key": lambda c: c.post(
            "/v1/classify", content=good, headers={**png, "Authorization": "Bearer wrong"}
        ),
        "oversized body": lambda c: c.post("/v1/classify", content=b"\0" * 8_500_000, headers=png),
        "decompression bomb": lambda c: c.post("/v1/classify", content=_bomb(), headers=png),
        "non-image bytes": lambda c: c.post("/v1/classify", content=b"GIF89a-no", headers=png),
        "truncated png": lambda c: c.post(
            "/v1/classify", content=good[: len(good) // 2], headers=png
        ),
        "wrong content type": lambda c: c.post(
            "/v1/classify", content=good, headers={"content-type": "text/plain"}
        ),
        "bad top_k": lambda c: c.post(
            "/v1/classify", content=good, headers=png, params={"top_k": 0}
        ),
        "unknown model": lambda c: c.post("/v1/classify", json={"image_b64": b64, "model": "nope"}),
        "enroll on a classifier": lambda c: c.post(
            "/v1/enroll", json={"name": "x", "images": [{"image_b64": b64}]}
        ),
        "delete on a classifier": lambda c: c.delete("/v1/classes/Bag"),
        "unknown route": lambda c: c.get("/v1/nothing"),
        "wrong method": lambda c: c.get("/v1/classify"),
    }
    answers = {name: _same_answers(topologies, req) for name, req in requests.items()}
    statuses = {name: a["status"] for name, a in answers.items()}
    assert statuses == {
        "classify top_k": 200,
        "embed": 200,
        "embeddings": 200,
        "models": 200,
        "classes": 200,
        "readyz": 200,
        "healthz": 200,
        "no key": 401,
        "oversized body": 413,
        "decompression bomb": 413,
        "non-image bytes": 415,
        "truncated png": 415,
        "wrong content type": 415,
        "bad top_k": 422,
        "unknown model": 404,
        "enroll on a classifier": statuses["enroll on a classifier"],
        "delete on a classifier": statuses["delete on a classifier"],
        "unknown route": 404,
        "wrong method": 405,
    }
    assert 400 <= statuses["enroll on a classifier"] < 500
    assert 400 <= statuses["delete on a classifier"] < 500
    one, split = (c.get("/openapi.json").json() for c in topologies.values())
    assert one["paths"] == split["paths"]


def test_a_12_mp_upload_classifies_as_its_small_original(topologies, server):
    """A Fashion-MNIST test image upscaled to 12 MP (JPEG) gets the label the 28 px original
    gets, through both topologies (decoded at reduced scale: see test_serving), and both
    topologies give it the same probabilities.

    The label is compared where the model is sure of the original (top-1 score at least
    0.3 above the second): upscaling, JPEG and the reduced decode move the pixels a little
    (test_serving bounds how much), which can flip a near-tie of the test's small model.
    """
    sure = []
    for row in _test_rows(server["ds"])[:40]:
        top = _classify(topologies["one_hop"], row["image"])["labels"]
        if top[0]["score"] - top[1]["score"] >= 0.3:
            sure.append((row, top[0]["label"]))
    assert len(sure) >= 4, f"the test model is sure of only {len(sure)} of 40 test images"
    for row, want in sure[:6]:
        small = Image.open(io.BytesIO(row["image"])).convert("RGB")
        buf = io.BytesIO()
        small.resize((3464, 3464), Image.BICUBIC).save(buf, "JPEG", quality=90)
        answers = []
        for client in topologies.values():
            t0 = time.perf_counter()
            r = client.post(
                "/v1/classify", content=buf.getvalue(), headers={"content-type": "image/jpeg"}
            )
            assert r.status_code == 200, r.text
            assert r.json()["labels"][0]["label"] == want
            assert time.perf_counter() - t0 < 10
            answers.append(r.json()["labels"])
        for a, b in zip(*answers, strict=True):
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) <= 1e-6
