"""Tiny real Hugging Face vision models saved with ``save_pretrained`` (no hub needed)."""

from __future__ import annotations


def tiny_hf(kind: str, path, image_size: int = 32):
    """A 3-layer, 32-wide DINOv3 ViT (``kind="dinov3"``) or CLIP vision tower in ``path``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, DINOv3ViTConfig, DINOv3ViTModel

    kw = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=8,
    )
    model = (
        DINOv3ViTModel(DINOv3ViTConfig(**kw))
        if kind == "dinov3"
        else CLIPVisionModel(CLIPVisionConfig(**kw))
    )
    model.save_pretrained(path)
    return model
