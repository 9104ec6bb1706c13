"""Metric learning: fusion/gating heads, ProxyAnchor's proxy LR, NCM and retrieval metrics
against brute force, the feature cache (reuse and invalidation), bad input, and a whole run
(held-out classes) on the shared local Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from raylens import config as C
from raylens.infer.features import ensure_cache, load_features, plan_cache
from raylens.loop import build_optimizer
from raylens.models.backbones import UnknownBackbone
from raylens.models.fusion import FUSION_SIZES, FusionModel, GatingHead, fusion_sizes
from raylens.schema import RunConfig
from raylens.storage import Storage, join
from raylens.tasks.metric import (
    ProxyAnchorCriterion,
    class_prototypes,
    ncm_topk,
    retrieval_metrics,
)
from raylens.train.metric import build_fusion, metric_learn, prepare_data

from tests.imagegen import class_image
from tests.sourcegen import prepare_quiet

COLOURS = ["red", "green", "blue", "yellow", "purple", "black"]  # imagegen.PALETTE order


# ----------------------------------------------------------------------------- pure


def test_gating_head_weights_are_in_0_1_with_the_input_shape():
    torch.manual_seed(0)
    gate = GatingHead(48, hidden=32)
    w = gate(torch.randn(7, 48) * 5)
    assert w.shape == (7, 48) and bool((w > 0).all()) and bool((w < 1).all())
    model = FusionModel([16, 32], embedding_dim=24, hidden=[40], gate=True, gate_hidden=32)
    model.eval()
    x = torch.randn(5, 48)
    gw = model.gate_weights(x)
    gw = gw.detach()
    assert gw.shape == x.shape and float(gw.min()) > 0 and float(gw.max()) < 1
    e = model(x)
    assert e.shape == (5, 24)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    # the gate really multiplies the features: the head sees x * gate(x)
    torch.testing.assert_close(e, F.normalize(model.head(x * gw), dim=1))
    with pytest.raises(ValueError, match="expects 48 features"):
        model(torch.randn(2, 40))


@pytest.mark.parametrize("name", ["minimal", "medium", "deep"])
def test_fusion_head_sizes(name):
    model = FusionModel([100, 28], embedding_dim=512, hidden=name, dropout=0.3)
    linears = [m for m in model.head.net if isinstance(m, torch.nn.Linear)]
    widths = [(m.in_features, m.out_features) for m in linears]
    hidden = list(FUSION_SIZES[name])
    assert widths == list(zip([128, *hidden], [*hidden, 512], strict=True))
    assert hidden[:2] == [1024, 512] if name == "minimal" else hidden[-1] == 512
    norms = [m for m in model.head.net if isinstance(m, torch.nn.BatchNorm1d)]
    drops = [m for m in model.head.net if isinstance(m, torch.nn.Dropout)]
    assert len(norms) == len(drops) == len(hidden) and all(d.p == 0.3 for d in drops)
    assert fusion_sizes([64, 32]) == (64, 32)
    with pytest.raises(ValueError, match="unknown fusion head 'huge'"):
        fusion_sizes("huge")


def test_proxies_get_their_own_learning_rate_and_are_updated():
    cfg = C.load(
        RunConfig,
        None,
        [
            "task.name=metric",
            "train.lr=0.002",
            "train.weight_decay=0",
            "metric.proxy_lr_mult=50",
            "metric.fusion_hidden=[32]",
            "metric.embedding_dim=16",
        ],
    )
    torch.manual_seed(0)
    model = build_fusion(cfg, [8, 8], num_classes=4)
    opt = build_optimizer(model, cfg.train)
    proxies = model.criterion.proxies
    groups = [g for g in opt.param_groups if any(p is proxies for p in g["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(0.1)
    assert groups[0]["params"] == [proxies]  # nothing else at 50x
    others = [g for g in opt.param_groups if g is not groups[0]]
    assert others and all(g["lr"] == pytest.approx(0.002) for g in others)
    # one Adam step moves the proxies by ~their LR and the model weights by ~the base LR
    before_p = proxies.detach().clone()
    w = model.head.net[0].weight
    before_w = w.detach().clone()
    x, y = torch.randn(32, 16), torch.arange(32) % 4
    model.criterion(model(x), y).backward()
    opt.step()
    dp = (proxies.detach() - before_p).abs().max().item()
    dw = (w.detach() - before_w).abs().max().item()
    assert dp == pytest.approx(0.1, rel=0.05) and dw == pytest.approx(0.002, rel=0.05)
    assert proxies.dtype == torch.float32


def test_proxy_anchor_stays_float32_under_cpu_autocast():
    crit = ProxyAnchorCriterion(3, 8)
    emb = torch.randn(12, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(emb @ torch.eye(8), torch.arange(12) % 3)
    assert loss.dtype == torch.float32 and crit.proxies.dtype == torch.float32
    loss.backward()
    assert crit.proxies.grad is not None and crit.proxies.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown miner"):
        ProxyAnchorCriterion(3, 8, miner="hardest")
    mined = ProxyAnchorCriterion(3, 8, miner="multi_similarity")
    assert torch.isfinite(mined(torch.randn(12, 8), torch.arange(12) % 3))


def test_ncm_equals_brute_force_nearest_mean():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(60, 6, generator=g)
    labels = torch.arange(60) % 5
    queries = torch.randn(25, 6, generator=g)
    protos = class_prototypes(train, labels, 5)
    top = ncm_topk(protos, queries, k=3)
    unit = [t / t.norm() for t in train]
    for q, row in zip(queries, top, strict=True):
        sims = []
        for c in range(5):
            mean = sum(u for u, y in zip(unit, labels, strict=True) if y == c) / 12
            sims.append(float(torch.dot(q / q.norm(), mean / mean.norm())))
        assert row.tolist() == sorted(range(5), key=lambda c: -sims[c])[:3]
    with pytest.raises(ValueError, match=r"class\(es\) \[5\] have no training"):
        class_prototypes(train, labels, 6)


def test_retrieval_metrics_equal_brute_force():
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(90) % 6
    emb = torch.randn(90, 8, generator=g) + 1.5 * F.one_hot(labels, 8).float()
    got = retrieval_metrics(emb, labels)
    unit = F.normalize(emb, dim=1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-float("inf"))
    order = sim.argsort(dim=1, descending=True)
    same = labels[order] == labels[:, None]
    for k in (1, 2, 4, 8):
        assert got[f"recall_at_{k}"] == pytest.approx(same[:, :k].any(1).float().mean().item())
    r = 14  # 15 per class, minus the query itself
    ap = [
        sum(same[i, : j + 1].sum().item() / (j + 1) for j in range(r) if same[i, j]) / r
        for i in range(90)
    ]
    assert got["map_at_r"] == pytest.approx(float(np.mean(ap)), abs=1e-6)
    assert got["precision_at_1"] == pytest.approx(got["recall_at_1"])


# ----------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 colour classes, explicit splits: train 12, val 4, test 4 images per class."""
    root = tmp_path_factory.mktemp("metric")
    storage = Storage()
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        for c, name in enumerate(COLOURS):
            for i in range(n):
                rel = f"raw/{split}/{name}/{i:03d}.png"
                storage.write_bytes(str(root / rel), class_image(c, hash((split, i)) % 10_000))
    prepare_quiet(storage, str(root / "raw"), str(root / "ds"))
    return root


def _cfg(root, *extra) -> RunConfig:
    return C.load(
        RunConfig,
        None,
        [
            f"data.dataset={root / 'ds'}",
            f"metric.cache={root / 'cache'}",
            f"run.output_dir={root / 'runs'}",
            "run.name=metric",
            "task.name=metric",
            "metric.backbones=[vgg_s8, vgg_s16]",
            "metric.train_classes=[red, green, blue, yellow]",
            "metric.fusion_hidden=[64]",
            "metric.embedding_dim=32",
            "data.batch_size=16",
            "train.epochs=3",
            "train.lr=0.01",
            "ray.num_workers=1",
            *extra,
        ],
    )


@pytest.mark.ray
def test_feature_cache_is_reused_and_recomputed_when_a_backbone_changes(ray_session, dataset):
    storage = Storage()
    cfg = _cfg(dataset, "metric.cache=" + str(dataset / "cache-inval"))
    first = ensure_cache(cfg, storage)
    assert [e.hit for e in first] == [False, False]
    table = load_features(first, storage)
    assert table.dims == [32, 64] and len(table.ids) == 6 * 20
    assert sorted(set(table.split)) == ["test", "train", "val"]
    again = ensure_cache(cfg, storage)
    assert [e.hit for e in again] == [True, True] and [e.uri for e in again] == [
        e.uri for e in first
    ]
    # the same backbone initialized from another seed is another backbone: recomputed
    other_seed = plan_cache(C.apply_overrides(cfg, ["run.seed=1"]), storage)
    assert [e.hit for e in other_seed] == [False, False]
    assert {e.key for e in other_seed}.isdisjoint({e.key for e in first})
    # other preprocessing (every backbone fed 40 px): recomputed, at that size
    resized = plan_cache(C.apply_overrides(cfg, ["metric.image_size=40"]), storage)
    assert [e.hit for e in resized] == [False, False]
    assert {e.plan.model.data.image_size for e in resized} == {40}
    # a backbone swapped for another: only that one is recomputed
    swapped = plan_cache(C.apply_overrides(cfg, ["metric.backbones=[vgg_s8, vgg_s32]"]), storage)
    assert [e.hit for e in swapped] == [True, False]
    # weights changed under the same name (a weights file rewritten): recomputed
    from raylens.models.backbones import create_backbone
    from safetensors.torch import save_file

    wfile = dataset / "w8.safetensors"
    torch.manual_seed(3)
    save_file(create_backbone("vgg_s8").net.state_dict(), str(wfile))
    with_w = C.apply_overrides(cfg, [f"metric.backbones=[vgg_s8@{wfile}]"])
    ensure_cache(with_w, storage)
    assert [e.hit for e in plan_cache(with_w, storage)] == [True]
    size = wfile.stat().st_size
    torch.manual_seed(4)  # other values, same size: still recomputed
    save_file(create_backbone("vgg_s8").net.state_dict(), str(wfile))
    assert wfile.stat().st_size == size
    assert [e.hit for e in plan_cache(with_w, storage)] == [False]


@pytest.mark.ray
def test_bad_input_fails_naming_the_problem(ray_session, dataset, tmp_path):
    storage = Storage()
    with pytest.raises(UnknownBackbone, match="unknown backbone 'vgg_s7'"):
        plan_cache(_cfg(dataset, "metric.backbones=[vgg_s8, vgg_s7]"), storage)
    with pytest.raises(ValueError, match=r"metric.train_classes.*unknown class\(es\) \['cyan'\]"):
        metric_learn(_cfg(dataset, "metric.train_classes=[red, cyan]"))
    with pytest.raises(ValueError, match=r"'train.best_metric': 'recall_at_3'.*'map_at_r'"):
        metric_learn(_cfg(dataset, "train.best_metric=recall_at_3"))
    cfg = _cfg(dataset, "metric.cache=" + str(dataset / "cache-bad"))
    entries = ensure_cache(cfg, storage)
    table = load_features(entries, storage)
    # a class with a single validation image: retrieval can't score it
    val_green = np.nonzero((table.split == "val") & (table.label == table.classes.index("green")))[
        0
    ]
    table.split[val_green[1:]] = "gone"
    with pytest.raises(ValueError, match=r"split 'val'.*\['green'\] have a single image"):
        prepare_data(cfg, table)
    # a cache whose embeddings don't have the size its backbone declares
    bad = entries[1].uri
    part = next(f.uri for f in storage.list_files(bad) if f.uri.endswith(".parquet"))
    t = pq.read_table(part)
    import pyarrow as pa

    emb = t.column("embedding").combine_chunks()
    short = pa.FixedSizeListArray.from_arrays(
        pa.array(emb.values.to_numpy().reshape(-1, 64)[:, :60].reshape(-1)), 60
    )
    pq.write_table(t.set_column(t.schema.get_field_index("embedding"), "embedding", short), part)
    with pytest.raises(ValueError, match="'vgg_s16' has embedding size 60, expected 64"):
        load_features(entries, storage)


@pytest.mark.ray
def test_metric_run_trains_and_writes_prototypes_projection_and_metrics(ray_session, dataset):
    cache = "metric.cache=" + str(dataset / "cache-run")
    out = metric_learn(
        _cfg(
            dataset,
            cache,
            "metric.gate=true",
            "metric.miner=multi_similarity",
            "ray.num_workers=2",  # DDP: the proxies (used outside forward) sync too
        )
    )
    storage = Storage()
    run = out["run_dir"]
    assert [c["hit"] for c in out["cache"]] == [False, False]  # this cache dir is new
    labels = json.loads(storage.read_text(join(run, "labels.json")))
    assert labels["classes"] == COLOURS[:4] and labels["held_out"] == [
        "black",
        "purple",
    ]  # dataset order
    best = out["best"]
    assert best and "val/recall_at_1" in best["metrics"]
    rows = [json.loads(x) for x in storage.read_text(join(run, "metrics.jsonl")).splitlines()]
    assert [r["epoch"] for r in rows if r["epoch_end"]] == [1, 2, 3]
    test = out["test"]
    seen, held = test["seen_test"], test["heldout_test"]
    assert seen["count"] == 16 and held["count"] == 8
    # colour classes are trivially separable: NCM must be (near) perfect on seen classes
    assert seen["ncm_top1"] >= 0.9 and seen["ncm_top3"] == 1.0
    assert 0 <= held["recall_at_1"] <= held["recall_at_2"] <= held["recall_at_4"] <= 1
    metrics = json.loads(storage.read_text(join(run, "test_metrics.json")))
    assert metrics["raw_fused_features"]["heldout_test"]["count"] == 8
    protos = pq.read_table(join(run, "prototypes.parquet")).to_pylist()
    assert sorted(p["class"] for p in protos) == sorted(COLOURS)
    assert {p["class"] for p in protos if p["seen"]} == set(COLOURS[:4])
    assert all(p["count"] == 12 for p in protos)
    e = np.array([p["embedding"] for p in protos])
    assert e.shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    png = (dataset / "runs" / "metric" / "report" / "embedding_projection.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    report = storage.read_text(out["report"])
    assert "embedding_projection.png" in report and "heldout_test (trained)" in report
    # second run with the same caches: reused, not recomputed
    again = metric_learn(_cfg(dataset, cache, "run.name=metric-2", "train.epochs=1"))
    assert [c["hit"] for c in again["cache"]] == [True, True]
    # the embed job with the metric run: one row per image (all classes, all splits), its
    # metadata, and embeddings equal to the fusion model over the cached features
    from raylens.checkpoint import load_checkpoint
    from raylens.models.fusion import embed_all

    import jobs.embed as embed_job

    emb_out = str(dataset / "emb-metric")
    manifest = embed_job.main(
        [f"data.dataset={dataset / 'ds'}", f"embed.model={run}", f"embed.output={emb_out}"]
    )
    assert manifest["rows"] == 120 and manifest["dim"] == 32 and manifest["normalize"]
    got = pq.read_table(emb_out).to_pylist()
    assert len({r["id"] for r in got}) == 120 and {"width", "height", "source"} <= set(got[0])
    cfg = C.load(RunConfig, storage.read_text(join(run, "config.yaml")))  # gate, miner, ...
    table = load_features(plan_cache(cfg, storage), storage)
    model = build_fusion(cfg, table.dims, 4)
    ck = load_checkpoint(storage, join(run, best["checkpoint"]), with_optimizer=False)
    model.load_state_dict(ck["model"])
    from raylens.models.fusion import l2_concat

    x = l2_concat([torch.from_numpy(b) for b in table.blocks])
    want = dict(zip(table.ids, embed_all(model, x.numpy()).numpy(), strict=True))
    for r in got:
        np.testing.assert_allclose(r["embedding"], want[r["id"]], atol=1e-5)
    with pytest.raises(SystemExit):  # a metric run has no classifier head: refused
        embed_job.main(
            [
                f"data.dataset={dataset / 'ds'}",
                f"embed.model={run}",
                f"embed.output={emb_out}",
                "embed.include_logits=true",
            ]
        )


@pytest.mark.ray
def test_data_classes_selects_a_class_subset_relabelled(ray_session, dataset):
    from raylens.runtime.ingest import build_split

    cfg = C.load(
        RunConfig,
        None,
        [
            f"data.dataset={dataset / 'ds'}",
            "data.image_size=16",
            "data.eval_crop_pct=1.0",
            "data.classes=[green, red]",
        ],
    )
    ds, info = build_split(cfg, "train", Storage(), train=False)
    assert info.classes == ["green", "red"] and info.num_rows["train"] == 24
    assert info.num_rows["val"] == info.num_rows["test"] == 8
    rows = ds.take_all()
    assert len(rows) == 24 and sorted({int(r["label"]) for r in rows}) == [0, 1]
    for r in rows:  # green images are label 0, red ones label 1 (imagegen's palette)
        rgb = np.asarray(r["image"], dtype=np.float32).reshape(3, -1).mean(1)
        assert int(rgb.argmax()) == (1 if int(r["label"]) == 0 else 0), (r["id"], rgb)
    with pytest.raises(ValueError, match=r"data.classes': unknown class\(es\) \['cyan'\]"):
        build_split(C.apply_overrides(cfg, ["data.classes=[cyan]"]), "train", Storage())
