"""raylens: vision models on Ray, from object storage to served endpoints."""

__version__ = "0.1.0"
