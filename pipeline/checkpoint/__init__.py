"""Checkpoints: the commit protocol (commit.py) and consolidated fp32 export (export.py)."""
