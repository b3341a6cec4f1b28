"""The training methods of ``hub train``, one module each, registered by name in
:data:`METHODS` (:mod:`mergehub.adapters.methods.base` says what a method is; a config's
``method:`` names one, in the order they are imported here)."""

from mergehub.adapters.methods.base import METHODS, Method, register
from mergehub.adapters.methods import (  # noqa: F401  (importing registers them)
    full, lora, incrlora, sparse, onebit, mezo)

__all__ = ["METHODS", "Method", "register"]
