"""Multi-model codecs: T task vectors of one base stored as shared tensors plus a small code
per task, registered by name in :data:`MULTI`.

A multi-model codec compresses several fine-tunes together, per tensor:
``encode(taus, params)`` takes the T task vectors τt = θt − θ0 of one tensor and returns an
:class:`Encoded`: ``shared`` float32 tensors stored once for all tasks and one code per task
(a ``dict`` of small tensors); ``decode(shared, code, params)`` returns task t's
approximation τ̂t in float32, and a reader adds it to the base tensor: θ̂t = θ0 + τ̂t. Neither
compresses one fine-tune alone: ``Store.compress`` refuses them with :func:`multi_only`'s
message. The codecs here:

* ``tall`` (:mod:`.tall`): TALL masks; shared τMTL, per task a bitmask.
* ``rmm`` (:mod:`.rmm`): reversible model merging; a shared basis, per task its
  coefficients.

The store keeps what ``encode`` returns in one of two layouts, chosen by the codec
(:attr:`MultiCodec.layout`):

* ``"entries"`` (TALL): one store entry per task. A shared tensor is a lossless float32 blob
  of as many numbers as the tensor has (a reader takes its bytes as the tensor's float32
  numbers: ``Store.compress_multi`` refuses any other dtype or size); a task's code is a blob
  of the codec's name (:meth:`MultiCodec.pack` gives its header parameters and payload) whose
  header names the shared blobs in ``needs`` and whose ``ref`` is the base tensor's blob.
  :func:`register` also enters that blob form in
  :data:`~mergehub.storage.codecs.LOSSY`, so reading, export, merges and the live composer
  decode the entries as any lossy entry (:meth:`MultiCodec.unpack`, then :meth:`decode`).
* ``"bundle"`` (RMM): one entry for all tasks. For each tensor ``X`` that some task changes,
  its shared tensors are ``X::KEY`` and its codes ``X::KEY`` too, the T tasks' codes stacked
  along a first dimension (the keys in :attr:`MultiCodec.code_keys`); a side file
  (:attr:`MultiCodec.manifest`) names the tasks and the base. ``hub export NAME --task T``
  (:func:`mergehub.storage.tasks.export_task`) rebuilds task T from those and the base.

Adding a multi-model codec is one module in this folder, a :class:`MultiCodec` subclass passed
to :func:`register`, and its name added to the import at the end of
:mod:`mergehub.storage.codecs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from mergehub.errors import spelled
from mergehub.storage.codecs import LossyCodec, register as register_lossy, resolve_params

#: one task's code for one tensor (what :meth:`MultiCodec.decode` reads besides the shared part)
Code = dict[str, torch.Tensor]


@dataclass
class Encoded:
    """What :meth:`MultiCodec.encode` makes of one tensor's T task vectors."""

    shared: dict[str, torch.Tensor]  # float32, stored once
    codes: list[Code]  # one per task, in the order of the task vectors
    #: what the encoder measured on the way, not stored (RMM: each task's ||τt||² and its
    #: residual for each m, which the reversible merge reports)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class MultiCodec:
    """A multi-model codec (see the module docstring). Subclasses set the class attributes and
    implement :meth:`encode` and :meth:`decode`; an ``entries`` codec also :meth:`pack` and
    :meth:`unpack`.

    The contract of :meth:`encode`'s shared tensors: float32, and for an ``entries`` codec each
    with exactly as many numbers as the tensor (any shape: a reader takes the blob's bytes as
    that many float32 numbers); ``Store.compress_multi`` checks both before it writes anything.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    #: its parameters and their defaults
    defaults: ClassVar[dict[str, Any]] = {}
    #: how the store keeps it: an entry per task, or one entry for all (module docstring)
    layout: ClassVar[Literal["entries", "bundle"]]
    #: ``bundle``: the side file naming the tasks (``tasks``) and the base (``base_model``)
    manifest: ClassVar[str] = ""
    #: ``bundle``: the keys of the codes (stacked by task); every other key is shared
    code_keys: ClassVar[tuple[str, ...]] = ()
    #: ``bundle``: what an entry holding it is, and what makes one (for messages)
    made_by: ClassVar[tuple[str, str]] = ("", "")
    #: parameters that may differ per task (one value per task, in the order of the tasks)
    task_params: ClassVar[tuple[str, ...]] = ()

    def store_call(self) -> str:
        """``entries``: the ``Store`` method call that stores T fine-tunes with it (for
        messages)."""
        return f"compress_multi([A, B, ...], {self.name!r})"

    def check(self, params: dict[str, Any]) -> None:
        """Raise ``ValueError`` (one line naming the parameter) for a value the codec cannot
        use."""

    def encode(self, taus: list[torch.Tensor], params: list[dict[str, Any]]) -> Encoded:
        """Shared tensors (float32; see the class docstring) and one code per task for the
        task vectors ``taus`` (float32, one shape) of one tensor; ``params[t]`` are task t's
        resolved parameters. ``Store.compress_multi`` passes only the tasks whose tensor
        differs from the base's (the others keep the base's blob)."""
        raise NotImplementedError

    def decode(self, shared: dict[str, torch.Tensor], code: Code,
               params: dict[str, Any]) -> torch.Tensor:
        """Task t's approximated task vector τ̂t (float32, on the shared tensors' device) from
        the shared tensors and its ``code``. ``params``: for an ``entries`` codec the task
        blob's header parameters (:meth:`pack`'s, with ``shape`` and ``needs``); for a
        ``bundle`` codec the entry's whole :attr:`manifest` (parsed JSON, the same for every
        task)."""
        raise NotImplementedError

    def pack(self, code: Code, params: dict[str, Any],
             shape: tuple[int, ...]) -> tuple[dict[str, Any], bytes]:
        """``entries``: a task's code as the header parameters (with ``shape``) and payload
        of its blob."""
        raise NotImplementedError

    def unpack(self, payload: memoryview, params: dict[str, Any]) -> Code:
        """``entries``: inverse of :meth:`pack`; ``params`` is the blob header's (its
        ``shape`` checked against the tensor's size by the store before this runs)."""
        raise NotImplementedError


def bundle_parts(encoded: Encoded) -> dict[str, torch.Tensor]:
    """One tensor's part of a ``bundle`` entry, by key (``X::KEY`` in the entry), in key order:
    the shared tensors, and each code key's T codes stacked along a new first dimension."""
    parts = dict(encoded.shared)
    for key in encoded.codes[0]:
        parts[key] = torch.stack([code[key] for code in encoded.codes])
    return dict(sorted(parts.items()))


def bundle_task(codec: MultiCodec, parts: dict[str, torch.Tensor],
                task: int) -> tuple[dict[str, torch.Tensor], Code]:
    """Inverse of :func:`bundle_parts` for task ``task``: the shared tensors and its code."""
    return ({key: value for key, value in parts.items() if key not in codec.code_keys},
            {key: value[task] for key, value in parts.items() if key in codec.code_keys})


MULTI: dict[str, MultiCodec] = {}


def multi_only(codec: MultiCodec) -> str:
    """Why ``codec`` does not compress one fine-tune alone, and what stores T of them with it,
    as the caller spells it (:func:`~mergehub.errors.spelled`): the one message for
    ``Store.compress``, ``hub compress NAME`` and an ``entries`` codec's single-tensor
    encoder."""
    if codec.layout == "entries":
        return (f"{codec.name} is a multi-model codec: it compresses two or more fine-tunes of "
                "one base together; use " + spelled(f"Store.{codec.store_call()}",
                                                    f"hub compress A B ... --codec {codec.name}"))
    return (f"{codec.name} is a multi-model codec whose entries only {codec.made_by[0]} "
            f"writes: a recipe with {codec.made_by[1]}, stored with "
            + spelled("mergehub.merge(RECIPE, store=store, to_store=NAME)",
                      "hub merge RECIPE --name NAME"))


def register(codec: MultiCodec) -> MultiCodec:
    """Enter ``codec`` in :data:`MULTI`; an ``entries`` codec's task blobs also in
    :data:`~mergehub.storage.codecs.LOSSY` (decoded as θ0 + τ̂t, encoded only by
    ``Store.compress_multi``: alone it is a ``ValueError``, :func:`multi_only`)."""
    MULTI[codec.name] = codec
    if codec.layout == "entries":
        def encode(theta: torch.Tensor, base: torch.Tensor,
                   params: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
            raise ValueError(multi_only(codec))

        def decode(payload: memoryview, params: dict[str, Any], base: torch.Tensor,
                   extras: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
            shared = {key: value.to(base.device) for key, value in (extras or {}).items()}
            code = {key: value.to(base.device)
                    for key, value in codec.unpack(payload, params).items()}
            return base.float() + codec.decode(shared, code, params).reshape(params["shape"])

        register_lossy(LossyCodec(codec.name, dict(codec.defaults), encode, decode,
                                  codec.summary, check=codec.check))
    return codec


def task_params(codec: MultiCodec, given: dict[str, Any], tasks: int) -> list[dict[str, Any]]:
    """Each task's resolved parameters for the ``entries`` codec ``codec``
    (:func:`~mergehub.storage.codecs.resolve_params` of its ``LOSSY`` form: the codec's
    defaults updated with ``given``), where a parameter of :attr:`MultiCodec.task_params` may be
    one value or a list of one per task. Unknown names, a list of the wrong length and values
    the codec cannot use are a ``ValueError``."""
    per_task = {key: list(given[key]) for key in codec.task_params
                if isinstance(given.get(key), (list, tuple))}
    for key, values in per_task.items():
        if len(values) != tasks:
            raise ValueError(f"{codec.name}: {len(values)} {key}s for {tasks} fine-tunes")
    return [resolve_params(codec.name, {**given, **{key: values[t]
                                                    for key, values in per_task.items()}})
            for t in range(tasks)]
