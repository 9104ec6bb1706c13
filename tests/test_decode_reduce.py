"""Reduced-scale JPEG decoding (``data.decode_reduce``): the scale follows the rule, replays
bit for bit in another process, stays close to the full decode, and leaves every image it
does not reduce (PNG, small JPEGs, the setting off) exactly as a full decode."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from raylens import config as C
from raylens.config import ConfigError
from raylens.data.images import (
    ImageRejected,
    apply_draft,
    decode_rgb,
    load_rgb,
    open_image,
    reduction_for,
)
from raylens.data.transforms import (
    ImageTransform,
    decode_and_transform,
    decode_transform,
    sample_seed,
)
from raylens.schema import RunConfig

from tests.imagegen import encode, photo

REPO = Path(__file__).resolve().parents[1]
TRAIN = ImageTransform(224, train=True)  # default crop (area 0.08-1), the default gap
EVAL = ImageTransform(224, train=False, crop_pct=0.875)
SEEDS = np.array([sample_seed(0, f"img-{i}", 0) for i in range(12)], dtype=np.int64)


@pytest.fixture(scope="module")
def jpegs() -> dict[str, bytes]:
    """Real JPEGs (quality 90): a 12 MP photo, a 1600x1200 portrait-cropped one, a small one."""
    return {
        "12mp": encode(photo(4000, 3000, seed=1), "JPEG", quality=90),
        "2mp": encode(photo(1200, 1600, seed=2), "JPEG", quality=90),
        "small": encode(photo(300, 256, seed=3), "JPEG", quality=90),
    }


def full(data: bytes, tf: ImageTransform, seed) -> np.ndarray:
    """The full-resolution path: decode everything, then the transform."""
    return tf(decode_rgb(data), None if seed is None else int(seed))


def at_scale(data: bytes, tf: ImageTransform, seed, scale: int) -> np.ndarray:
    """The transform on a decode forced to ``1 / scale``."""
    img = open_image(data, 10**9)
    box, rng = tf.crop_box(*img.size, seed)
    assert apply_draft(img, scale) == scale
    return tf.apply(load_rgb(img), box, rng, seed, scale)


def scales(data: bytes, tf: ImageTransform, seeds) -> list[int]:
    img = Image.open(io.BytesIO(data))
    return [tf.reduction(img.format, tf.crop_box(*img.size, s)[0]) for s in seeds]


def test_the_scale_is_the_largest_that_keeps_gap_times_the_output():
    assert reduction_for("JPEG", 4000, 3000, 224, 224, 1.0) == 8  # 3000 / 8 = 375 >= 224
    assert reduction_for("JPEG", 4000, 3000, 224, 224, 2.0) == 4  # 750 >= 448, 375 < 448
    assert reduction_for("JPEG", 895, 2000, 224, 224, 2.0) == 1  # 895 / 2 < 448
    assert reduction_for("JPEG", 896, 2000, 224, 224, 2.0) == 2
    assert reduction_for("MPO", 1792, 1792, 224, 224, 1.0) == 8
    assert reduction_for("JPEG", 447, 447, 224, 224, 1.0) == 1  # never below the output
    for fmt in ("PNG", "WEBP", None):
        assert reduction_for(fmt, 4000, 3000, 224, 224, 1.0) == 1
    off = ImageTransform(224, train=True, decode_reduce=False)
    assert off.reduction("JPEG", (0, 0, 4000, 3000)) == 1
    assert EVAL.reduction("JPEG", (0, 0, 4000, 3000)) == 8
    assert (
        ImageTransform(224, train=False, decode_reduce_gap=2).reduction("JPEG", (0, 0, 4000, 3000))
        == 4
    )


def test_apply_draft_decodes_at_the_scale_asked_and_only_before_loading(jpegs):
    for s in (2, 4, 8):
        img = open_image(jpegs["2mp"], 10**9)
        assert apply_draft(img, s) == s and img.size == (math.ceil(1200 / s), 1600 // s)
        assert load_rgb(img).size == img.size
        assert apply_draft(img, 2) == 1  # loaded: no effect
    img = open_image(encode(photo(64, 64), "PNG"), 10**9)
    assert apply_draft(img, 2) == 1 and img.size == (64, 64)
    tiny = open_image(encode(Image.new("RGB", (3, 40)), "JPEG"), 10**9)
    assert apply_draft(tiny, 4) == 1 and tiny.size == (3, 40)  # narrower than the scale


def test_the_decode_uses_the_scale_the_rule_picks(jpegs):
    """decode_and_transform equals the transform on a decode forced to the rule's scale, not
    on the neighbouring scales, for train crops of every scale and the eval box."""
    data = jpegs["12mp"]
    picked = scales(data, TRAIN, SEEDS)
    assert {1, 2, 4, 8} >= set(picked) and len(set(picked)) >= 2, picked
    out, kept, failures = decode_and_transform([data] * len(SEEDS), TRAIN, SEEDS)
    assert not failures and kept.tolist() == list(range(len(SEEDS)))
    for got, seed, s in zip(out, SEEDS, picked, strict=True):
        assert np.array_equal(got, at_scale(data, TRAIN, int(seed), s))
        other = 2 * s if s < 8 else s // 2
        assert not np.array_equal(got, at_scale(data, TRAIN, int(seed), other))
    (ev,), _, _ = decode_and_transform([data], EVAL, None)
    assert np.array_equal(ev, at_scale(data, EVAL, None, 8))  # the box: 2625 px a side


def test_reduced_pixels_stay_close_to_the_full_decode(jpegs):
    for name in ("12mp", "2mp"):
        data = jpegs[name]
        for tf, seeds in ((TRAIN, SEEDS), (EVAL, [None])):
            assert max(scales(data, tf, seeds)) > 1, (name, tf.train)  # reduction happened
            imgs = [data] * len(seeds)
            got, _, _ = decode_and_transform(imgs, tf, None if tf is EVAL else np.array(seeds))
            ref = np.stack([full(data, tf, s) for s in seeds])
            err = np.abs(got.astype(np.int16) - ref)
            assert err.mean() < 3.0, (name, tf.train, err.mean())
            assert not np.array_equal(got, ref)  # it really decoded otherwise


def test_png_small_jpegs_and_decode_reduce_off_give_the_full_decode_exactly(jpegs):
    png = encode(photo(1600, 1200, seed=4), "PNG", compress_level=1)
    cases = [(png, TRAIN), (png, EVAL), (jpegs["small"], TRAIN), (jpegs["small"], EVAL)]
    for tf in (TRAIN, EVAL):  # large JPEGs with the setting off
        off = ImageTransform(**{**vars(tf), "decode_reduce": False})
        cases += [(jpegs["12mp"], off), (jpegs["2mp"], off)]
    few = SEEDS[:4]
    for data, tf in cases:
        if tf.decode_reduce:
            assert set(scales(data, tf, few if tf.train else [None])) == {1}
        got, _, _ = decode_and_transform([data] * len(few), tf, few if tf.train else None)
        for row, seed in zip(got, few, strict=True):
            assert np.array_equal(row, full(data, tf, seed if tf.train else None))


def test_reduced_decodes_replay_bit_for_bit_in_another_process(jpegs, tmp_path):
    """What the teacher pass, the student and the check each compute in their own process."""
    images = [jpegs["12mp"], jpegs["2mp"], jpegs["12mp"], jpegs["2mp"]]
    for i, data in enumerate(images):
        (tmp_path / f"{i}.jpg").write_bytes(data)
    seeds = SEEDS[: len(images)]
    script = f"""
import json, sys, numpy as np
from pathlib import Path
from raylens.data.transforms import ImageTransform, decode_and_transform
imgs = [Path(r"{tmp_path}", f"{{i}}.jpg").read_bytes() for i in range({len(images)})]
seeds = np.array({seeds.tolist()}, dtype=np.int64)
for name, tf, s in (("train", ImageTransform(224, train=True), seeds),
                    ("eval", ImageTransform(224, train=False, crop_pct=0.875), None)):
    px, _, _ = decode_and_transform(imgs, tf, s)
    np.save(Path(r"{tmp_path}", name + ".npy"), px)
print(json.dumps("ok"))
"""
    env = {"PYTHONPATH": f"{REPO / 'platform'}:{REPO}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and json.loads(proc.stdout) == "ok", proc.stderr[-2000:]
    train, _, _ = decode_and_transform(images, TRAIN, seeds)
    evals, _, _ = decode_and_transform(images, EVAL, None)
    assert np.array_equal(np.load(tmp_path / "train.npy"), train)
    assert np.array_equal(np.load(tmp_path / "eval.npy"), evals)


def test_several_transforms_share_one_decode_at_the_smallest_scale(jpegs):
    data = jpegs["12mp"]
    big, small = ImageTransform(448, train=False, crop_pct=0.875), EVAL  # scales 4 and 8
    assert big.reduction("JPEG", big.crop_box(4000, 3000)[0]) == 4
    a, b = decode_transform(data, [big, small])
    assert np.array_equal(a, decode_transform(data, [big])[0])
    assert np.array_equal(b, at_scale(data, small, None, 4))  # the shared, finer decode
    assert np.abs(b.astype(np.int16) - decode_transform(data, [small])[0]).mean() < 3.0


def test_truncated_and_grayscale_jpegs_under_reduction(jpegs):
    cut = jpegs["2mp"][: len(jpegs["2mp"]) // 2]
    _, kept, failures = decode_and_transform([cut], EVAL, None)
    assert kept.size == 0 and failures[0][1].startswith("undecodable")
    with pytest.raises(ImageRejected, match="undecodable"):
        decode_transform(cut, [EVAL])
    gray = encode(photo(1600, 1200, seed=5).convert("L"), "JPEG", quality=90)
    (got,), _, _ = decode_and_transform([gray], EVAL, None)
    ref = full(gray, EVAL, None)
    assert got.shape == (3, 224, 224) and np.array_equal(got[0], got[2])
    assert np.abs(got.astype(np.int16) - ref).mean() < 3.0


def test_config_carries_and_checks_the_settings():
    cfg = C.load(RunConfig, None, ["data.decode_reduce=false", "data.decode_reduce_gap=1.5"])
    tf = ImageTransform.from_config(cfg.data, train=True)
    assert tf.decode_reduce is False and tf.decode_reduce_gap == 1.5
    again = C.load(RunConfig, C.to_yaml(cfg))  # the run's saved config: embed/predict
    assert (again.data.decode_reduce, again.data.decode_reduce_gap) == (False, 1.5)
    with pytest.raises(ConfigError, match="'data.decode_reduce_gap': expected a finite"):
        C.load(RunConfig, None, ["data.decode_reduce_gap=0.5"])
    for bad in (0.9, math.nan, math.inf, True):
        with pytest.raises(ConfigError, match="decode_reduce_gap': expected a finite number >= 1"):
            ImageTransform(224, train=False, decode_reduce_gap=bad)
