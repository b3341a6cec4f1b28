"""Live composition: merge stored fine-tunes, LoRAs and compressed task vectors into a model
held in memory, swap recipes and revert, with the same engine and kernels as ``hub merge``.

A :class:`Composer` is bound to one live ``transformers`` model (e.g. from
:func:`mergehub.load`). :meth:`Composer.apply` runs a ``hub merge`` recipe through the merge
engine's own per-tensor step (:class:`~mergehub.merge.tensors.TensorMerger`: the same plan, the
same chunking and fused kernels, the same seeds), on the model's device, and copies each
merged tensor into the parameter it belongs to; so the model's weights become exactly, bit for
bit, what ``hub merge --device DEVICE -o DIR`` writes for that recipe (``--format hf``).

What it keeps:

* the bind-time value of every tensor an apply changed (so :meth:`Composer.reset` restores it
  bit for bit). When that value equals the base's stored tensor (the usual case: the model
  was loaded from the base), the one copy also serves as the base the merges read;
* a cache of the inputs' decoded tensors on the model's device (:class:`DeltaCache`, an LRU
  within ``cache_bytes`` that keeps what the current apply uses), keyed by the store's blob
  ids, so that switching among a working set of entries does not read the store again.
  Compressed entries (bit1, compeft, lowrank, TALL) are decoded on the model's device (by the
  decompress-and-apply kernels on CUDA), as ``hub merge`` decodes them there;
* for each tensor a key of everything its merged value depends on (method and parameters for
  that tensor, the content of every input's tensor, seed, dtype), so a second apply rewrites
  only the tensors whose result changes, and a failed apply can put every tensor back.

Adapters can also stay unmerged: :meth:`Composer.attach` attaches a stored LoRA-family entry
through ``peft`` (so PEFT's ``set_adapter``, ``disable_adapter``, ``delete_adapter`` and
mixed-adapter batches work), and :meth:`Composer.merge_attached` folds attached adapters into
the weights with any mergehub method, on their exact dense deltas.

The parts: :mod:`~mergehub.compose.composer` (the :class:`Composer` and what it applied,
:class:`Active`), :mod:`~mergehub.compose.cache` (the device cache of input tensors),
:mod:`~mergehub.compose.keys` (what plans and merged tensors are remembered by) and
:mod:`~mergehub.compose.attach` (PEFT adapters kept unmerged).
"""

from mergehub.compose.cache import DeltaCache
from mergehub.compose.composer import Active, Composer
from mergehub.compose.keys import PLAN_MEMO

__all__ = ["PLAN_MEMO", "Active", "Composer", "DeltaCache"]
