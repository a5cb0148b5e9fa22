"""Data: reading sources (IDX, CSV, download), packing shards, streaming macro-batches."""
