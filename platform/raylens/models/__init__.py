"""Models: backbones (timm, Hugging Face, registered) and heads, by short name."""
