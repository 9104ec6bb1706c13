"""Batch inference on Ray Data (embeddings to Parquet)."""
