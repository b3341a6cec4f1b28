"""MeZO and Sparse MeZO: zeroth-order SGD that fine-tunes with forward passes only.

(Over 500 lines: one optimizer class, whose streams, moves and rank exchange share the
invariants this docstring states once; its training method is
:mod:`mergehub.adapters.methods.mezo`.)

:class:`MeZO` is a ``torch.optim.Optimizer`` whose ``step(closure)`` estimates the gradient from
two evaluations of the closure's scalar loss (any objective, also a non-differentiable one such
as accuracy) and updates the parameters in place (Malladi et al. 2023, "Fine-tuning language
models with just forward passes"; docs/training.md)::

    perturb(+eps);  L+ = closure()
    perturb(-2eps); L- = closure()
    perturb(+eps)                         # back to theta
    g = (L+ - L-) / (2 eps)               # projected gradient, a scalar
    theta <- theta - lr * (g * z + wd * theta)

with ``z ~ N(0, I)`` never stored: each parameter's ``z`` is regenerated, ``CHUNK`` entries at a
time, from a generator seeded by (seed, step, parameter index). So the memory is that of
inference plus a few chunk-sized temporaries: no gradients, no optimizer moments. Sparse MeZO
(``density=q``, Liu et al. 2024) perturbs and updates only the entries whose magnitude is at
most the q-quantile of ``|theta|`` of their tensor (plus 1 bit per entry during a step; the
quantile is exact with the Triton kernels, estimated from a sample of ``QUANTILE_SAMPLE``
entries for larger tensors otherwise): the
fraction q of each tensor is trained, its sparsity (the fraction left out) is 1 - q. The
update moves along ``d / eps`` with ``d = eps z`` as applied (rounded to float32), the
direction ``g`` was measured along. Measured (``benchmarks/RESULTS.md``): peak memory 1.00x
inference for a 1.1B bf16 Llama on an H100, Sparse MeZO 1.04x, Adam 4.5x.

Floating point, what is and is not guaranteed:

* The perturbation is applied in the parameter's dtype (``z`` is drawn in float32, so a bf16 and
  a float32 copy of a model see the same direction). The ``-2 eps`` move is done as two rounded
  ``-eps`` moves (and ``eps z`` has its last bit set, see :func:`_sticky`), so an entry whose
  perturbed values stay in its binade (same exponent) comes back bit-exactly; an entry that
  crosses into a coarser binade (or passes near zero) can come back off by up to one rounding
  step of its perturbed magnitude. No in-place scheme avoids that without memory: adding a
  constant to floats that land on a coarser grid loses bits. Measured with weights drawn
  N(0, 0.02) and eps = 1e-3: 8.9% of float32 entries end off, by at most 3.7e-9 (far below an
  update lr * g * z); 8.3% of bf16 entries end off, by up to 2.4e-4, *larger* than a typical
  update, and bf16 rounds away every update below half its ulp (6e-5 for weights near 0.02,
  so lr = 1e-6 updates vanish).
* ``master_weights=True`` keeps a float32 copy of every trained parameter in the optimizer
  state: perturbed values are computed from the copy, restoring is bit-exact for every dtype,
  and updates accumulate in float32 (the parameter holds the rounded copy). It costs 4 bytes
  per trained entry: meant for MeZO over an adapter's parameters, or for bf16 models where the
  drift above matters. The optimizer then owns the values: write parameters through
  ``load_state_dict``, not behind its back.

Eval mode: the closure's forward passes must not be stochastic, or L+ and L- see different
dropout masks and g measures the masks instead of the direction. MeZO's reference evaluates in
eval mode ("Dropout is turned off too", Malladi et al.'s trainer); run ``step`` inside
:func:`forward_only` (``hub train`` does), which also turns off peft's LoRA dropout.

Reproducibility: with the same seed, parameters, closure and data two runs are bit-identical
on one device type (the CPU draws z with ``torch.randn``, CUDA with Triton's Philox: different
streams); ``state_dict`` carries the step count (and the float32 copies), so a resumed run
continues bit-exactly. On CUDA, z's Box-Muller transform uses the GPU's approximate log2, sine
and cosine (within ~2e-5 of the full-precision values, each move ~26% faster); a state saved
before that (no ``z_transform`` in it) continues on the full-precision transform it started
with.

Speed: on CUDA every parameter held whole by this process, without a float32 copy or weight
decay in its update (bf16, fp16 or fp32, contiguous) is moved by one launch per move for all of
them (:func:`mergehub.kernels.zo_steps`): z drawn in registers from each parameter's seed,
Sparse MeZO's mask computed in the pass of the first move and kept as packed bits, its
thresholds found exactly on the device beforehand (:func:`mergehub.kernels.
smallest_magnitudes`), no host synchronization but the closure's losses, and the launches'
tensors checked once a step (:class:`mergehub.kernels.ZoTensors`). A shard's whole parameter
moves in one pass too (:func:`mergehub.kernels.zo_step`); the other cases draw d into a float32
chunk (:func:`mergehub.kernels.zo_direction`) and move with torch ops. All do the same float32
operations in the same order.

z of an entry is a function of (seed, step, parameter index, perturbation, the entry's position
in the flattened parameter), whatever part of the parameter a process holds: Triton's Philox
stream is addressed by position; the torch stream draws each block of ``CHUNK`` entries from a
generator of its own. So a rank that holds a shard of a parameter (a DTensor, e.g. FSDP2's)
draws the z of its shard alone and perturbs and updates only it, and the result does not
depend on the number of ranks or how the parameters are sharded.

Several perturbations (``n_perturbations=P``, the n-SPSA estimate of Malladi et al.): P
directions z_1..z_P, each evaluated at theta +- eps z_j on the same batch, and the update
moves along the mean of the P estimates, (1/P) sum_j g_j z_j.

More than one process (``process_group``): every rank holds the model (or its shard) and the
same seed, so it draws the same z; the ranks only exchange loss values, a few scalars per step
whatever the model's size, and apply the same update:

* batch-parallel (one perturbation, or sharded parameters): every rank evaluates every
  perturbation on its own rows of the batch (:meth:`MeZO.batch_rows`); the closure returns its
  rows' loss sum and their weight (e.g. the token count), and one all-reduce of 4 float64 per
  perturbation gives every rank the loss of the whole batch;
* perturbation-parallel (P > 1, every rank holding whole parameters): rank r evaluates
  perturbations r, r + N, ... on the whole batch, and one all-reduce of 2 float64 per
  perturbation gives every rank every g_j. Every rank still makes the moves of every
  perturbation (without evaluating the others'): restoring rounds, as above, and the ranks'
  weights must round alike to stay equal (moves cost a pass over the parameters, far less
  than the forward passes they spare).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from mergehub import kernels
from mergehub.adapters import distributed
from mergehub.kernels.deltas import pack_bits, unpack_bits
from mergehub.errors import MergehubError

CHUNK = 1 << 22
"""Entries of ``z`` drawn at once (16 MiB of float32); the optimizer's transient memory is a
few such chunks. On the torch stream also the unit of seeding: entries [k CHUNK, (k+1) CHUNK)
of a flattened parameter are drawn by a generator of their own (:func:`_stream`)."""

QUANTILE_SAMPLE = 1 << 20
"""Tensors with more entries estimate Sparse MeZO's quantile from this many sampled entries."""

class MeZOError(MergehubError):
    """A MeZO step cannot proceed (no closure, non-finite loss) or was configured wrongly."""


#: what ``sparsity`` used to be called wrongly (it was the fraction trained)
RENAMED = ("MeZO: 'sparsity' was renamed 'density': it is the fraction of each tensor's entries "
           "that is trained (those of smallest |theta|); a sparsity is the fraction left out, "
           "1 - density")


def _check_group(lr: float, eps: float, weight_decay: float, density: float | None) -> None:
    """Refuse hyperparameters that would silently train nothing or diverge at once."""
    if not (math.isfinite(lr) and lr >= 0):
        raise MeZOError(f"MeZO: lr must be a finite number >= 0, got {lr!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise MeZOError(f"MeZO: eps must be a finite number > 0, got {eps!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise MeZOError(f"MeZO: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if density is not None and not 0 < density <= 1:
        raise MeZOError(f"MeZO: density (the quantile q of |theta| below which entries are "
                        f"trained) must be in (0, 1], got {density!r}")


@contextlib.contextmanager
def forward_only(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout, LoRA dropout and layer drop off) and no autograd for
    the forward passes of a zeroth-order step; the training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


#: parameter dtypes whose dense moves :func:`mergehub.kernels.zo_step` makes in one pass
_IN_REGISTERS = (torch.bfloat16, torch.float16, torch.float32)


@functools.lru_cache(maxsize=1 << 14)
def _seed(*key: int) -> int:
    """A 64-bit seed from ``key`` (seed, step, parameter index[, stream]) through numpy's
    SeedSequence, so no two keys share a stream (cached: a step asks for each three times)."""
    words = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def _stream(seed: int, step: int, index: int, j: int = 0, block: int = 0) -> tuple[int, ...]:
    """The key of perturbation ``j``'s z for parameter ``index`` at ``step`` (its entries
    [block CHUNK, (block+1) CHUNK) on the torch stream): (seed, step, index) for the first
    perturbation's first block, the key mergehub used before blocks and perturbations (so a
    run resumed from then continues bit-exactly where its parameters have at most CHUNK
    entries); a longer key, which no other stream uses, otherwise."""
    return (seed, step, index) if j == 0 and block == 0 else (seed, step, index, 2, j, block)


#: numpy's SeedSequence constants (numpy/random/bit_generator.pyx): pool size, the entropy
#: hash's init and multiplier, the state hash's, and the mix's two multipliers
_POOL, _INIT_A, _MULT_A, _INIT_B, _MULT_B = 4, 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715


def _stream_seeds(seed: int, step: int, indices: list[int], j: int = 0) -> np.ndarray:
    """:func:`_seed` of the keys :func:`_stream` gives parameters ``indices`` (each below
    2^32) at (``seed``, ``step``, perturbation ``j``), at once (uint64): numpy's
    ``SeedSequence(key).generate_state(2)`` computed over all keys in one pass of array
    operations (its hash is specified word by word, so a vectorized copy gives the same words;
    tests check it against ``SeedSequence``). The keys differ in the index alone, one 32-bit
    word, so their words are a column per key built without a loop over keys. A step needs one
    seed per parameter: ~0.08 ms for 200 keys, against ~5 ms of ``SeedSequence`` calls (and
    ~0.3 ms with the words gathered key by key)."""
    key = _stream(seed, step, 0, j)  # the index is the third value
    head = [w for v in key[:2] for w in _words(v)]
    tail = [w for v in key[3:] for w in _words(v)]
    entropy = np.empty((len(head) + 1 + len(tail), len(indices)), dtype=np.uint32)
    entropy[:len(head)] = np.array(head, dtype=np.uint32)[:, None]
    entropy[len(head)] = np.asarray(indices, dtype=np.uint32)
    entropy[len(head) + 1:] = np.array(tail, dtype=np.uint32).reshape(-1, 1)
    return _seed_words(entropy)


def _words(value: int) -> list[int]:
    """A non-negative int as SeedSequence reads it: 32-bit words, least significant first."""
    out = [value & 0xFFFFFFFF]
    while value := value >> 32:
        out.append(value & 0xFFFFFFFF)
    return out


def _seed_words(entropy: np.ndarray) -> np.ndarray:
    """SeedSequence's mixing of uint32 entropy [words, keys] into two state words per key,
    joined as uint64 (the steps of ``mix_entropy`` and ``generate_state``, wrapping uint32)."""
    u32 = np.uint32
    hash_const = [_INIT_A]

    def hashmix(value: np.ndarray) -> np.ndarray:
        value = value ^ u32(hash_const[0])
        hash_const[0] = (hash_const[0] * _MULT_A) & 0xFFFFFFFF
        value = value * u32(hash_const[0])
        return value ^ (value >> u32(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = x * u32(_MIX_L) - y * u32(_MIX_R)
        return result ^ (result >> u32(16))

    zeros = np.zeros(entropy.shape[1], dtype=np.uint32)
    pool = [hashmix(entropy[i] if i < len(entropy) else zeros) for i in range(_POOL)]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL, len(entropy)):
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(entropy[src]))
    state, const = [], _INIT_B
    for i in range(2):
        value = pool[i] ^ u32(const)
        const = (const * _MULT_B) & 0xFFFFFFFF
        value = value * u32(const)
        state.append((value ^ (value >> u32(16))).astype(np.uint64))
    return state[0] | (state[1] << np.uint64(32))


def _generator(device: torch.device, *key: int) -> torch.Generator:
    """A torch generator on ``device`` seeded by :func:`_seed` of ``key``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed(*key))
    return gen


def _threshold(values: torch.Tensor, q: float, generator: torch.Generator) -> float:
    """The q-quantile of ``|values|`` (the k-th smallest, k = ceil(q n)) on the torch path;
    estimated from ``QUANTILE_SAMPLE`` seeded draws for larger tensors, to keep the transient
    memory small (the Triton path selects it exactly: :meth:`MeZO._bound`)."""
    flat = values.detach().reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        pick = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator,
                             device=flat.device)
        flat = flat[pick]
    k = max(1, math.ceil(q * flat.numel()))
    mags = flat.abs().float()
    if mags.device.type == "cpu":
        return float(mags.kthvalue(k).values)
    return float(mags.sort().values[k - 1])  # CUDA kthvalue selects in one block: 100x slower


def _sticky(d: torch.Tensor) -> torch.Tensor:
    """``d`` (float32) with the lowest mantissa bit set, in place: a change of at most one
    float32 ulp that keeps ``x + d`` off exact rounding ties for every ``x`` at least ~4|d|, so
    ``(x + d) - d`` rounds back to ``x`` whenever both stay in x's binade (with a tie,
    round-half-to-even could go one way and come back the other)."""
    d.view(torch.int32).bitwise_or_(1)
    return d


@dataclasses.dataclass
class _Launch:
    """The parameters of one group, dtype and device that one :func:`mergehub.kernels.zo_steps`
    launch moves this step (the parameters themselves, addressed as flat, checked and laid
    out: :class:`mergehub.kernels.ZoTensors`, and their indices among all parameters), their
    seeds per perturbation (int64 on their device) and, in a sparse step, their thresholds and
    packed masks (``fresh`` until the step's first move computes them)."""
    group: dict[str, Any]
    xs: kernels.ZoTensors
    indices: list[int]
    seeds: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    bounds: torch.Tensor | None = None
    bits: torch.Tensor | None = None
    fresh: bool = False


@dataclasses.dataclass
class _Plan:
    """How one step moves its parameters: the launches, the parameters moved one by one
    (index, parameter, group), and those parameters' packed sparse masks by index."""
    launches: list[_Launch]
    rest: list[tuple[int, torch.Tensor, dict[str, Any]]]
    masks: dict[int, list[torch.Tensor]]


class MeZO(torch.optim.Optimizer):
    """In-place zeroth-order SGD (MeZO); ``density=q`` gives Sparse MeZO.

    Args:
        params: parameters or parameter groups, as for any torch optimizer; parameters with
            ``requires_grad=False`` are left alone (so ``model.parameters()`` of a peft model
            trains only the adapter). Groups may set their own ``lr``, ``eps``,
            ``weight_decay`` and ``density``. A parameter may be a DTensor sharded along dim 0
            (FSDP2's ``fully_shard``): this process perturbs and updates its shard only.
        lr: learning rate (paper: 1e-6 to 1e-7 for full parameters, ~1e-4 with LoRA).
        eps: perturbation scale (paper: 1e-3; 1e-2 with LoRA).
        weight_decay: decoupled from ``g``, as in the update above; applied only to
            parameters with at least 2 dimensions (biases and norm weights are 1-D).
        seed: seeds every step's perturbation; same seed, same run.
        density: None for MeZO; q in (0, 1] for Sparse MeZO: per tensor, only entries with
            ``|theta| <=`` the q-quantile of its ``|theta|`` are perturbed and updated (the
            fraction q is trained, the sparsity is 1 - q). The mask
            is recomputed every step from the current weights and held during the step as a
            packed bitmap (1 bit per entry): recomputing it from the *perturbed* weights would
            disagree with the mask used to perturb for entries within eps|z| of the threshold,
            and restoring would then move entries outside the mask. Entries outside the mask
            keep their value (they get an exact +0; a -0.0 may come back as +0.0). The
            quantile of a sharded tensor is taken over the whole tensor (gathered once a step).
        n_perturbations: P directions per step (2P evaluations of the closure, spread over the
            ranks where they hold whole parameters); the update is the mean of the P
            estimates g_j z_j.
        process_group: the ranks that train together (``torch.distributed.group.WORLD`` for
            all), or None for one process. Every rank must build the optimizer with the same
            arguments and call ``step`` with closures over the same batch: it evaluates
            :meth:`batch_rows` of it, and the ranks exchange only the loss values.
        master_weights: keep float32 copies of the trained parameters (see the module
            docstring): bit-exact restoring and float32 updates for bf16/fp16 parameters.
        sign: ZO-SGD-Sign (ZO-Bench): update with sign(g) instead of g (one perturbation).
        backend: where z comes from: ``None`` picks ``"triton"`` for CUDA parameters when
            Triton is installed, ``"torch"`` otherwise; ``"triton"``: Philox in the kernels of
            :mod:`mergehub.kernels` (CPU tensors need ``TRITON_INTERPRET=1``); ``"torch"``:
            ``torch.randn`` (the stream of mergehub versions before the kernels, e.g. to
            continue such a run bit-exactly). Part of the state, since it picks the stream.
        sparsity: the old, misleading name of ``density``: an error naming it.

    ``step(closure)`` calls ``closure()`` twice per perturbation it evaluates, under
    ``torch.no_grad()``; it must evaluate the same rows both times, deterministically (eval
    mode: :func:`forward_only`), and return a scalar (float or one-element tensor) or a pair
    (loss sum, weight): the loss of several rows, or of several ranks' rows, is the sum of
    their loss sums over the sum of their weights (a scalar has weight 1). It returns the mean
    over the perturbations of (L+ + L-) / 2; ``last_projected_grads`` holds the P values g_j
    (``last_projected_grad`` g itself when P = 1).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                 eps: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                 density: float | None = None, *, n_perturbations: int = 1,
                 process_group: Any = None, master_weights: bool = False,
                 sign: bool = False, backend: str | None = None, sparsity: Any = None) -> None:
        if sparsity is not None:
            raise MeZOError(RENAMED)
        _check_group(lr, eps, weight_decay, density)
        if not isinstance(seed, int) or seed < 0:
            raise MeZOError(f"MeZO: seed must be an integer >= 0, got {seed!r}")
        if backend not in (None, "triton", "torch"):
            raise MeZOError(f"MeZO: backend must be None, 'triton' or 'torch', not {backend!r}")
        if isinstance(n_perturbations, bool) or not isinstance(n_perturbations, int) \
                or n_perturbations < 1:
            raise MeZOError(f"MeZO: n_perturbations must be an integer >= 1, got "
                            f"{n_perturbations!r}")
        if sign and n_perturbations > 1:
            raise MeZOError("MeZO: sign (ZO-SGD-Sign) takes the sign of one projected "
                            "gradient: use n_perturbations=1 with it")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay,
                                      density=density))
        for group in self.param_groups:
            if "sparsity" in group:
                raise MeZOError(RENAMED)
            _check_group(group["lr"], group["eps"], group["weight_decay"], group["density"])
        self.seed = seed
        self.n_perturbations = n_perturbations
        self.process_group = process_group
        self.master_weights = master_weights
        self.sign = sign
        self.backend = backend
        #: z on the Triton path from libdevice's full-precision transform (the stream of states
        #: saved before the approximate one, see ``load_state_dict``) instead of the GPU's
        #: approximate log2/sin/cos (:func:`mergehub.kernels.zo_direction`)
        self.accurate_z = False
        self.steps_done = 0
        self.last_projected_grad: float | None = None
        self.last_projected_grads: list[float] = []

    def _on_triton(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s perturbations come from the Triton kernels (see ``backend``)."""
        if self.backend is None:
            return p.is_cuda and kernels.triton_available()
        return self.backend == "triton"

    def _trained(self) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        """(index, parameter, group) of every parameter to train; the index counts all
        parameters of all groups, so freezing one does not change the others' streams."""
        out = []
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    out.append((index, p, group))
                index += 1
        return out

    # --- who evaluates what ---------------------------------------------------------------

    def _ranks(self) -> tuple[int, int]:
        """(this rank, number of ranks) in ``process_group``; (0, 1) for one process."""
        if self.process_group is None:
            return 0, 1
        import torch.distributed as dist

        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def _splits_perturbations(self) -> bool:
        """Whether the ranks share out the perturbations (P > 1, whole parameters on every
        rank) rather than the batch."""
        if self._ranks()[1] == 1 or self.n_perturbations == 1:
            return False
        return not any(distributed.is_dtensor(p) for _, p, _ in self._trained())

    def batch_rows(self, n: int) -> slice:
        """The rows of an ``n``-row batch this rank's closure must evaluate: its part of the
        batch when the ranks share out the batch (:func:`distributed.rows`: consecutive,
        sizes differing by at most one, in rank order), else all of them."""
        rank, size = self._ranks()
        if size == 1 or self._splits_perturbations():
            return slice(0, n)
        if n < size:
            raise MeZOError(f"MeZO: a batch of {n} rows cannot be shared out among {size} "
                            "ranks: use a batch of at least one row per rank")
        return distributed.rows(n, rank, size)

    # --- where z lives --------------------------------------------------------------------

    def _local(self, index: int, p: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(p's entries held here, the flat position of the first): see
        :func:`distributed.local_run`."""
        try:
            return distributed.local_run(p)
        except ValueError as e:
            raise MeZOError(f"MeZO: parameter {index}: {e}") from None

    def _master(self, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The float32 copy of p's ``local`` entries, made from them the first time it is
        needed (so weights loaded into the model after the optimizer was built are picked
        up)."""
        state = self.state[p]
        if "master" not in state:
            state["master"] = local.detach().to(torch.float32, copy=True)
        return state["master"]

    @staticmethod
    def _pieces(local: torch.Tensor, master: torch.Tensor | None, offset: int
                ) -> Iterable[tuple[torch.Tensor, torch.Tensor | None, int]]:
        """(slice of ``local``, the same slice of its master, the flat position of its first
        entry in the whole parameter): ``local`` cut where the flat positions cross a multiple
        of ``CHUNK``, or the whole of it when it is not contiguous."""
        if not local.is_contiguous():
            yield local, master, offset
            return
        flat = local.view(-1)
        mflat = None if master is None else master.view(-1)
        at = 0
        while at < flat.numel():
            stop = min(flat.numel(), ((offset + at) // CHUNK + 1) * CHUNK - offset)
            yield flat[at:stop], None if mflat is None else mflat[at:stop], offset + at
            at = stop

    def _direction(self, p: torch.Tensor, index: int, j: int, chunk: torch.Tensor,
                   start: int, eps: float) -> torch.Tensor:
        """d = eps z (float32, shaped as ``chunk``, lowest bit set) of perturbation ``j`` for
        the entries of parameter ``index`` (``p``) at flat positions [start, start +
        chunk.numel())."""
        n = chunk.numel()
        if self._on_triton(p):
            skew = start % 4  # the Philox stream is addressed in fours
            seed = _seed(*_stream(self.seed, self.steps_done, index, j))
            d = kernels.zo_direction(n + skew, seed, eps, start=start - skew,
                                     device=chunk.device, accurate=self.accurate_z)[skew:]
            return d.view(chunk.shape)
        d = torch.empty(n, dtype=torch.float32, device=chunk.device)
        at = start
        while at < start + n:
            block = at // CHUNK
            first = block * CHUNK
            size = min(CHUNK, p.numel() - first)
            gen = _generator(chunk.device, *_stream(self.seed, self.steps_done, index, j,
                                                     block))
            lo, hi = at - first, min(size, start + n - first)
            if lo == 0 and hi == size:
                torch.randn(size, generator=gen, out=d[at - start:at - start + size])
            else:  # a shard's edge: the block drawn whole, as a process holding it would
                d[at - start:first + hi - start] = torch.randn(
                    size, generator=gen, dtype=torch.float32, device=chunk.device)[lo:hi]
            at = first + hi
        return _sticky(d.mul_(eps)).view(chunk.shape)

    def _plan(self, trained: list[tuple[int, torch.Tensor, dict[str, Any]]]) -> _Plan:
        """This step's launches: the parameters the Triton kernels move in registers (whole
        on this process, contiguous, bf16 / fp16 / fp32, no float32 copy, no weight decay
        in the update), one :func:`mergehub.kernels.zo_steps` launch per group, dtype and
        device for each move (their tensors checked once a step, their address tables kept
        while they stay where they are: :class:`mergehub.kernels.ZoTensors`), each parameter
        with its own seed (the stream the parameter-by-parameter path draws), Sparse MeZO's
        thresholds exact on the device (:func:`mergehub.kernels.smallest_magnitudes`) and its
        masks computed in the first move's pass; the other parameters move one by one, with
        :meth:`_masks`. Made anew each step, from the parameters as they are: nothing of it
        outlives the step (a parameter given new storage, e.g. by ``model.to(...)``, is
        addressed where it now is)."""
        groups: dict[tuple[int, torch.dtype, torch.device],
                     tuple[dict[str, Any], list[torch.Tensor], list[int]]] = {}
        rest = []
        for index, p, group in trained:
            if self._on_triton(p) and not self.master_weights and not distributed.is_dtensor(p) \
                    and p.is_contiguous() and p.dtype in _IN_REGISTERS and p.numel() < 2 ** 31 \
                    and not (group["weight_decay"] and p.dim() >= 2):
                _, xs, indices = groups.setdefault((id(group), p.dtype, p.device), (group, [], []))
                xs.append(p)  # contiguous: addressed as flat, no view needed
                indices.append(index)
            else:
                rest.append((index, p, group))
        launches = [_Launch(group, kernels.ZoTensors(xs, "MeZO"), indices)
                    for group, xs, indices in groups.values()]
        for launch in launches:
            q = launch.group["density"]
            if q is not None:
                launch.bounds = kernels.smallest_magnitudes(
                    launch.xs, [max(1, math.ceil(q * x.numel())) for x in launch.xs])
                launch.bits = torch.empty(kernels.zo_mask_bytes(launch.xs), dtype=torch.uint8,
                                          device=launch.xs[0].device)
                launch.fresh = True
        return _Plan(launches, rest, self._masks(rest))

    def _bound(self, ref: torch.Tensor, q: float, index: int,
               fused: bool) -> float | torch.Tensor:
        """Sparse MeZO's threshold for one parameter (whole; or its float32 copy): with the
        Triton kernels the exact q-quantile of |ref| (:func:`mergehub.kernels.
        smallest_magnitudes`, left on the device), as :meth:`_plan`'s launches take it;
        otherwise :func:`_threshold`."""
        if fused and ref.dtype in _IN_REGISTERS and ref.numel() < 2 ** 31:
            flat = ref.detach().reshape(-1)
            return kernels.smallest_magnitudes([flat], [max(1, math.ceil(q * flat.numel()))])[0]
        return _threshold(ref, q, _generator(ref.device, self.seed, self.steps_done, index, 1))

    def _masks(self, trained: list[tuple[int, torch.Tensor, dict[str, Any]]]
               ) -> dict[int, list[torch.Tensor]]:
        """Sparse MeZO's masks for this step, from the weights at theta: per sparse parameter,
        per piece (:meth:`_pieces`), the packed bits of ``|theta| <= tau``."""
        masks: dict[int, list[torch.Tensor]] = {}
        for index, p, group in trained:
            q = group["density"]
            if q is None:
                continue
            local, offset = self._local(index, p)
            master = self._master(p, local) if self.master_weights else None
            tau = self._bound(distributed.whole(p, master), q, index, self._on_triton(p))
            masks[index] = [
                pack_bits(((ref <= tau) & (ref >= -tau)).reshape(-1))
                for chunk, mchunk, _ in self._pieces(local, master, offset)
                for ref in [chunk if mchunk is None else mchunk]]
        return masks

    # --- moving ---------------------------------------------------------------------------

    def _move(self, plan: _Plan, frm: int, to: int, j: int = 0, grad: float | None = None,
              decay: bool = True) -> None:
        """Move every trained parameter from ``theta + frm*eps*z_j`` to ``theta + to*eps*z_j``
        (one rounded eps-sized move at a time, or from the float32 copy), then, with ``grad``,
        apply the update along z_j (and, with ``decay``, the weight decay) at ``to == 0``: the
        plan's launches in one pass each, its other parameters one by one."""
        for launch in plan.launches:
            if j not in launch.seeds:
                launch.seeds[j] = kernels.seed_table(
                    _stream_seeds(self.seed, self.steps_done, launch.indices, j),
                    launch.xs[0].device)
            kernels.zo_steps(launch.xs, launch.seeds[j], launch.group["eps"], to - frm,
                             update=None if grad is None else self._step_scale(grad, launch.group),
                             bounds=launch.bounds, bits=launch.bits, fresh=launch.fresh,
                             accurate=self.accurate_z)
            launch.fresh = False  # the masks are those of theta at the step's first move
        masks = plan.masks
        for index, p, group in plan.rest:
            fused = self._on_triton(p)
            local, offset = self._local(index, p)
            master = self._master(p, local) if self.master_weights else None
            q = group["density"]
            eps = group["eps"]
            decays = decay and grad is not None and p.dim() >= 2 and bool(group["weight_decay"])
            if fused and q is None and master is None and not decays and local.is_contiguous() \
                    and local.dtype in _IN_REGISTERS and offset % 4 == 0:
                # one pass, d in registers: no chunks needed
                kernels.zo_step(local.view(-1), _seed(*_stream(self.seed, self.steps_done,
                                                               index, j)),
                                eps, to - frm, start=offset, update=None
                                if grad is None else self._step_scale(grad, group),
                                accurate=self.accurate_z)
                continue
            for piece, (chunk, mchunk, start) in enumerate(self._pieces(local, master, offset)):
                # d = eps z, zero outside the mask: every move below is a plain dense add
                d = self._direction(p, index, j, chunk, start, eps)
                if q is not None:
                    d.mul_(unpack_bits(masks[index][piece], chunk.numel()).view(chunk.shape))
                if mchunk is None:
                    for _ in range(abs(to - frm)):
                        chunk.add_(d) if to > frm else chunk.sub_(d)
                elif to != 0:
                    chunk.copy_(torch.add(mchunk, d, alpha=to))
                if grad is not None:
                    self._update(chunk, mchunk, d, grad, group, decays)
                elif mchunk is not None and to == 0:
                    chunk.copy_(mchunk)

    def _update(self, chunk: torch.Tensor, mchunk: torch.Tensor | None, d: torch.Tensor,
                grad: float, group: dict[str, Any], decays: bool) -> None:
        """theta <- theta - lr * (g z + wd theta) on one chunk (and its float32 copy), with
        z = d / eps the direction actually perturbed along (d is zero outside a sparse mask;
        so is the weight decay there). Consumes ``d``."""
        lr = group["lr"]
        target = chunk if mchunk is None else mchunk
        decay = None
        if decays:
            decay = target * (-lr * group["weight_decay"])
            if group["density"] is not None:
                decay.mul_(d != 0)  # d has its lowest bit set inside the mask: never zero there
        step = d.mul_(self._step_scale(grad, group))
        target.add_(step if decay is None else step + decay)  # float64 stays float64
        if mchunk is not None:
            chunk.copy_(mchunk)

    def _step_scale(self, grad: float, group: dict[str, Any]) -> float:
        """−lr·g/eps: the update is this times d (= eps z), g the projected gradient or, with
        ``sign``, its sign."""
        g = math.copysign(1.0, grad) if self.sign and grad != 0 else grad
        return -group["lr"] * g / group["eps"]

    # --- evaluating -----------------------------------------------------------------------

    def _evaluate(self, closure: Callable[[], Any], plan: _Plan, at: int, j: int) -> Any:
        """closure() at offset ``at`` along z_j, as it returned it (read by :meth:`_pair` once
        the step's forwards are all queued: one host synchronization per step, not one per
        forward); on an exception the parameters are restored before it propagates."""
        try:
            value = closure()
            if isinstance(value, torch.Tensor):
                return value.detach()
            if isinstance(value, (tuple, list)):
                return tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in value)
            return value
        except BaseException:
            self._move(plan, at, 0, j)
            raise

    @staticmethod
    def _pair(value: Any) -> tuple[float, float]:
        """(loss sum, weight) of what the closure returned (:meth:`step`'s contract)."""
        try:
            if isinstance(value, tuple):
                total, weight = (float(v) for v in value)
                return total, weight
            return float(value), 1.0
        except (TypeError, ValueError, RuntimeError) as e:
            shape = f" of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else ""
            raise MeZOError(f"MeZO: the closure must return a scalar (a float or a one-element "
                            f"tensor) or a pair (loss sum, weight), not a "
                            f"{type(value).__name__}{shape} ({e})") from None

    def _losses(self, measured: dict[int, tuple[tuple[float, float], tuple[float, float]]],
                by_perturbation: bool) -> list[tuple[float, float]]:
        """(L+, L-) of every perturbation, the same on every rank: from this rank's
        (sum, weight) pairs, summed over the ranks that shared out the batch, or gathered from
        the ranks that shared out the perturbations (one all-reduce either way)."""
        def ratio(total: float, weight: float) -> float:
            return total / weight if weight else math.nan

        if by_perturbation:  # rank r holds perturbations r, r + N, ...: zeros elsewhere
            flat = [0.0] * (2 * self.n_perturbations)
            for j, (plus, minus) in measured.items():
                flat[2 * j:2 * j + 2] = ratio(*plus), ratio(*minus)
            flat = distributed.sum_over_ranks(flat, self.process_group)
            return [(flat[2 * j], flat[2 * j + 1]) for j in range(self.n_perturbations)]
        flat = [x for j in sorted(measured) for pair in measured[j] for x in pair]
        if self.process_group is not None:
            flat = distributed.sum_over_ranks(flat, self.process_group)
        return [(ratio(*flat[4 * j:4 * j + 2]), ratio(*flat[4 * j + 2:4 * j + 4]))
                for j in range(len(measured))]

    def _check_finite(self, losses: list[tuple[float, float]]) -> None:
        """A MeZOError naming the first non-finite loss (the parameters are at theta)."""
        for j, pair in enumerate(losses):
            for side, loss in zip("+-", pair):
                if not math.isfinite(loss):
                    which = f" of perturbation {j}" if self.n_perturbations > 1 else ""
                    where = " (summed over the ranks)" if self.process_group is not None else ""
                    raise MeZOError(f"MeZO step {self.steps_done}: the closure returned {loss}"
                                    f"{where} at the {side}eps perturbation{which}; parameters "
                                    f"restored, step not taken (lower eps or check the "
                                    f"objective)")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """One MeZO step on the closure's batch; returns the mean of (L+ + L-) / 2 over the
        perturbations."""
        if closure is None:
            raise MeZOError("MeZO.step needs a closure that returns the loss of the current "
                            "batch (it is evaluated twice, at theta + eps z and theta - eps z)")
        trained = self._trained()
        eps = self._eps_of(trained)
        sharded = any(distributed.is_dtensor(p) for _, p, _ in trained)
        if sharded and self.process_group is None:
            raise MeZOError("MeZO: the parameters are sharded (DTensors): pass process_group, "
                            "the ranks that hold the shards and evaluate the loss together")
        plan = self._plan(trained)
        by_perturbation = self._splits_perturbations()
        rank, size = self._ranks()
        mine = range(rank, self.n_perturbations, size) if by_perturbation \
            else range(self.n_perturbations)
        measured = {}
        if self.n_perturbations == 1:  # restoring and updating in one move
            self._move(plan, 0, 1)
            plus = self._evaluate(closure, plan, 1, 0)
            self._move(plan, 1, -1)
            minus = self._evaluate(closure, plan, -1, 0)
            try:
                pairs = self._pair(plus), self._pair(minus)
            except BaseException:
                self._move(plan, -1, 0)
                raise
            losses = self._losses({0: pairs}, False)
            if not all(math.isfinite(x) for x in losses[0]):
                self._move(plan, -1, 0)
                self._check_finite(losses)
            grads = [(losses[0][0] - losses[0][1]) / (2 * eps)]
            self._move(plan, -1, 0, grad=grads[0])
        else:
            for j in range(self.n_perturbations):
                # every rank makes every perturbation's moves, evaluated or not: restoring
                # rounds (module docstring), and so the weights stay the same on every rank,
                # and the same as on one process
                self._move(plan, 0, 1, j)
                plus = self._evaluate(closure, plan, 1, j) if j in mine else None
                self._move(plan, 1, -1, j)
                if j in mine:
                    measured[j] = (plus, self._evaluate(closure, plan, -1, j))
                self._move(plan, -1, 0, j)
            losses = self._losses({j: (self._pair(plus), self._pair(minus))
                                   for j, (plus, minus) in measured.items()}, by_perturbation)
            self._check_finite(losses)
            grads = [(lp - lm) / (2 * eps) for lp, lm in losses]
            for j, g in enumerate(grads):  # the mean of the P estimates g_j z_j
                self._move(plan, 0, 0, j, grad=g / self.n_perturbations,
                           decay=j == 0)
        self.last_projected_grads = grads
        self.last_projected_grad = grads[0] if len(grads) == 1 else None
        self.steps_done += 1
        return sum(lp + lm for lp, lm in losses) / (2 * len(losses))

    def _eps_of(self, trained: list[tuple[int, torch.Tensor, dict[str, Any]]]) -> float:
        """The eps of the step: every group perturbed must share one, since g is one scalar."""
        values = {group["eps"] for _, _, group in trained}
        if len(values) != 1:
            raise MeZOError(f"MeZO: parameter groups must share one eps (g is a single "
                            f"finite difference), got {sorted(values)}" if values else
                            "MeZO: no parameter requires grad; nothing to train")
        return values.pop()

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer state plus the step count, seed and options, so a run resumed
        from it draws the same perturbations (and float32 copies with ``master_weights``: of
        this rank's shards, for sharded parameters)."""
        out = super().state_dict()
        out["mezo"] = {"steps_done": self.steps_done, "seed": self.seed,
                       "master_weights": self.master_weights, "sign": self.sign,
                       "backend": self.backend, "n_perturbations": self.n_perturbations,
                       "z_transform": "libdevice" if self.accurate_z else "approximate",
                       "last_projected_grad": self.last_projected_grad,
                       "last_projected_grads": self.last_projected_grads}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; float32 copies stay float32 (the base class would cast
        them to the parameters' dtype)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("mezo", None)
        if extra is None:
            raise MeZOError("MeZO.load_state_dict: not a MeZO state (no 'mezo' entry)")
        masters = {k: v["master"] for k, v in state_dict.get("state", {}).items()
                   if "master" in v}
        state_dict["state"] = {k: {n: t for n, t in v.items() if n != "master"}
                               for k, v in state_dict.get("state", {}).items()}
        # states saved before the rename call the density "sparsity" (same meaning)
        state_dict["param_groups"] = [
            {("density" if k == "sparsity" else k): v for k, v in group.items()}
            for group in state_dict.get("param_groups", [])]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for key, master in masters.items():
            p = params[int(key)]
            self.state[p]["master"] = master.to(device=p.device, dtype=torch.float32, copy=True)
        self.steps_done = int(extra["steps_done"])
        self.seed = int(extra["seed"])
        self.master_weights = bool(extra["master_weights"])
        self.sign = bool(extra["sign"])
        self.backend = extra.get("backend")  # states saved before the kernels have none
        # states saved before the approximate transform have none: continue on their stream
        transform = extra.get("z_transform", "libdevice")
        if transform not in ("libdevice", "approximate"):
            raise MeZOError(f"MeZO.load_state_dict: unknown z_transform {transform!r} (this "
                            f"version knows 'libdevice' and 'approximate')")
        self.accurate_z = transform == "libdevice"
        self.n_perturbations = int(extra.get("n_perturbations", 1))  # 1 before there was a choice
        self.last_projected_grad = extra["last_projected_grad"]
        self.last_projected_grads = list(extra.get("last_projected_grads", []))
