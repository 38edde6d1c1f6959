"""The training loop (loop.py) and what survives preemption (state.py)."""
