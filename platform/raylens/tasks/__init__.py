"""Tasks: a loss plus metrics per kind of target (classification, multi-label, ...)."""
