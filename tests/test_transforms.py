"""Transforms: seeded replay, eval determinism, shapes, normalization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from raylens.data.images import decode_rgb
from raylens.data.transforms import (
    ImageTransform,
    decode_and_transform,
    normalize,
    rrc_box,
    sample_seed,
)

from tests.imagegen import class_image


def test_train_augmentation_replays_exactly_from_its_seed():
    img = decode_rgb(class_image(1, 3, size=48))
    tf = ImageTransform(size=32, train=True, scale=(0.2, 1.0))
    seed = sample_seed(7, "img-3", epoch=2)
    a, b = tf(img, seed), tf(img, seed)
    assert a.shape == (3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    others = [tf(img, sample_seed(7, "img-3", epoch=e)) for e in range(5)]
    assert sum(not np.array_equal(a, o) for o in others) >= 4


def test_seeds_are_stable_and_distinct():
    assert sample_seed(0, "a", 0) == sample_seed(0, "a", 0)
    seeds = {sample_seed(s, i, e) for s in range(2) for i in "abc" for e in range(3)}
    assert len(seeds) == 18 and all(0 <= s < 2**32 for s in seeds)


def test_eval_transform_resizes_short_side_then_center_crops():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 40:] = 255  # right half white
    from PIL import Image

    out = ImageTransform(size=20, train=False, crop_pct=1.0)(Image.fromarray(arr))
    assert out.shape == (3, 20, 20)
    # resized to 20x40 then centre 20x20 crop: left half black, right half white
    assert out[:, :, :9].max() == 0 and out[:, :, 11:].min() == 255


def test_rrc_box_stays_inside_and_respects_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = rrc_box(rng, 50, 30, (0.3, 1.0), (0.75, 1.333))
        assert 0 <= left and left + w <= 50 and 0 <= top and top + h <= 30
        assert w * h >= 0.3 * 1500 * 0.8


def test_decode_and_transform_drops_bad_rows_and_reports_them():
    images = [class_image(0, 0), b"garbage", class_image(2, 1), b""]
    pixels, kept, failures = decode_and_transform(images, ImageTransform(16, train=False), None)
    assert pixels.shape == (2, 3, 16, 16)
    assert kept.tolist() == [0, 2]
    assert [i for i, _ in failures] == [1, 3]
    assert failures[0][1].startswith("undecodable") and failures[1][1].startswith("zero_bytes")


def test_normalize_uses_mean_and_std():
    pixels = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(pixels, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == pytest.approx([2.0, 1.0, 0.5])


def test_in_place_normalize_is_bit_identical_to_the_old_formula():
    """The in-place normalization (one float32 tensor, sub_/div_) equals the allocating
    ``(pixels.float() - mean) / std`` exactly (tolerance 0, not 1 ulp), also laid out
    channels_last, and so does TorchCollate's image column."""
    import torch
    from raylens import config as C
    from raylens.runtime.ingest import TorchCollate
    from raylens.schema import RunConfig

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = C.load(RunConfig, None, [f"data.mean={list(mean)}", f"data.std={list(std)}"])
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    rng = np.random.default_rng(0)
    for shape in [(64, 3, 224, 224), (5, 3, 17, 31), (1, 3, 1, 1)]:
        raw = rng.integers(0, 256, size=shape, dtype=np.uint8)
        raw.flat[:2] = (0, 255)
        old = (torch.from_numpy(raw).float() - m) / s
        for cl in (False, True):
            new = normalize(torch.from_numpy(raw), mean, std, channels_last=cl)
            assert new.dtype == torch.float32 and torch.equal(new, old)
            assert new.is_contiguous(
                memory_format=torch.channels_last if cl else torch.contiguous_format
            )
        raw.flags.writeable = False  # as Ray hands batches over
        out = TorchCollate(cfg.data, channels_last=True)(
            {"image": raw, "aug_seed": np.zeros(shape[0], np.int64), "id": np.arange(shape[0])}
        )
        assert torch.equal(out["image"], old)
        assert out["image"].is_contiguous(memory_format=torch.channels_last)
