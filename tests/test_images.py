"""Image validation and RGB conversion, on real encoded files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from raylens.data.images import ImageRejected, decode_rgb, inspect_image, to_rgb

from tests.imagegen import bad_files, encode


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_planted_files_are_rejected_or_converted(name):
    data, outcome, expected = bad_files()[name]
    if outcome == "rejected":
        with pytest.raises(ImageRejected) as err:
            inspect_image(data)
        assert err.value.reason == expected
    else:
        info = inspect_image(data)
        assert info.mode == expected and info.conversion
        assert decode_rgb(data).mode == "RGB"


def test_pixel_limit_is_checked_before_decoding():
    small = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageRejected, match="too_large"):
        inspect_image(small, max_pixels=9999)
    with pytest.raises(ImageRejected, match="too_large"):
        inspect_image(small, max_bytes=10)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(arr)))
    assert rgb[0, :, 0].tolist() == [0, 127, 255]


def test_alpha_is_composited_on_white_and_cmyk_converted():
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear)).min() == 255
    cyan = np.asarray(decode_rgb(encode(Image.new("CMYK", (4, 4), (255, 0, 0, 0)), "JPEG")))
    assert cyan[..., 0].mean() < 40 and cyan[..., 1].mean() > 200 and cyan[..., 2].mean() > 200


def test_palette_and_grayscale_modes_convert():
    for mode in ("P", "L", "1", "LA"):
        img = Image.new(mode, (5, 5))
        assert to_rgb(img).mode == "RGB"
    with pytest.raises(ImageRejected, match="unsupported_mode"):
        inspect_image(encode(Image.new("F", (4, 4)), "TIFF"))
