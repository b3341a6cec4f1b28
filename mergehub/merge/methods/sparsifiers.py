"""The sparsifiers of the task-arithmetic family (:mod:`~mergehub.merge.methods.family`): what
each member keeps of every task vector τt before the sign election and the combine.

A sparsifier object belongs to one merge (it counts the entries it keeps, :class:`KeptTally`).
Per tensor it first computes its whole-tensor statistics, streamed over the chunks
(:meth:`Sparsifier.statistics`: per-input cuts, bands or densities, and the factors survivors
are rescaled by), then applies them chunk by chunk (:meth:`Sparsifier.keep`). The rules
themselves are the primitives of :mod:`mergehub.ops.sparsify`, on the CPU through the
equivalent fast forms of :mod:`~mergehub.merge.methods.fast` (the same bits).

* :class:`MagnitudeTrim` (TIES, Yadav et al. 2023): keep each τt's k = int(density·n)
  largest magnitudes, per tensor or over the whole task vector;
* :class:`RandomDrop` (DARE, Yu et al. 2024): keep each entry with probability ``density``;
* :class:`OutlierBand` (model breadcrumbs, Davari & Belilovsky 2024): drop the largest
  (fraction ``gamma``) and the smallest magnitudes, keep ``density`` in between.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mergehub.kernels import dare_words, numba_merge
from mergehub.merge.methods import fast
from mergehub.merge.methods.base import Prepass, TensorContext
from mergehub.merge.methods.global_cuts import GlobalCuts
from mergehub.ops.selection import ChunkStream, Cut, kth_rank, magnitude_cuts, planned, trim_count
from mergehub.ops.sparsify import (
    KeptTally, apply_mask, band_kept, band_mask, bernoulli_mask, cut_mask, keep_threshold,
    l1_scales, outlier_bands)

Params = list[dict[str, Any]]


@dataclass(frozen=True)
class Sparsity:
    """A sparsifier's statistics of one tensor, per input: what it keeps (``keeps``: a
    :class:`~mergehub.ops.selection.Cut`, a breadcrumbs band or a density, by sparsifier;
    ``None`` keeps everything) and the factor the survivors are multiplied by."""

    keeps: list[Any]
    scales: list[float]


class Sparsifier:
    """What a family member keeps of each task vector; ``params`` are the merge's global
    parameters, of which it reads those in :attr:`reads` (and per model those in
    :attr:`reads_per_model`): a member with this sparsifier declares them."""

    reads: tuple[str, ...] = ()
    reads_per_model: tuple[str, ...] = ("density",)

    def __init__(self, params: dict[str, Any]):
        self.params = params
        self.tally = KeptTally()

    def validate(self, model_params: Params, labels: list[str]) -> None:
        """Check the resolved per-model parameters; raise ``ValueError``."""

    @property
    def prepass(self) -> Prepass | None:
        """Its whole-model statistics, gathered before merging (``None``: none)."""
        return None

    #: whether :meth:`device_cuts` serves these parameters (the fused kernels' trim)
    fusable = False

    def device_cuts(self, base: torch.Tensor, thetas: list[torch.Tensor],
                    model_params: Params, ctx: TensorContext) -> list[Cut | None]:
        """The fused path's statistics: each input's trim of a whole tensor on its device."""
        raise NotImplementedError

    def exact_per_tensor(self) -> bool:
        """Whether the trim is the exact per-tensor top-k with no rescale, which
        :func:`~mergehub.merge.methods.onepass.one_pass_ties` selects during the merge's read."""
        return False

    def statistics(self, chunks: ChunkStream, ranges: list[tuple[int, int]],
                   model_params: Params, ctx: TensorContext) -> Sparsity:
        """One tensor's statistics, read through ``chunks`` (over ``ranges``) as often as
        needed."""
        raise NotImplementedError

    def keep(self, xs: list[torch.Tensor], sparsity: Sparsity, model_params: Params,
             ctx: TensorContext) -> list[torch.Tensor]:
        """What is kept of one chunk (rows ``ctx.rows``) of every input."""
        raise NotImplementedError

    def words(self, xs: list[torch.Tensor], sparsity: Sparsity, ctx: TensorContext
              ) -> tuple[list[int], int, list[int]] | None:
        """A random drop's draws for one chunk, for the CPU's compiled loop
        (:func:`mergehub.kernels.numba_merge.dare_chunk`, whose kept counts the caller
        tallies with :meth:`add_kept`): each input's stream key, the chunk's first flat
        position and each input's keep threshold; ``None`` where the sparsifier is no such
        drop or the loop does not apply (:meth:`keep` then drops and tallies)."""
        return None

    def add_kept(self, counts: list[int], numel: int) -> None:
        """Tally the entries each input kept of a chunk of ``numel`` (a compiled drop's)."""
        for t, count in enumerate(counts):
            self.tally.add(t, count, 0, numel)

    def planned_kept(self, densities: list[list[float]], numels: list[int]
                     ) -> tuple[list[float], str]:
        """Entries the merge will keep per input, and how sure that count is (see
        :meth:`~mergehub.merge.methods.base.MergeMethod.planned_kept`)."""
        raise NotImplementedError

    def kept_report(self) -> KeptTally:
        """The entries kept per input in the tensors merged so far."""
        return self.tally

    @staticmethod
    def masked(xs: list[torch.Tensor], sparsity: Sparsity, offset: int,
               mask: Callable[[torch.Tensor, Any, int], torch.Tensor | None],
               fast_kept: Callable[[torch.Tensor, Any, int], torch.Tensor | None]
               ) -> list[torch.Tensor]:
        """Each chunk (first flat position ``offset``) with what its keep keeps, times its
        scale: ``apply_mask(x, mask(x, keep, offset), scale)``, on the CPU by
        ``fast_kept(x, keep, offset)`` where that does not return ``None`` (the same
        values, signed zeros aside; ``None`` keeps everything, unscaled, either way)."""
        out = []
        for x, keep, s in zip(xs, sparsity.keeps, sparsity.scales):
            kept = fast_kept(x, keep, offset) if x.device.type == "cpu" else None
            out.append(apply_mask(x, mask(x, keep, offset), s) if kept is None
                       else kept if keep is None or s == 1.0 else kept * s)
        return out

    def l1_rescaled(self, chunks: ChunkStream, keeps: list[Any],
                    mask: Callable[[torch.Tensor, Any, int], torch.Tensor | None]) -> Sparsity:
        """``keeps`` with survivors rescaled to each input's L1 norm where ``rescale`` is true
        (mergekit's rescale: a pass over the tensor), not at all otherwise; ``mask(chunk,
        keep, offset)`` is a keep's mask of the chunk starting at flat position offset."""
        scales = [1.0] * len(keeps)
        if self.params["rescale"]:
            scales = l1_scales(chunks, lambda t, c, offset, x: mask(x, keeps[t], offset),
                               len(keeps))
        return Sparsity(keeps, scales)


class MagnitudeTrim(Sparsifier):
    """TIES' trim: each τt restricted to its k = int(density·n) largest magnitudes, equal
    magnitudes taken by flat position, lowest first (``ties: index``, as many as mergekit
    keeps; ``threshold`` keeps every entry tied with the k-th largest instead), per tensor
    (``trim_scope: tensor``, mergekit's and PEFT's default) or over the whole flattened task
    vector (``trim_scope: global``, the paper's code; costs two extra reads of the inputs to
    find each task's exact cut, three where it splits a run of ties: :class:`GlobalCuts`).
    ``density_tolerance: ε`` (a mergehub extension, default 0: exact) takes each per-tensor cut
    from a random sample instead, so that the trim keeps within ε of the density with
    probability >= 1 − 1e-6 per tensor and input (``selection.magnitude_cuts``); the GPU finds
    it in a few small launches instead of a pass over the inputs. ``rescale: true`` restores
    each input's L1 norm (mergekit's rescale; a pass of its own, never fused).
    """

    reads = ("rescale", "trim_scope", "density_tolerance", "ties")

    def __init__(self, params: dict[str, Any]):
        super().__init__(params)
        self.global_cuts: GlobalCuts | None = None

    def validate(self, model_params: Params, labels: list[str]) -> None:
        if self.params["density_tolerance"] and self.params["trim_scope"] == "global":
            raise ValueError("density_tolerance applies to trim_scope: tensor (global thresholds "
                             "are always exact)")
        if self.params["trim_scope"] == "global":  # one density per model: plan_merge checks it
            self.global_cuts = GlobalCuts([float(p["density"]) for p in model_params],
                                          self.params["ties"])

    @property
    def prepass(self) -> GlobalCuts | None:
        return self.global_cuts

    @property
    def tolerance(self) -> float | None:
        """``density_tolerance``, ``None`` for exact cuts."""
        return float(self.params["density_tolerance"]) or None

    @property
    def fusable(self) -> bool:  # type: ignore[override]
        return not self.params["rescale"]  # the L1 rescale needs its own pass: merged in chunks

    def exact_per_tensor(self) -> bool:
        return self.global_cuts is None and not self.tolerance and not self.params["rescale"]

    def cuts(self, model_params: Params, ctx: TensorContext,
             per_tensor: Callable[[list[float]], list[Cut | None]]) -> list[Cut | None]:
        """Each input's trim of this tensor: its part of the global cut (``trim_scope:
        global``, found in the pre-passes) or ``per_tensor(densities)``; the per-tensor
        counts go into the tally."""
        if ctx.prepassed is not None:
            return ctx.prepassed
        n = ctx.numel
        densities = [float(p["density"]) for p in model_params]
        cuts = per_tensor(densities)
        for t, (cut, d) in enumerate(zip(cuts, densities)):
            self.tally.add(t, n if cut is None else cut.kept, kth_rank(d, n) or 0, n)
        return cuts

    def device_cuts(self, base: torch.Tensor, thetas: list[torch.Tensor],
                    model_params: Params, ctx: TensorContext) -> list[Cut | None]:
        from mergehub import kernels

        find = ctx.cut_memo or kernels.magnitude_cuts
        return self.cuts(model_params, ctx, lambda densities: find(
            base, thetas, densities, tolerance=self.tolerance, ties=self.params["ties"],
            name=ctx.name))

    def statistics(self, chunks: ChunkStream, ranges: list[tuple[int, int]],
                   model_params: Params, ctx: TensorContext) -> Sparsity:
        cuts = self.cuts(model_params, ctx, lambda densities: magnitude_cuts(
            chunks, ctx.numel, densities, self.tolerance, self.params["ties"],
            bracket=numba_merge.bracket_pass))
        return self.l1_rescaled(chunks, cuts, cut_mask)

    def keep(self, xs: list[torch.Tensor], sparsity: Sparsity, model_params: Params,
             ctx: TensorContext) -> list[torch.Tensor]:
        """Each chunk restricted to its largest magnitudes (on the CPU by :func:`fast.shrink`
        where it applies: the same bits)."""
        return self.masked(xs, sparsity, ctx.offset, cut_mask, fast.shrink)

    def kept_report(self) -> KeptTally:
        if self.global_cuts is not None:
            kept = self.global_cuts.kept()
            return KeptTally(kept, [self.global_cuts.total] * len(kept))
        return self.tally

    def planned_kept(self, densities: list[list[float]], numels: list[int]
                     ) -> tuple[list[float], str]:
        if self.global_cuts is not None:  # one cut over all tensors
            counts = planned(densities[:1], [sum(numels)], trim_count)
        else:
            counts = planned(densities, numels, trim_count)
        return counts, ("about" if self.tolerance else "exactly" if self.params["ties"] == "index"
                        else "at least")


class RandomDrop(Sparsifier):
    """DARE's drop: each entry of τt kept with probability ``density`` (= 1 − drop rate p),
    drawn from a counter-based stream keyed by (``seed``, tensor name, input index), one word
    per flat position (:func:`~mergehub.ops.sparsify.draw_words`): the same seed gives the
    same output on any device and in any chunking. Survivors are rescaled by 1/density
    (``rescale: true``, the paper's: E[output] = τ), to the original L1 norm (``rescale: l1``,
    mergekit 0.1.5; a pass over the tensor first), or not at all (``rescale: false``)."""

    reads = ("rescale",)

    @staticmethod
    def _start(x: torch.Tensor, ctx: TensorContext) -> int:
        """The flat position of chunk ``x`` (rows ``ctx.rows``) in its tensor."""
        rows = ctx.rows[1] - ctx.rows[0]
        return ctx.rows[0] * (x.numel() // rows) if rows else 0

    @staticmethod
    def _mask(x: torch.Tensor, density: float, ctx: TensorContext, t: int,
              start: int) -> torch.Tensor | None:
        key = ctx.key("dare", t)
        words = dare_words(x.numel(), key, start, x.device) if 0 < density < 1 else None
        return bernoulli_mask(x, density, key, start, words)

    def statistics(self, chunks: ChunkStream, ranges: list[tuple[int, int]],
                   model_params: Params, ctx: TensorContext) -> Sparsity:
        densities = [float(p["density"]) for p in model_params]
        rescale = self.params["rescale"]
        if rescale == "l1":
            scales = l1_scales(chunks, lambda t, c, offset, x: self._mask(
                x, densities[t], ctx, t, offset), len(densities))
        else:
            scales = [1 / d if rescale and 0 < d < 1 else 1.0 for d in densities]
        return Sparsity(densities, scales)

    def keep(self, xs: list[torch.Tensor], sparsity: Sparsity, model_params: Params,
             ctx: TensorContext) -> list[torch.Tensor]:
        out = []
        for t, (x, density, s) in enumerate(zip(xs, sparsity.keeps, sparsity.scales)):
            kept = self._fast_drop(x, density, ctx, t, s)
            if kept is None:
                mask = self._mask(x, density, ctx, t, self._start(x, ctx))
                self.tally.add(t, x.numel() if mask is None else int(mask.sum()), 0, x.numel())
                kept = apply_mask(x, mask, s)
            out.append(kept)
        return out

    def words(self, xs: list[torch.Tensor], sparsity: Sparsity, ctx: TensorContext
              ) -> tuple[list[int], int, list[int]] | None:
        """The streams :meth:`keep` draws from (each input's key, the chunk's first flat
        position) and each input's keep threshold, where every density is in (0, 1) and the
        inputs are on the CPU."""
        if xs[0].device.type != "cpu" or not all(0 < d < 1 for d in sparsity.keeps):
            return None
        return ([ctx.key("dare", t) for t in range(len(xs))], self._start(xs[0], ctx),
                [keep_threshold(d) for d in sparsity.keeps])

    def _fast_drop(self, x: torch.Tensor, density: float, ctx: TensorContext, t: int,
                   scale: float) -> torch.Tensor | None:
        """Input t's drop on the CPU by :func:`fast.dare_keep` (the same words and bits), its
        kept count tallied; ``None`` where that does not apply (the plain masks then draw the
        same words)."""
        if x.device.type != "cpu" or not 0 < density < 1 \
                or not math.isfinite(float(x.sum())):  # x * False of an infinite x is NaN
            return None
        kept, count = fast.dare_keep(x, density, ctx.key("dare", t), self._start(x, ctx), scale)
        self.tally.add(t, count, 0, x.numel())
        return kept

    def planned_kept(self, densities: list[list[float]], numels: list[int]
                     ) -> tuple[list[float], str]:
        return planned(densities, numels, lambda d, n: min(max(d, 0.0), 1.0) * n), "about"


class OutlierBand(Sparsifier):
    """Breadcrumbs' band, per tensor: drop the largest magnitudes (outliers, fraction
    ``gamma``) and the smallest (noise), keep ``density`` of the entries in between. Parameter
    names and semantics follow mergekit's ``magnitude_outliers``: exactly int(density·n) entries
    are kept, the ranking's ties broken by position (``ties: index``, see
    :mod:`~mergehub.ops.sparsify`); ``ties: threshold`` keeps the band between the two values
    at those ranks instead (ties at its upper end kept, at its lower end dropped). ``rescale:
    true`` restores each input's L1 norm."""

    reads = ("rescale", "ties")
    reads_per_model = ("density", "gamma")

    def statistics(self, chunks: ChunkStream, ranges: list[tuple[int, int]],
                   model_params: Params, ctx: TensorContext) -> Sparsity:
        n = ctx.numel
        bands = outlier_bands(chunks, n, [float(p["density"]) for p in model_params],
                              [float(p["gamma"]) for p in model_params], self.params["ties"],
                              bracket=numba_merge.bracket_pass)
        for t, band in enumerate(bands):
            self.tally.add(t, band_kept(band, n), 0, n)
        return self.l1_rescaled(chunks, bands, band_mask)

    def keep(self, xs: list[torch.Tensor], sparsity: Sparsity, model_params: Params,
             ctx: TensorContext) -> list[torch.Tensor]:
        """Each chunk restricted to its band (on the CPU by :func:`fast.band_shrink` where it
        applies: the same bits)."""
        return self.masked(xs, sparsity, ctx.offset, band_mask, fast.band_shrink)

    def planned_kept(self, densities: list[list[float]], numels: list[int]
                     ) -> tuple[list[float], str]:
        counts = planned(densities, numels, lambda d, n: n if d >= 1 else max(0, int(d * n)))
        return counts, "exactly" if self.params["ties"] == "index" else "about"
