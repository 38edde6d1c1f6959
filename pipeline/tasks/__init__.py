"""Tasks: how a batch becomes losses and metrics (pure torch, no framework imports)."""
