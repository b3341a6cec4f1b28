"""Adapters and trainers that produce deltas (LoRA family via peft, sparse, 1-bit, MeZO)."""
