"""The bottom layer: tensor primitives the merge methods, the kernels and the codecs share.

Nothing here imports from the rest of mergehub, so every layer above may import it:

* :mod:`mergehub.ops.selection`: exact k-th largest magnitudes over streamed chunks (and the
  sampled brackets that find them in one pass), the trims' cuts, approximate cuts from a
  sample;
* :mod:`mergehub.ops.sparsify`: magnitude / Bernoulli / outlier-band masks, L1 rescaling, sign
  election and the disjoint combine: the generalized task-arithmetic step;
* :mod:`mergehub.ops.consensus`: the TALL mask rule and Consensus merging's vote.

``merge.methods`` builds the methods from these, ``kernels.reference`` (the fused kernels'
CPU path and test oracle) applies them to whole tensors, and ``storage.codecs`` (ComPEFT's
trim, TALL's masks) encode with the same rules, so the three agree by construction.
"""
