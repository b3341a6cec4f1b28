"""Full fine-tuning (``full``): every parameter of the model trained with AdamW, the result
saved as a whole model and stored as a fine-tune (a delta of its base). It is
:class:`~mergehub.adapters.methods.base.Method` as it is, under its name."""

from __future__ import annotations

from mergehub.adapters.methods.base import Method, register


@register
class FullMethod(Method):
    """Full fine-tuning with AdamW."""

    name = "full"
