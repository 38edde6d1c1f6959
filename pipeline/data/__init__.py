"""Data: prepare shards (shards.py, sources.py), stream them (stream.py), decode (transforms.py)."""
