"""The 1-bit adapter format at the path docs/training.md names; it lives with its training
method in :mod:`mergehub.adapters.methods.onebit`."""

from mergehub.adapters.methods.onebit import PACKED_FILE, unpack

__all__ = ["PACKED_FILE", "unpack"]
