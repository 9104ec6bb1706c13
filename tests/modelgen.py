"""Tiny real Hugging Face vision models saved with ``save_pretrained`` (no hub needed)."""

from __future__ import annotations


def tiny_hf(kind: str, path, image_size: int = 32, *, processor: bool = True):
    """A 3-layer, 32-wide DINOv3 ViT (``kind="dinov3"``) or CLIP vision tower in ``path``.

    ``processor``: also save the model family's image processor config at ``image_size``
    (``preprocessor_config.json``, as hub checkpoints ship it: DINOv3 ImageNet statistics,
    bilinear resize; CLIP's own statistics, bicubic, short side then center crop)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        DINOv3ViTConfig,
        DINOv3ViTImageProcessor,
        DINOv3ViTModel,
    )

    kw = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=8,
    )
    if kind == "dinov3":
        model = DINOv3ViTModel(DINOv3ViTConfig(**kw))
        proc = DINOv3ViTImageProcessor(size={"height": image_size, "width": image_size})
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**kw))
        proc = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
    model.save_pretrained(path)
    if processor:
        proc.save_pretrained(path)
    return model
