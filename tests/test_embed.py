"""Embeddings: one row per input image with its metadata, embeddings equal to the model's own
forward on the same preprocessed images, atomic and idempotent re-runs (also on real S3),
and bad models refused before any Ray work."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from raylens import config as C
from raylens.checkpoint import save_checkpoint
from raylens.data.images import decode_rgb
from raylens.data.transforms import ImageTransform
from raylens.infer.embed import MANIFEST, WRITER, NotCommitted, commit, embed, load_manifest
from raylens.models.backbones import UnknownBackbone, create_backbone
from raylens.models.classifier import build_model
from raylens.predict import Predictor, resolve_model
from raylens.schema import RunConfig
from raylens.storage import Storage, join

import jobs.embed as job
from tests.sourcegen import prepare_quiet, read_prepared, write_manifest
from tests.stores import s3_storage

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def make_run(storage: Storage, run: str, task: str = "single_label") -> None:
    """A tiny run dir as jobs.finetune leaves it: vgg_s16 at 16 px, two checkpoints, best = 2."""
    cfg = C.load(
        RunConfig,
        None,
        ["run.name=tiny", "model.backbone=vgg_s16", "data.image_size=16"]
        + [f"data.mean={list(MEAN)}", f"data.std={list(STD)}", "data.eval_crop_pct=0.875"],
    )
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        model = build_model(cfg.model, 3)
        for m in model.modules():  # non-trivial BatchNorm statistics, as after training
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        save_checkpoint(
            storage, join(run, f"checkpoints/epoch={epoch}"), model=model.state_dict(), extra={}
        )
    storage.write_text(join(run, "config.yaml"), C.to_yaml(cfg))
    labels = {"classes": ["cat", "dog", "eel"], "task": task}
    storage.write_text(join(run, "labels.json"), json.dumps(labels))
    best = {"epoch": 2, "checkpoint": "checkpoints/epoch=2", "metrics": {}}
    storage.write_text(join(run, "best.json"), json.dumps(best))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    storage = Storage()
    manifest, truth = write_manifest(storage, str(root / "raw"), "parquet")
    prepare_quiet(storage, manifest, str(root / "ds"))
    make_run(storage, str(root / "run"))
    card, rows = read_prepared(storage, str(root / "ds"))
    return {
        "root": root,
        "manifest": manifest,  # the raw source: images + lat/lon/location_id
        "truth": truth,  # {path: (labels, metadata)}
        "ds": str(root / "ds"),
        "card": card,
        "rows": {r["id"]: r for r in rows},  # the prepared rows, image bytes included
        "run": str(root / "run"),
    }


def reference(run: str, images: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The run's checkpoint forward, fp32, without raylens.predict: (features, logits)."""
    from raylens.checkpoint import load_checkpoint

    cfg = C.load(RunConfig, Storage().read_text(join(run, "config.yaml")))
    model = build_model(cfg.model, 3)
    model.load_state_dict(load_checkpoint(Storage(), join(run, "checkpoints/epoch=2"))["model"])
    return forward(model, ImageTransform.from_config(cfg.data, train=False), images, MEAN, STD)


def forward(model, transform, images, mean, std) -> tuple[np.ndarray, np.ndarray | None]:
    model.eval()
    x = torch.from_numpy(np.stack([transform(decode_rgb(b)) for b in images])).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        if hasattr(model, "head"):
            feats = model.features(x)
            return feats.numpy(), model.head(feats).numpy()
        return model(x).numpy(), None


def cfg_for(dataset: str, output: str, *extra: str) -> RunConfig:
    return C.load(RunConfig, None, [f"data.dataset={dataset}", f"embed.output={output}", *extra])


# ----------------------------------------------------------------------------- no Ray


def test_predictor_loads_the_best_checkpoint_with_its_eval_transform(data):
    pred = Predictor.load(data["run"])
    assert pred.classes == ["cat", "dog", "eel"] and not pred.multi_label
    assert (pred.data.image_size, pred.data.mean, pred.data.std) == (16, MEAN, STD)
    assert pred.source.checkpoint.endswith("checkpoints/epoch=2") and pred.dim == 64
    ids = sorted(data["rows"])[:6]
    images = [data["rows"][i]["image"] for i in ids]
    pixels, kept, failures = pred.preprocess(images)
    assert pixels.shape == (6, 3, 16, 16) and len(kept) == 6 and not failures
    feats, logits = pred.embed_and_logits(pred.normalize(torch.from_numpy(pixels)))
    ref_feats, ref_logits = reference(data["run"], images)
    np.testing.assert_allclose(feats.numpy(), ref_feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits.numpy(), ref_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.probs(logits).sum(1).numpy(), 1.0, atol=1e-6)
    # another checkpoint of the same run gives other features
    other = Predictor.load(data["run"], checkpoint="checkpoints/epoch=1")
    assert not torch.allclose(other.embed(pred.normalize(torch.from_numpy(pixels))), feats)


def test_multi_label_run_probs_are_sigmoids_and_backbones_have_no_logits(data, tmp_path):
    make_run(Storage(), str(tmp_path / "ml"), task="multi_label")
    pred = Predictor.load(str(tmp_path / "ml"))
    z = torch.tensor([[0.0, 2.0, -2.0]])
    assert pred.multi_label and torch.allclose(pred.probs(z), torch.sigmoid(z))
    bare = Predictor.load("vgg_s16")
    assert bare.classes == [] and bare.dim == 64 and bare.data.image_size == 28
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(bare.embed(x), Predictor.load("vgg_s16").embed(x))  # seeded init
    with pytest.raises(ValueError, match="bare backbone"):
        bare.logits(x)


def test_bad_models_are_refused_naming_the_problem(data, tmp_path):
    with pytest.raises(UnknownBackbone, match="unknown backbone 'vgg_s17'"):
        resolve_model("vgg_s17")
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        resolve_model(str(tmp_path / "no-such-run"))
    run = str(tmp_path / "unfinished")
    make_run(Storage(), run)
    Storage().delete(join(run, "best.json"))
    with pytest.raises(FileNotFoundError, match="embed.checkpoint=checkpoints/epoch=N"):
        resolve_model(run)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_model(run, checkpoint="checkpoints/epoch=7")


@pytest.mark.parametrize(
    "args, message",
    [
        (["embed.model=/no/such/run"], "run dir '/no/such/run': no config.yaml"),
        (["embed.model=resnet_nope_9"], "unknown backbone 'resnet_nope_9'"),
        (["embed.model=vgg_s16", "embed.include_logits=true"], "is a bare backbone"),
        (["embed.model=vgg_s16", "model.pretrained=true"], "vgg_s16 has no hub weights"),
        (["embed.model=vgg_s16", "embed.output=DS/emb"], "inside) a prepared dataset"),
        (["embed.model=vgg_s16", "embed.splits=[train, dev]"], "unknown split(s) ['dev']"),
    ],
)
def test_job_refuses_bad_input_before_any_ray_work(
    data, tmp_path, monkeypatch, capsys, args, message
):
    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a bad config")

    monkeypatch.setattr(job, "init_ray", no_ray)
    argv = [f"data.dataset={data['ds']}", f"embed.output={tmp_path / 'out'}"]
    with pytest.raises(SystemExit) as exit_:
        job.main(argv + [a.replace("DS", data["ds"]) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_superseded_run_commits_nothing_and_leaves_the_output_as_it_was(tmp_path):
    storage, out = Storage(), str(tmp_path / "emb")
    pq.write_table(pa.table({"id": ["a", "b"]}), str(tmp_path / "part-new.parquet"))
    first = commit(storage, out, [str(tmp_path / "part-new.parquet")], {"rows": 2})
    assert first["files"] == ["part-00000.parquet"] and not storage.exists(join(out, WRITER))
    storage.write_text(join(out, WRITER), json.dumps({"run": "later"}))
    pq.write_table(pa.table({"id": ["c"]}), str(tmp_path / "stale.parquet"))
    with pytest.raises(NotCommitted, match="run later"):
        commit(storage, out, [str(tmp_path / "stale.parquet")], {"rows": 1}, writer="mine")
    assert load_manifest(storage, out) == first
    assert pd.read_parquet(out)["id"].tolist() == ["a", "b"]


# ----------------------------------------------------------------------------- Ray


def read_output(storage: Storage, output: str) -> pa.Table:
    fs, path = storage.resolve(output)
    return pq.read_table(path, filesystem=fs)


@pytest.mark.ray
def test_run_dir_embeddings_match_its_forward_and_reruns_replace_the_output(
    ray_session, data, tmp_path
):
    out = str(tmp_path / "emb")
    args = [f"embed.model={data['run']}", "embed.batch_size=7", "embed.include_logits=true"]
    manifest = embed(cfg_for(data["ds"], out, *args))
    table = read_output(Storage(), out)
    rows = data["rows"]
    # one row per input image, all three splits, ids equal to the dataset's
    assert table.num_rows == len(rows) == manifest["rows"] == 24
    assert sorted(table.column("id").to_pylist()) == sorted(rows)
    assert manifest["rows_per_split"] == {
        s: data["card"]["splits"][s]["count"] for s in ("train", "val", "test")
    }
    schema = table.schema
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert schema.field("logits").type == schema.field("probs").type == pa.list_(pa.float32(), 3)
    assert schema.field("lat").type == pa.float64() and schema.field("label").type == pa.int32()
    assert schema.field("location_id").type == pa.string()
    # metadata and labels carried through with their values
    got = {r["id"]: r for r in table.to_pylist()}
    for rid, row in rows.items():
        for key in ("split", "source", "label", "lat", "lon", "location_id", "width", "height"):
            assert got[rid][key] == row[key], (rid, key)
    # embeddings and logits equal the checkpoint's own forward on the same images (fp32)
    ids = sorted(rows)
    feats, logits = reference(data["run"], [rows[i]["image"] for i in ids])
    emb = np.array([got[i]["embedding"] for i in ids], dtype=np.float32)
    np.testing.assert_allclose(emb, feats, rtol=1e-5, atol=1e-6)
    z = np.array([got[i]["logits"] for i in ids], dtype=np.float32)
    np.testing.assert_allclose(z, logits, rtol=1e-5, atol=1e-6)
    probs = np.array([got[i]["probs"] for i in ids])
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(z), 1).numpy(), atol=1e-6)
    assert manifest["model"] == join(data["run"], "checkpoints/epoch=2")
    assert manifest["dim"] == 64 and manifest["normalize"] is False
    assert manifest["dataset_fingerprint"] == data["card"]["fingerprint"]
    assert load_manifest(Storage(), out)["files"] == manifest["files"]

    # re-run over a stale part file, a crashed run's staging dir and an unrelated file:
    # the output is replaced, never appended to
    (tmp_path / "emb" / "part-00042.parquet").write_bytes(
        (tmp_path / "emb" / manifest["files"][0]).read_bytes()
    )
    (tmp_path / "emb" / "_staging-crashed").mkdir()
    (tmp_path / "emb" / "_staging-crashed" / "x.parquet").write_bytes(b"half a file")
    again = embed(
        cfg_for(
            data["ds"],
            out,
            f"embed.model={data['run']}",
            "embed.normalize=true",
            "embed.splits=[train, test]",
        )
    )
    names = sorted(p.name for p in (tmp_path / "emb").iterdir())
    assert names == sorted(again["files"] + [MANIFEST])
    df = pd.read_parquet(out)
    want = sorted(i for i, r in rows.items() if r["split"] in ("train", "test"))
    assert sorted(df["id"]) == want and df["id"].is_unique
    assert "logits" not in df.columns and again["normalize"] is True
    norms = np.linalg.norm(np.stack(df["embedding"].to_numpy()), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    by_id = dict(zip(df["id"], df["embedding"], strict=True))
    np.testing.assert_allclose(
        np.stack([by_id[i] for i in want]), unit[[ids.index(i) for i in want]], atol=1e-6
    )


@pytest.mark.ray
def test_raw_manifest_with_a_backbone_to_s3_via_the_job(ray_session, seaweed, data, capsys):
    bucket = f"emb-{uuid.uuid4().hex[:8]}"
    seaweed.create_bucket(bucket)
    storage = s3_storage(seaweed)
    raw = data["root"] / "raw"
    (raw / "img" / "005.png").write_bytes(b"not a png")  # listed by the manifest, undecodable
    out = f"s3://{bucket}/emb/fm"
    argv = [
        f"data.dataset={data['manifest']}",
        "embed.model=vgg_s16",
        f"embed.output={out}",
        "embed.rows_per_file=10",
        f"storage.s3_endpoint_url={seaweed.endpoint_url}",
        f"storage.s3_access_key_id={seaweed.access_key}",
        f"storage.s3_secret_access_key={seaweed.secret_key}",
    ]
    first = job.main(argv)
    assert len(first["files"]) == 3 and first["dropped"] == ["img/005.png"]
    # the same output rewritten with fewer, larger files: the old extra files are deleted
    manifest = job.main(argv[:3] + ["embed.rows_per_file=1000"] + argv[4:])
    assert "embeddings: s3://" in capsys.readouterr().out
    assert len(manifest["files"]) == 1 and manifest["model"] == "backbone:vgg_s16"
    listed = sorted(f.uri.rsplit("/", 1)[-1] for f in storage.list_files(out))
    assert listed == [MANIFEST, "part-00000.parquet"]
    table = read_output(storage, out)
    truth = data["truth"]  # {path: (labels, meta)} of the 24 labelled images
    assert sorted(table.column("id").to_pylist()) == sorted(set(truth) - {"img/005.png"})
    assert manifest["rows"] == 23 and manifest["dropped"] == ["img/005.png"]
    got = {r["id"]: r for r in table.to_pylist()}
    for rid, row in got.items():
        assert (row["lat"], row["lon"], row["location_id"]) == tuple(truth[rid][1].values())
        assert row["source"] == str(raw / rid)
    # a bare backbone: seeded init (run.seed), its own preprocessing (28 px, Fashion-MNIST stats)
    torch.manual_seed(0)
    backbone = create_backbone("vgg_s16")
    pre = backbone.preprocess
    ids = sorted(got)
    feats, _ = forward(
        backbone,
        ImageTransform(pre.size, train=False, crop_pct=pre.crop_pct),
        [(raw / i).read_bytes() for i in ids],
        pre.mean,
        pre.std,
    )
    emb = np.array([got[i]["embedding"] for i in ids], dtype=np.float32)
    np.testing.assert_allclose(emb, feats, rtol=1e-5, atol=1e-6)
    assert json.loads(storage.read_text(join(out, MANIFEST)))["files"] == ["part-00000.parquet"]
