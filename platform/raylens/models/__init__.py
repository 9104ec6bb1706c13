"""Models: backbones (timm, Hugging Face, registered) and heads, by short name."""

# Model files register their backbones on import (as timm/models/__init__.py does).
from raylens.models import small  # noqa: F401
