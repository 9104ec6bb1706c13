"""Strong train augmentation, replayable from a sample's seed: thin seeded wrappers around the
library implementations (timm's RandAugment / AutoAugment / RandomErasing, torchvision's
TrivialAugmentWide / ColorJitter), not re-implementations.

Those ops draw from the process-global RNGs (Python ``random``, numpy's global
``RandomState``, torch's CPU generator). :func:`seeded` points all three at a sub-seed of the
sample's seed before each op and restores their states afterwards, so the same image and
seed give the same pixels in any process, and nothing else in the process sees its RNG
move. Each op draws from its own sub-seed (:func:`sub_seeds`), so adding or removing one op
leaves the others' draws unchanged.

Only ``numpy`` and ``PIL`` are imported at module level. The accepted ``data.auto_augment``
strings are the schema's (:func:`raylens.schema.check_auto_augment`, checked at config load
without importing timm).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from raylens.schema import check_auto_augment

INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def auto_augment(
    spec: str,
    *,
    size: int,
    mean: tuple[float, float, float],
    interpolation: str = "bilinear",
) -> Callable[[Image.Image], Image.Image]:
    """The library transform for an auto-augment string, with the hparams timm's
    ``transforms_imagenet_train`` builds: ``translate_const = int(size * 0.45)``, fill
    ``img_mean = round(255 * mean)`` per channel, and the run's ``interpolation`` (timm's
    'random' choice between bilinear and bicubic is not used: one fixed mode per run).

    The returned callable maps a PIL RGB image to one; call it inside :func:`seeded`.
    """
    kind = check_auto_augment(spec)
    if kind == "trivial":
        from torchvision.transforms import InterpolationMode, TrivialAugmentWide

        return TrivialAugmentWide(interpolation=InterpolationMode(interpolation))
    from timm.data.auto_augment import auto_augment_transform, rand_augment_transform

    hparams = {
        "translate_const": int(size * 0.45),
        "img_mean": tuple(min(255, round(255 * x)) for x in mean),
        "interpolation": INTERPOLATIONS[interpolation],
    }
    if kind == "rand":
        aug = rand_augment_transform(spec, hparams)
        ops = aug.ops
    else:
        aug = auto_augment_transform(spec, hparams)
        ops = [op for sub_policy in aug.policy for op in sub_policy]
    for op in ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize_to_zero_bits
    return aug


def posterize_to_zero_bits(img: Image.Image, bits_to_keep: int, **kw) -> Image.Image:
    """timm's posterize op, also for 0 bits kept.

    timm passes 0 bits for the strongest magnitudes (RandAugment's PosterizeIncreasing at
    magnitude 10, which ``mstd`` noise reaches from m9; AutoAugment v0's ``Posterize`` at
    level 2), and Pillow 13 now raises ValueError for 0 where older Pillow (the one timm was
    written against) returned a black image. This keeps the older result, on our op objects
    only: 3 in 1000 RandAugment calls and ~2% of v0 calls failed without it.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit masked: black
    from timm.data.auto_augment import posterize

    return posterize(img, bits_to_keep, **kw)


def color_jitter(strength: float) -> Callable[[Image.Image], Image.Image]:
    """torchvision ``ColorJitter`` with the same strength for brightness, contrast and
    saturation and no hue (timm's scalar ``--color-jitter``). Call it inside :func:`seeded`."""
    from torchvision.transforms import ColorJitter

    return ColorJitter(strength, strength, strength)


def random_erasing(probability: float, mode: str = "pixel", count: int = 1):
    """timm's ``RandomErasing`` on CPU (``max_count=count``; its default area 2%-1/3 and
    aspect 0.3-3.3), for :func:`erase_uint8`."""
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability, mode=mode, max_count=count, device="cpu")


def erase_uint8(
    pixels: np.ndarray,
    erasing,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> np.ndarray:
    """Applies timm's ``RandomErasing`` where timm does, to the image normalized with the run's
    mean/std, and returns ``uint8 [3, h, w]`` again so erased pixels ship as uint8.

    The image is normalized as ``ToTensor`` + ``Normalize`` do (``x / 255``, minus mean, over
    std, float32); after erasing it is mapped back (times std, plus mean, times 255), rounded
    and clipped to 0-255. Untouched pixels come back unchanged (the float32 round trip is off
    by far less than half a level). Erased pixels differ from timm's float fill in two ways:
    they are quantized to 1/255 steps, and fills beyond the displayable range are clipped:
    ``const`` fills the mean (exact up to rounding), while the normal(0, 1) fills of ``rand``
    / ``pixel`` land at ``mean + z * std`` and are clipped at 0 and 1 (for ImageNet's
    mean/std, z below about -2.1 or above 2.2: ~3% of draws). Teacher and student see the
    same uint8 pixels, which is what replay needs.

    The arithmetic runs in numpy, single-threaded: torch's elementwise ops fan out to its
    intra-op threads, which on a busy 2-core machine made them 20-50x slower. (timm's own
    erasing is torch; Ray Data workers run torch with one thread, OMP_NUM_THREADS=1.)

    Args:
        pixels: ``uint8 [3, h, w]``.
        erasing: a :func:`random_erasing` transform; call inside :func:`seeded`.
    """
    import torch

    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    # [3, h, w] in C order: the caller's array is usually a CHW view of PIL's HWC pixels,
    # and the in-place steps below ran several times slower on that strided layout.
    x = pixels.astype(np.float32, order="C")
    x /= np.float32(255)
    x -= m
    x /= s
    erasing(torch.from_numpy(x))  # in place, on the same memory
    x *= s
    x += m
    x *= np.float32(255)
    np.rint(x, out=x)
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def sub_seeds(seed: int, op: str) -> tuple[int, int, int]:
    """Three independent 32-bit seeds (Python ``random``, numpy, torch) for ``op`` of the
    sample with ``seed``.

    Python's and numpy's generators are both MT19937 seeded the same way from an int, so one
    shared value would make their streams identical (RandAugment draws its ops from numpy and
    their probabilities/magnitudes from ``random``): each library gets its own.
    """
    digest = hashlib.blake2b(f"{seed}:{op}".encode(), digest_size=12).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in (0, 4, 8))


# One seeded block at a time per process: two threads seeding and drawing from the global
# RNGs at once would interleave their draws, and the results would not replay.
_LOCK = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[Callable[[str], None]]:
    """Saves the global RNG states (Python ``random``, numpy's global ``RandomState``,
    torch's CPU generator), yields ``use(op)``, and restores the states on exit.

    ``use(op)`` seeds all three from :func:`sub_seeds` ``(seed, op)``: call it right before
    each op, so every op draws from its own sub-seed whatever ran before it::

        with seeded(sample_seed) as use:
            use("auto_augment")
            img = aa(img)
            use("random_erasing")
            x = erasing(x)

    The states are saved and restored once per block, not per op: saving and restoring
    numpy's state is the expensive part (~60 us). CUDA generators are neither seeded nor
    saved (``fork_rng(devices=[])``, the CPU generator's own ``manual_seed``): the library
    ops used here draw on the CPU only. Blocks in different threads of one process run one
    at a time.
    """
    import torch

    def use(op: str) -> None:
        py_seed, np_seed, torch_seed = sub_seeds(seed, op)
        random.seed(py_seed)
        np.random.seed(np_seed)
        torch.default_generator.manual_seed(torch_seed)

    with _LOCK, torch.random.fork_rng(devices=[]):
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            yield use
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
