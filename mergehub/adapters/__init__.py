"""Training (``hub train``): fine-tunes and adapters that the store keeps as deltas of a base.

``methods/`` holds one module per training method (full, LoRA and every peft tuner, IncreLoRA,
sparse, 1-bit, MeZO / Sparse MeZO), each with its parameters and how it builds and steps its
model, registered in one place (``methods.METHODS``); :mod:`~mergehub.adapters.trainer` is the
loop they share, with :mod:`~mergehub.adapters.config` (configs),
:mod:`~mergehub.adapters.data`, :mod:`~mergehub.adapters.checkpoints` and
:mod:`~mergehub.adapters.layout` (results named after the base). :mod:`~mergehub.adapters.mezo`
is the MeZO optimizer and :mod:`~mergehub.adapters.distributed` the helpers for training on
several processes."""
