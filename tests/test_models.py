"""The backbone contract on tiny real models (timm test models, tiny HF DINOv3 / CLIP), heads,
weight loading from local files and S3 (never unpickling), and partial unfreezing."""

from __future__ import annotations

import uuid

import pytest
import torch
from raylens.models.backbones import UnknownBackbone, create_backbone
from raylens.models.heads import create_head

from tests.modelgen import tiny_hf
from tests.stores import s3_storage


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {k: (root / k, tiny_hf(k, root / k)) for k in ("dinov3", "clip")}


@pytest.mark.parametrize(
    "name", ["test_vit", "test_convnext", "resnet10t", "vgg_s16", "hf:dinov3", "hf:clip"]
)
def test_every_backbone_honours_the_contract(name, hf_dirs):
    if name.startswith("hf:"):
        name = f"hf:{hf_dirs[name[3:]][0]}"
    bb = create_backbone(name)
    size = bb.preprocess.size if not name.startswith("hf:") else 32
    x = torch.randn(2, 3, size, size)
    feats = bb(x)
    assert feats.shape == (2, bb.num_features)
    assert len(bb.blocks) >= 3 and len(bb.preprocess.mean) == 3
    # unfreeze the last 2 blocks: exactly those blocks' params (and the tail) train
    bb.set_trainable(2)
    for b in bb.blocks[:-2]:
        assert not any(p.requires_grad for p in b.parameters())
    for b in bb.blocks[-2:]:
        assert all(p.requires_grad for p in b.parameters())
    frac = bb.trainable_fraction()
    bb.set_trainable(0)
    assert bb.trainable_fraction() == 0.0
    bb.set_trainable("all")
    assert bb.trainable_fraction() == 1.0 and 0 < frac < 1
    loss = bb(x).sum()
    loss.backward()  # gradients flow


def test_hf_directory_loads_the_saved_weights(hf_dirs):
    path, model = hf_dirs["dinov3"]
    bb = create_backbone(f"hf:{path}").eval()
    model.eval()  # DINOv3 jitters its RoPE positions in train mode
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(bb(x), model(pixel_values=x).pooler_output, atol=1e-6)
    clip = create_backbone(f"hf:{hf_dirs['clip'][0]}")
    assert clip.preprocess.mean[0] == pytest.approx(0.4815, abs=1e-4)  # CLIP's own stats


def test_timm_weights_from_local_and_s3_safetensors(tmp_path, seaweed):
    from safetensors.torch import save_file

    src = create_backbone("test_vit")
    state = {k: v.contiguous() for k, v in src.net.state_dict().items()}
    file = tmp_path / "w.safetensors"
    save_file(state, str(file))
    bucket = f"w-{uuid.uuid4().hex[:8]}"
    seaweed.create_bucket(bucket)
    storage = s3_storage(seaweed)
    storage.write_bytes(f"s3://{bucket}/test_vit.safetensors", file.read_bytes())
    x = torch.randn(2, 3, 160, 160)
    for weights in (str(file), f"s3://{bucket}/test_vit.safetensors"):
        bb = create_backbone("test_vit", weights=weights, storage=storage)
        with torch.no_grad():
            assert torch.allclose(bb(x), src(x), atol=1e-6)


def test_unknown_names_and_bad_unfreeze_are_clear():
    with pytest.raises(
        UnknownBackbone, match=r"unknown backbone 'tiny_vit_5m_22'.*closest.*tiny_vit_5m_224"
    ):
        create_backbone("tiny_vit_5m_22")
    with pytest.raises(ValueError, match=r"unfreeze_last_n=9: expected 'all' or 0..6"):
        create_backbone("test_vit").set_trainable(9)
    with pytest.raises(ValueError, match=r"unknown head 'mlp3'; registered: \['linear', 'mlp'\]"):
        create_head("mlp3", 8, 2)
    with pytest.raises(ValueError, match="at least 1 class"):
        create_head("linear", 8, 0)


def test_heads_shapes():
    assert create_head("linear", 64, 10)(torch.randn(4, 64)).shape == (4, 10)
    mlp = create_head("mlp", 64, 7, dropout=0.2)
    assert mlp(torch.randn(4, 64)).shape == (4, 7)
    assert mlp[0].out_features == 512
