"""Merge methods composing deltas tensor by tensor (task arithmetic, TIES, DARE, ...)."""
