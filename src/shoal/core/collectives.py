"""Horovod-style collectives on torch tensors: allreduce, allgather, broadcast, alltoall, reducescatter,
barrier, object collectives, async handles, process sets.

This module owns the user-facing collectives (Horovod's spelling: ``allreduce`` / ``allreduce_`` /
``allreduce_async`` / ``allreduce_async_`` / ``synchronize`` / ``poll``). What lives elsewhere: the
world, groups and process sets (:mod:`shoal.core.runtime`), gradient fusion and its own negotiation (the
engine), autograd wrappers (the frontends: ``shoal.torch`` re-exports these functions).

Design constraints:

1. One code path per collective, straight onto torch.distributed on the process set's group (gloo on CPU,
   NCCL on GPU). No transport of our own.
2. Fail loudly, never hang, never return garbage. torch.distributed matches collectives by call order and
   trusts the caller's shapes: a shape mismatch returns garbage or hangs until the process-group timeout.
   So before each call (``check_collectives``, on by default) the members exchange one fixed-size int64
   signature (collective, op, dtype, shape, name hash, root, device, object encoding) with ONE ``all_gather``; on any
   difference every member raises :class:`~shoal.core.errors.MismatchError` with the same message. The
   slow path (a second exchange with full descriptions, to write that message) runs only on failure.
   Cost, measured on an allreduce of 256 floats in a world of one: 175 us with the check vs 49 us without
   on an H200 over NCCL (torch 2.11; the check also syncs the host), 247 vs 83 us on gloo/CPU (torch 2.13,
   2-core machine). Scripts known to be good can set ``SHOAL_CHECK_COLLECTIVES=0``; the gradient engine
   does not go through these functions.
3. A rank whose own arguments are wrong (a list or numpy array for a tensor, ``name=123``, an op Shoal
   cannot honour, splits that do not add up, a root outside the set, an object that cannot be encoded)
   still takes part in the exchange with an error flag, so its peers raise at once instead of waiting for
   a timeout: it raises its own ``TypeError`` / ``ValueError`` (naming the collective and the argument,
   with a HINT), they a :class:`~shoal.core.errors.MismatchError` naming it in ``culprit_ranks``. Every
   argument is checked before the exchange, none after. A ``process_set`` that is not a ``ProcessSet`` at
   all has no group of its own: that rank flags its error in an exchange on the global set, the one group
   every rank has. (Two checks still raise at once, with no exchange, because the rank has no group to
   join: a call before ``init``, and a call on a set that is unregistered or does not include the rank.)
4. Same order on every rank. Names are checked, not used for matching (Horovod negotiated by name).
   Generated names number the calls on each process set (``allreduce.3``: the 4th collective on that
   set), one counter per set rather than per collective, so that they stay aligned across ranks even
   after a caught mismatch of collectives. A second operation with the name of one still in flight on the
   same set (not yet synchronized, its data still moving) is Horovod's error: ``ValueError`` on the rank
   that posts it, carried by the exchange so that the others raise at once (constraint 3). Matching by
   name instead would mean holding every async call back until all members have posted it: its data
   could not move before ``synchronize()``, which removes the overlap async calls exist for (measured in
   docs/robustness.md, "Async operations").
5. Async calls negotiate synchronously (the signature exchange waits for every member); only the data
   movement is asynchronous. A :class:`Handle` holds the torch ``Work`` and the post-processing
   (averaging, postscale, slicing, cast back) that :func:`synchronize` runs once.
6. Backend errors (peer died, timeout, connection closed) are converted by
   :func:`shoal.core.runtime.explain_failure` and raised from the original.
7. A member that never arrives is named, with what it is doing instead, and the normal path pays nothing
   for it: the waits stay the plain blocking calls, free by construction. (A timed ``Work.wait(timeout)``
   would let a rank announce itself after 1 s; wrapped in its helper it measured +4.9% on a 12-int64
   all_gather here, A/A -0.6%, the bare timed wait -0.5%, A/A -0.85%: noise of a shared 2-core machine
   either way, ``benchmarks/results/2026-12-04-negotiation-2.json`` and ``-wait.json``.) Only when a call
   fails by the backend's timeout
   does the rank write where it is ("allreduce of 'x' (call 7 on process set [0, 1])") to the c10d store of
   the default group and read its peers' records, waiting a bounded time for members that time out a
   moment later (:func:`shoal.core.stall.name_missing_members`, the stall inspector's records). The
   error then names each missing member and what it is in: another collective (by its name), a training
   step (those write their record after 1 s of waiting), or none ("never reached a collective (busy or
   hung outside Shoal)").
8. Nothing a peer sends is unpickled on an internal path: signatures and sizes travel as int64 tensors,
   the slow path's descriptions as JSON (:mod:`shoal.core.exchange`), each member's checked before use. Only
   the object collectives in their default mode unpickle, because that is what the user asked for
   (Horovod's ``broadcast_object``); ``trusted=False`` carries plain data without pickle
   (:mod:`shoal.core.plain`), and every member must pass the same mode (it is part of the signature).
9. Join (Horovod's ``hvd.join()``, :mod:`shoal.core.join`). A member inside ``join()`` answers the others'
   collectives with a join signature, when they ask for it: a member whose signature exchange has not
   completed within 50 ms reads the set's join counter from the job's store and, if a member has joined,
   asks it to answer (the normal path pays one timed wait, a condition-variable wait on gloo). Then every
   member exchanges descriptions (JSON) so that the joined ones learn the buffers, and an allreduce or
   grouped allreduce with Sum, Average or Adasum goes on with their zeros (flat on the set's group: the
   stream groups carry their shadow steps), a barrier passes, and anything else raises MismatchError on
   the others, naming the joined ranks. Gloo only: under NCCL the control tensors live on the GPU, where a
   timed wait is not safe, and such a collective times out as before.

Numerics:

* ``op`` takes Horovod's constants (``hvd.Sum``, or their integer values, as Horovod's C++ core does) and
  torch.distributed's ops with their torch meaning: ``ReduceOp.SUM`` / ``AVG`` / ``MIN`` / ``MAX`` /
  ``PRODUCT`` (and ``ReduceOp.RedOpType`` members). Their integer values are not Horovod's (torch's SUM is
  0, Horovod's Average), so they are recognized by type, never converted by value. ``BAND``, ``BOR``,
  ``BXOR`` and ``PREMUL_SUM`` are refused with a HINT (NCCL has no bitwise reduction; a pre-multiplied sum
  is ``prescale_factor`` with ``Sum``). Names as strings are refused, as in Horovod.
* ``Average`` = sum, then divide by the process-set size. Integer tensors keep their dtype and the quotient
  is truncated toward zero, as Horovod's C++ core does on CPU and CUDA (its averaging is a postscale by
  ``1 / size`` computed in double and stored into the integer: ``ScaleBufferCPUImpl``; Horovod's own test
  suite checks ``div(rounding_mode="trunc")``); bool supports only ``Min``/``Max``.
* ``Adasum`` (allreduce and grouped_allreduce of floating-point tensors): Horovod's adaptive summation,
  tensor by tensor (a grouped call combines each tensor on its own), by the engine's algorithm
  (:mod:`shoal.core.algorithms.adasum`). reducescatter refuses it, as Horovod does.
* Dtypes the backend cannot carry (gloo has no int16, uint16/32/64 or float8): moving collectives
  (allgather, broadcast, alltoall) move their bytes (a uint8 view: no arithmetic, any dtype); reductions run
  in a wider dtype that holds every partial result's low bits (int16/uint16 in int32, uint32/uint64 in int64,
  float8 in float32) and cast back once, so integer sums wrap exactly as in the tensor's own dtype.
* ``prescale_factor`` multiplies before the reduction and ``postscale_factor`` after it (integers: computed in
  float64 and truncated toward zero, as Horovod's C++ scaling does).
* float16/bfloat16 ``Sum``/``Average``/``Product`` on CPU tensors are reduced in float32 and cast back once.
  Measured with gloo on 4 ranks (1M random normals): reducing in the 16-bit type gave a result different from
  the correctly rounded sum on 33% of the elements (every hop rounds); reducing in float32 gave 0%, at the same
  or lower time (fp16: 12 ms vs 17 ms; bf16: 16 ms vs 17 ms). GPU tensors (NCCL) stay in their own dtype.

Glossary:
    process set   a registered subset of ranks with its own group (``runtime.ProcessSet``); None = all ranks
    signature     the fixed-size int64 description of a call, exchanged before it (constraint 2)
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import numbers
import operator
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist

from . import exchange, plain, runtime, stall
from .algorithms import start_adasum, start_allreduce
from .errors import MismatchError, NotInitializedError, RankFailureError, ShoalError, format_ranks
from .registration import hash64
from .ops import Adasum, Average, Max, Min, Product, ReduceOp, Sum, resolve_op
from .runtime import ProcessSet

__all__ = [
    "ReduceOp",
    "Average",
    "Sum",
    "Adasum",
    "Min",
    "Max",
    "Product",
    "Handle",
    "allreduce",
    "allreduce_",
    "allreduce_async",
    "allreduce_async_",
    "grouped_allreduce",
    "grouped_allreduce_",
    "grouped_allreduce_async",
    "grouped_allreduce_async_",
    "allgather",
    "allgather_async",
    "sparse_allreduce_async",
    "broadcast",
    "broadcast_",
    "broadcast_async",
    "broadcast_async_",
    "alltoall",
    "alltoall_async",
    "reducescatter",
    "reducescatter_async",
    "grouped_allgather",
    "grouped_allgather_async",
    "grouped_reducescatter",
    "grouped_reducescatter_async",
    "barrier",
    "broadcast_object",
    "allgather_object",
    "poll",
    "synchronize",
]

log = logging.getLogger(__name__)


_TORCH_OPS = {
    ReduceOp.Average: dist.ReduceOp.SUM,  # sum on the wire, divide after (works on every backend)
    ReduceOp.Sum: dist.ReduceOp.SUM,
    ReduceOp.Min: dist.ReduceOp.MIN,
    ReduceOp.Max: dist.ReduceOp.MAX,
    ReduceOp.Product: dist.ReduceOp.PRODUCT,
}

_ProcessSetArg = Optional[ProcessSet]

# torch 2.13 renamed the tensor-in/tensor-out forms (the old names warn); torch >= 2.4 has the old ones only.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# ---------------------------------------------------------------------------------------------------------
# Signatures (constraint 2)
# ---------------------------------------------------------------------------------------------------------

_KINDS = ("allreduce", "grouped_allreduce", "allgather", "broadcast", "alltoall", "reducescatter",
          "barrier", "broadcast_object", "allgather_object", "join")
#: The signature of a member inside ``join()`` (constraint 9).
_JOIN_KIND = _KINDS.index("join") + 1
#: What a joined member takes part in: reductions to which it adds zeros (Horovod's semantics).
_JOINABLE_KINDS = ("allreduce", "grouped_allreduce")
_JOINABLE_OPS = (ReduceOp.Sum, ReduceOp.Average, ReduceOp.Adasum)
#: Collectives whose first dimension may differ across ranks.
_RAGGED_KINDS = ("allgather", "alltoall")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
           torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)
#: "SHOALv1" as an int64: lets a rank see that a peer sent something that is not a signature.
_MAGIC = 0x53484F414C7631

(_F_MAGIC, _F_KIND, _F_OP, _F_DTYPE, _F_NDIM, _F_DIM0, _F_REST, _F_NAME, _F_ROOT, _F_COUNT, _F_DEVICE,
 _F_ERROR, _F_MODE) = range(13)
_SIG_LEN = 13
#: Human names of the compared fields, in the order they are reported.
_FIELD_NAMES = {_F_KIND: "collective", _F_NAME: "name", _F_OP: "op", _F_DTYPE: "dtype", _F_NDIM: "shape",
                _F_DIM0: "shape", _F_REST: "shape", _F_ROOT: "root rank", _F_COUNT: "tensor count or splits",
                _F_DEVICE: "device", _F_MODE: "trusted"}
#: The object collectives' encodings (the _F_MODE field; 0 for every other collective).
_MODE_PICKLE, _MODE_PLAIN = 1, 2

_HALF_TYPES = (torch.float16, torch.bfloat16)
#: Dtypes every backend carries (gloo's list is the shortest). Others move as bytes (constraint "Numerics").
_NATIVE = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
                     torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128})
#: Reductions of dtypes the backend lacks: the dtype they are reduced in. Integer sums and products taken in
#: a wider two's-complement type have the same low bits, so the cast back wraps exactly as the narrow type's
#: own arithmetic would; Min/Max are exact for every value the narrow type holds (uint64: below 2**63).
_WIDER = {torch.int16: torch.int32, torch.uint16: torch.int32, torch.uint32: torch.int64,
          torch.uint64: torch.int64,
          **{d: torch.float32 for d in (getattr(torch, n, None) for n in (
              "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")) if d is not None}}


def _as_bytes(t: torch.Tensor, keep_dim0: bool = True) -> torch.Tensor:
    """``t`` itself when the backend carries its dtype; else a uint8 view of its memory (contiguous ``t``):
    ``(dim0, bytes per row)`` when ``keep_dim0``, flat otherwise."""
    if t.dtype in _NATIVE:
        return t
    if keep_dim0 and t.dim() > 0:
        rows = t.reshape(t.shape[0], math.prod(t.shape[1:]))  # explicit: -1 is ambiguous for empty tensors
    else:
        rows = t.reshape(t.numel())
    return rows.view(torch.uint8)


def _dtype_code(dtype: Optional[torch.dtype]) -> int:
    if dtype is None:
        return 0
    try:
        return _DTYPES.index(dtype) + 1
    except ValueError:
        return 1000 + hash64(str(dtype)) % 1000


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(slots=True)
class _Call:
    """One collective as this rank submitted it: what the signature and the error messages are made of."""

    kind: str
    name: str
    ps: ProcessSet
    op: Optional[ReduceOp] = None
    dtype: Optional[torch.dtype] = None
    shape: Optional[tuple[int, ...]] = None
    root: int = -1
    #: grouped_allreduce: number of tensors; alltoall: 1 when splits were given.
    count: int = 0
    #: grouped_allreduce: (dtype, shape) of every tensor.
    entries: tuple[tuple[torch.dtype, tuple[int, ...]], ...] = ()
    device: str = ""
    #: A local argument error, raised after the exchange (constraint 3).
    error: Optional[BaseException] = None
    #: The call's number on its process set (constraint 4): where the stall inspector places it.
    seq: int = 0
    #: Object collectives: _MODE_PICKLE or _MODE_PLAIN (constraint 8).
    mode: int = 0
    #: The caller gave the name (generated names are unique; given ones may collide, constraint 4).
    named: bool = False

    @property
    def label(self) -> str:
        return f"{self.kind} of '{self.name}'"

    @property
    def where(self) -> str:
        """The call as other ranks' messages name it (constraint 7)."""
        return f"{self.label} (call {self.seq} on process set {list(self.ps.ranks)})"

    def signature(self) -> list[int]:
        sig = [0] * _SIG_LEN
        sig[_F_MAGIC] = _MAGIC
        sig[_F_KIND] = _KINDS.index(self.kind) + 1
        sig[_F_OP] = -1 if self.op is None else int(self.op)
        sig[_F_DTYPE] = _dtype_code(self.dtype)
        if self.shape is not None:
            sig[_F_NDIM] = len(self.shape)
            sig[_F_DIM0] = self.shape[0] if self.shape else -1
            sig[_F_REST] = hash64(repr(self.shape[1:]))
        if self.entries:
            sig[_F_REST] = hash64(repr([(_dtype_code(d), s) for d, s in self.entries]))
        sig[_F_NAME] = hash64(self.name)
        sig[_F_ROOT] = self.root
        sig[_F_COUNT] = self.count
        sig[_F_DEVICE] = {"": 0, "cpu": 1, "cuda": 2}.get(self.device, 3)
        sig[_F_ERROR] = 1 if self.error is not None else 0
        sig[_F_MODE] = self.mode
        return sig

    def describe(self) -> dict:
        """Full description for the mismatch message (sent only on the slow path)."""
        parts = []
        if self.kind == "grouped_allreduce":
            shown = ", ".join(f"{_short(d)} {list(s)}" for d, s in self.entries[:4])
            more = f", ... ({len(self.entries)} tensors)" if len(self.entries) > 4 else ""
            parts.append(f"{len(self.entries)} tensors [{shown}{more}]")
        elif self.dtype is not None:
            parts.append(f"{_short(self.dtype)} {list(self.shape or ())}")
        if self.op is not None:
            parts.append(f"op {self.op.name}")
        if self.root >= 0:
            parts.append(f"root {self.root}")
        if self.kind == "alltoall":
            parts.append("splits given" if self.count else "even splits")
        if self.device and self.device != "cpu":
            parts.append(f"on {self.device}")
        if self.mode:
            parts.append("trusted=True (pickle)" if self.mode == _MODE_PICKLE else "trusted=False (plain data)")
        return {
            "label": self.label,
            "text": f"{self.label}: {', '.join(parts)}" if parts else self.label,
            "entries": [(_short(d), list(s)) for d, s in self.entries],
            "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
            "wire": self.wire_buffers(),
        }

    def wire_buffers(self) -> list:
        """What a reduction puts on the wire, for a joined member to add zeros of the same shape (constraint
        9): ``[dtype, numel, tensor sizes]`` per flat buffer, in the order the data path reduces them."""
        if self.kind not in _JOINABLE_KINDS or self.op is None or self.error is not None:
            return []
        dev = torch.device(self.device or "cpu")
        if self.kind == "allreduce":
            numel = math.prod(self.shape or ())
            return [[_short(_wire_dtype(self.dtype, dev, self.op)), numel, [numel]]]
        buckets: dict[torch.dtype, list[int]] = {}
        for d, shape in self.entries:
            buckets.setdefault(d, []).append(math.prod(shape))
        return [[_short(_wire_dtype(d, dev, self.op)), sum(sizes), sizes] for d, sizes in buckets.items()]


#: Calls so far on each process set (by id), for generated names (constraint 4).
_counters: dict[Optional[int], int] = {}


def _brief(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _a(value: Any) -> str:
    """``value``'s type with its article: "a list", "an int"."""
    name = _type_name(value)
    return ("an " if name[0] in "aeiou" else "a ") + name


def _begin(kind: str, name: Any, process_set: Any) -> _Call:
    """Checks shared by every collective: initialized, registered set, caller is a member; the name.

    A ``process_set`` or ``name`` of the wrong type becomes the call's flagged error (constraint 3): the
    call goes on, on the global set and with a generated name, so that its exchange tells the peers."""
    if not runtime.is_initialized():
        raise NotInitializedError(kind)
    error: Optional[BaseException] = None
    if process_set is not None and not isinstance(process_set, ProcessSet):
        error = TypeError(
            f"shoal: {kind}: process_set={_brief(process_set)} is {_a(process_set)}, not a "
            "ProcessSet. HINT: pass the set that hvd.add_process_set([...]) returned, or None (every rank).")
        process_set = None
    if name is not None and not isinstance(name, str):
        error = error or TypeError(
            f"shoal: {kind}: name={_brief(name)} is {_a(name)}, not a str. HINT: pass a string "
            "(name=f\"loss.{step}\"), or leave it out; names label the call in errors and are compared "
            "across ranks.")
        name = None
    ps = runtime.get_process_set(process_set)
    me = dist.get_rank()
    key = ps.process_set_id
    count = _counters.get(key, 0)
    what = f"{kind} of '{name}'" if name is not None else kind
    if me not in ps.ranks:
        raise ValueError(
            f"shoal: rank {me} called {what} on process set {list(ps.ranks)}, which does not include it. "
            "HINT: only members may call a collective on a process set: guard the call with "
            "`if process_set.included():`.")
    # Counted whether or not a name is given, so that generated names stay aligned across ranks.
    _counters[key] = count + 1
    if name is not None and error is None:
        error = _in_flight_error(kind, name, ps)
    return _Call(kind=kind, name=name if name is not None else f"{kind}.{count}", ps=ps, seq=count, error=error,
                 named=name is not None)


#: Operations posted with a name of the caller's and not yet synchronized, by (process set id, name)
#: (constraint 4). Strong references: a handle dropped unsynchronized stays until its data has moved.
_in_flight: dict[tuple[Optional[int], str], "Handle"] = {}


def _in_flight_error(kind: str, name: str, ps: ProcessSet) -> Optional[ValueError]:
    """Horovod's error for a name still in flight on ``ps`` (constraint 4), or None."""
    key = (ps.process_set_id, name)
    other = _in_flight.get(key)
    if other is None:
        return None
    if other.poll():
        del _in_flight[key]
        return None
    return ValueError(f"shoal: {kind} of '{name}': an operation with this name is still in flight on process set "
                      f"{list(ps.ranks)} ({other._call.label}, posted and not yet synchronized). HINT: give "
                      "concurrent operations distinct names, or synchronize the first one before reusing its name.")


@contextlib.contextmanager
def _deferred(call: _Call) -> Iterator[None]:
    """Keep a local argument error for after the exchange (constraint 3) instead of raising it now."""
    try:
        yield
    except (ValueError, TypeError, NotImplementedError) as exc:
        if call.error is None:
            call.error = exc


def _explain(call: _Call, exc: BaseException) -> RankFailureError:
    err = runtime.explain_failure(exc, what=call.label, ranks=call.ps.ranks)
    # A timeout: write where this rank is, name the members that never came (constraint 7).
    return stall.name_missing_members(err, call.ps, call.seq, call.where)


@contextlib.contextmanager
def _converting(call: _Call) -> Iterator[None]:
    """Turn a backend failure into a RankFailureError naming the collective and the cause (constraint 6)."""
    try:
        yield
    except ShoalError:
        raise
    except RuntimeError as exc:
        raise _explain(call, exc) from exc


def _ctl_device() -> torch.device:
    """Where small control tensors live: the rank's GPU under NCCL (it cannot move CPU tensors), else CPU."""
    return runtime.device()


def _negotiate(call: _Call) -> Optional[list[list[int]]]:
    """Exchange signatures; raise on any mismatch. Returns every member's signature (a list per member,
    in set order), or None when checking is off. Members inside ``join()`` answer with the join
    signature (constraint 9): a reduction goes on with their zeros, a barrier is passed, anything else
    raises here naming them."""
    if not runtime.config().check_collectives:
        if call.error is not None:
            raise call.error
        return None
    ps = call.ps
    try:
        rows = _exchange_signatures(call, waiting_on_joined=True)
    except RankFailureError as exc:
        if call.error is not None:  # this rank's own arguments are what to fix first
            raise call.error from exc
        raise
    joined = [r for r, row in zip(ps.ranks, rows) if row[_F_KIND] == _JOIN_KIND]
    differing, rejected = _compare(call, rows)
    if not joined and not differing and not rejected:
        return rows
    log.debug("shoal: %s: signatures differ in fields %s, a rank rejected it, or ranks %s joined; "
              "gathering details", call.label, differing, joined)
    details = _gather_descriptions(call)
    if call.error is not None:
        raise call.error
    if differing or rejected:
        active = [(r, d) for r, d in zip(ps.ranks, details) if r not in joined]
        rejecting = [r for r, row in zip(ps.ranks, rows) if row[_F_ERROR]]
        raise MismatchError(_mismatch_message([r for r, _ in active], [d for _, d in active], differing),
                            culprit_ranks=rejecting)
    if call.kind == "barrier" or (call.kind in _JOINABLE_KINDS and call.op in _JOINABLE_OPS):
        return rows
    raise MismatchError(
        f"shoal: {call.label} on process set {list(ps.ranks)}: {format_ranks(joined)} called join() (out of "
        f"data) and take{'s' if len(joined) == 1 else ''} part only in allreduce (adding zeros, as Horovod's "
        f"joined ranks do) and barrier; a {call.kind} needs every member's data. HINT: call {call.kind} "
        "before join(), or let every rank reach it (e.g. give every rank the same number of batches).",
        culprit_ranks=joined)


def _exchange_signatures(call: _Call, waiting_on_joined: bool) -> list[list[int]]:
    """The all_gather of every member's signature (one int64 row each), as Python lists."""
    ps = call.ps
    n = len(ps.ranks)
    mine = torch.tensor(call.signature(), dtype=torch.int64, device=_ctl_device())
    gathered = torch.empty(n * _SIG_LEN, dtype=torch.int64, device=_ctl_device())
    with _converting(call):
        work = _all_gather_single(gathered, mine, group=ps.group, async_op=True)
        if waiting_on_joined:
            _wait_waking_joined(work, call)
        else:
            work.wait()
    # One host copy, then plain Python: comparing columns with torch ops cost ~0.2 ms per call (profiled).
    rows = gathered.view(n, _SIG_LEN).tolist()
    not_sig = [ps.ranks[i] for i, row in enumerate(rows) if row[_F_MAGIC] != _MAGIC]
    if not_sig:
        # The peer is inside some other, unchecked collective: a second exchange could not pair up.
        raise MismatchError(
            f"shoal: {call.label} on process set {list(ps.ranks)}: rank(s) {not_sig} did not submit a "
            "checked Shoal collective at this point (they ran another torch.distributed call, or "
            "check_collectives differs across ranks). HINT: set SHOAL_CHECK_COLLECTIVES the same on every "
            "rank and call the same collectives in the same order.")
    return rows


#: How long a member waits on the signature exchange before it looks for joined members, and then between
#: looks (constraint 9): the delay a call pays while a member is joined, and the store requests a rank
#: makes while its peers are slow to arrive (one per 50 ms of waiting).
_JOIN_POLL = datetime.timedelta(milliseconds=50)


def _wait_waking_joined(work: Any, call: _Call) -> None:
    """Wait for the signature exchange; while it lasts, look every ``_JOIN_POLL`` whether a member of the
    set is inside ``join()``, and if so ask it (once) to answer this call (constraint 9).

    A timed ``wait`` on gloo is a condition-variable wait that leaves the operation running; the normal
    path (every member arrives within 50 ms) pays one such wait. Under NCCL (a device control tensor) a
    timed wait may tear the communicator down, so the wait stays the plain one there."""
    if _ctl_device().type != "cpu":
        work.wait()
        return
    from . import join as _join  # noqa: PLC0415 (join imports this module)

    while True:
        try:
            work.wait(_JOIN_POLL)
            return
        except RuntimeError:
            if work.is_completed():  # a real failure (or it finished just now): wait() says which
                work.wait()
                return
        if _join.wake_joined(call.ps, call.seq):
            work.wait()  # a joined member answers now; a dead one fails the exchange by the group's timeout
            return


def _compare(call: _Call, rows: list[list[int]]) -> tuple[list[int], bool]:
    """Fields that differ among the members not inside ``join()``, and whether one rejected the call."""
    active = [row for row in rows if row[_F_KIND] != _JOIN_KIND] or rows
    first = active[0]
    compared = [_F_KIND, _F_NAME, _F_OP, _F_DTYPE, _F_NDIM, _F_DIM0, _F_REST, _F_ROOT, _F_COUNT, _F_DEVICE,
                _F_MODE]
    kind = _KINDS[first[_F_KIND] - 1] if 1 <= first[_F_KIND] <= len(_KINDS) else ""
    if kind in _RAGGED_KINDS and all(row[_F_KIND] == first[_F_KIND] for row in active):
        compared.remove(_F_DIM0)
    differing = [c for c in compared if any(row[c] != first[c] for row in active)]
    return differing, any(row[_F_ERROR] for row in active)


def _gather_descriptions(call: _Call) -> list[dict]:
    """Every member's :meth:`_Call.describe`, as JSON, never pickle (constraint 8), each checked."""
    with _converting(call):
        payloads = exchange.allgather_bytes(exchange.encode(call.describe()), group=call.ps.group,
                                            device=_ctl_device())
    return [_read_description(data) for data in payloads]


def next_call_number(process_set: ProcessSet) -> int:
    """The number the next collective on ``process_set`` will get (constraint 4)."""
    return _counters.get(process_set.process_set_id, 0)


def _joined(rows: Optional[list[list[int]]]) -> bool:
    """Whether a member answered with the join signature (constraint 9)."""
    return rows is not None and any(row[_F_KIND] == _JOIN_KIND for row in rows)


def serve_joined(process_set: Optional[ProcessSet]) -> bool:
    """One answer of a member inside ``join()`` to the others' next user collective (constraint 9):
    exchange the join signature; when every member is joined, return True; otherwise add zeros to
    their reduction (or nothing, for a barrier or a call they will refuse) and return False.

    Called by :func:`shoal.core.join.join` only, when another member asked for it or every member has
    joined. Raises what the exchanges raise (a dead peer, the group's timeout).
    """
    call = _begin("join", None, process_set)
    ps = call.ps
    rows = _exchange_signatures(call, waiting_on_joined=False)
    joined = [r for r, row in zip(ps.ranks, rows) if row[_F_KIND] == _JOIN_KIND]
    if len(joined) == len(ps.ranks):
        return True
    differing, rejected = _compare(call, rows)
    details = _gather_descriptions(call)
    active = [(row, d) for row, d in zip(rows, details) if row[_F_KIND] != _JOIN_KIND]
    row, desc = active[0]
    kind = _KINDS[row[_F_KIND] - 1] if 1 <= row[_F_KIND] <= len(_KINDS) else ""
    op = row[_F_OP]
    if differing or rejected or kind not in _JOINABLE_KINDS or op not in [int(o) for o in _JOINABLE_OPS]:
        return False  # the others raise (a mismatch, a rejection, a collective a joined rank cannot join)
    _add_zeros(call, ReduceOp(op), _wire_from(desc, call))
    return False


def _wire_from(desc: dict, call: _Call) -> list[tuple[torch.dtype, int, list[int]]]:
    """The wire buffers a peer described (:meth:`_Call.wire_buffers`), checked: a peer's bytes are data."""
    out = []
    wire = desc.get("wire")
    for entry in wire if isinstance(wire, list) else [None]:
        ok = (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
              and type(entry[1]) is int and entry[1] >= 0 and isinstance(entry[2], list)
              and all(type(v) is int and v >= 0 for v in entry[2]) and sum(entry[2]) == entry[1])
        dtype = getattr(torch, entry[0], None) if ok else None
        if not isinstance(dtype, torch.dtype):
            raise MismatchError(f"shoal: rank {runtime.rank()} (inside join()) received a description of "
                                f"{call.label}'s buffers that is not Shoal's. HINT: every rank must run the "
                                "same version of Shoal.")
        out.append((dtype, entry[1], entry[2]))
    return out


def _add_zeros(call: _Call, op: ReduceOp, wire: list[tuple[torch.dtype, int, list[int]]]) -> None:
    """Take part in the others' reduction with zeros, along their exact data path (same buffers, same
    algorithm, same order), and wait for it."""
    ps = call.ps
    device = _ctl_device()
    works = []
    with torch.no_grad(), _converting(call):
        for dtype, numel, sizes in wire:
            buf = torch.zeros(numel, dtype=dtype, device=device)
            if op is ReduceOp.Adasum:
                works.append(start_adasum(buf, ps, sizes))
            else:  # flat on the set's group, as the others do when a member has joined
                works.append(dist.all_reduce(buf, op=_TORCH_OPS[op], group=ps.group, async_op=True))
        for w in works:
            w.wait()


def _read_description(data: bytes) -> dict:
    """A member's :meth:`_Call.describe`, from its JSON; a stand-in when it is not one (a peer's bytes are
    data: they may be anything, and must not break the message every rank builds from them)."""
    try:
        d = exchange.decode(data)
    except (ValueError, RecursionError):
        d = None
    if (type(d) is dict and type(d.get("label")) is str and type(d.get("text")) is str
            and (d.get("error") is None or type(d["error"]) is str) and type(d.get("entries")) is list
            and all(type(e) is list and len(e) == 2 and type(e[0]) is str and type(e[1]) is list
                    for e in d["entries"])):
        return d
    return {"label": "(unreadable)", "text": "sent a description that is not Shoal's", "entries": [],
            "error": None}


def _mismatch_message(ranks: Sequence[int], details: list[dict], differing: list[int]) -> str:
    """The same text on every rank: built only from the gathered descriptions, in rank order."""
    labels = list(dict.fromkeys(d["label"] for d in details))
    if _F_KIND in differing:  # different collectives: their op/root/shape fields are not comparable
        differing = [c for c in differing if c in (_F_KIND, _F_NAME)]
    fields = list(dict.fromkeys(_FIELD_NAMES[c] for c in differing))
    rejected = [(r, d) for r, d in zip(ranks, details) if d["error"]]
    if rejected:
        head = (f"shoal: {format_ranks([r for r, _ in rejected])} rejected {' / '.join(labels)}, so every "
                f"rank of process set {list(ranks)} stops here")
    else:
        head = (f"shoal: ranks disagree on {' vs '.join(labels)} (process set {list(ranks)}): "
                f"{', '.join(fields)} differ{'s' if len(fields) == 1 else ''}")
    # Group identical descriptions so a large world stays readable.
    groups: dict[str, list[int]] = {}
    for r, d in zip(ranks, details):
        text = d["text"] + (f" -- REJECTED: {d['error']}" if d["error"] else "")
        groups.setdefault(text, []).append(r)
    lines = [head + ":"]
    lines += [f"  {format_ranks(rs)}: {text}" for text, rs in groups.items()]
    entry_lists = [d["entries"] for d in details]
    if any(entry_lists) and any(e != entry_lists[0] for e in entry_lists):
        i = next(i for i in range(max(len(e) for e in entry_lists))
                 if len({repr(e[i]) if i < len(e) else "missing" for e in entry_lists}) > 1)
        per_rank = "; ".join(f"rank {r}: " + (f"{e[i][0]} {e[i][1]}" if i < len(e) else "missing")
                             for r, e in zip(ranks, entry_lists))
        lines.append(f"  first difference at tensor {i}: {per_rank}")
    if rejected:
        hint = "fix the arguments on the rejecting rank (its own error is above)."
    elif set(fields) <= {"shape", "dtype", "device", "tensor count or splits"}:
        hint = ("every rank must pass tensors of the same dtype and shape (allgather/alltoall: the same "
                "dimensions after the first) on the same kind of device.")
    else:
        hint = ("every rank must call the same collectives in the same order with the same name, op and "
                "root; torch.distributed pairs calls by order, not by name. Look for rank-dependent code "
                "(e.g. `if hvd.rank() == 0:`) before this call.")
    lines.append("HINT: " + hint)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Handles
# ---------------------------------------------------------------------------------------------------------

class Handle:
    """What every ``*_async`` call returns: pass it to :func:`poll` or :func:`synchronize`.

    Holds the torch ``Work`` objects of the data movement and the post-processing to run once they finish
    (averaging, postscale, slicing, cast back, copy into an in-place target).
    """

    __slots__ = ("_call", "_works", "_finish", "_result", "_done")

    def __init__(self, call: _Call, works: Sequence[Any], finish: Callable[[], Any]):
        self._call = call
        self._works = list(works)
        self._finish = finish
        self._result: Any = None
        self._done = False
        if call.named and self._works:
            _in_flight[(call.ps.process_set_id, call.name)] = self

    @property
    def name(self) -> str:
        return self._call.name

    def poll(self) -> bool:
        """True when the data movement has finished (``wait`` will not block)."""
        return self._done or all(w.is_completed() for w in self._works)

    def wait(self) -> Any:
        """Block until done; run the post-processing once; return the result (again on later calls)."""
        if not self._done:
            with _converting(self._call):
                for w in self._works:
                    w.wait()
            self._result = self._finish()
            self._done = True
            self._works = []
            self._finish = None
            key = (self._call.ps.process_set_id, self._call.name)
            if _in_flight.get(key) is self:
                del _in_flight[key]
        return self._result

    def __call__(self) -> Any:
        """The same as :meth:`wait` (Horovod's ``sparse_allreduce_async`` returns a function to call)."""
        return self.wait()

    def __repr__(self) -> str:
        state = "done" if self._done else "in flight"
        return f"<shoal Handle {self._call.label} ({state})>"


def poll(handle: Handle) -> bool:
    """Return True when the operation behind ``handle`` has completed.

    Example:
        >>> h = hvd.allreduce_async(t)
        >>> while not hvd.poll(h): do_other_work()
        >>> out = hvd.synchronize(h)
    """
    return _as_handle(handle, "poll").poll()


def synchronize(handle: Handle) -> Any:
    """Wait for ``handle`` and return its result (a tensor; a list for grouped calls; ``(output,
    received_splits)`` for alltoall).

    Raises:
        RankFailureError: a peer died or timed out during the operation (names the cause).
    """
    return _as_handle(handle, "synchronize").wait()


def _as_handle(handle: Any, what: str) -> Handle:
    if not isinstance(handle, Handle):
        raise TypeError(f"shoal: {what}() expects the handle returned by an *_async call, got "
                        f"{type(handle).__name__}. HINT: keep the object that allreduce_async (etc.) returned.")
    return handle


def _done_handle(call: _Call, value: Any) -> Handle:
    return Handle(call, [], lambda: value)


# ---------------------------------------------------------------------------------------------------------
# Shared helpers for reductions
# ---------------------------------------------------------------------------------------------------------

def _check_tensor(call: _Call, tensor: Any, min_ndim: int = 0, arg: str = "tensor") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"shoal: {call.label}: {arg} must be a torch.Tensor, got {_type_name(tensor)}. "
                        "HINT: wrap the value with torch.as_tensor(...).")
    if tensor.layout != torch.strided:
        raise ValueError(f"shoal: {call.label}: {arg} is a {tensor.layout} tensor, which is not supported. "
                         "HINT: reduce tensor.to_dense(), or allgather the indices and values.")
    if tensor.dim() < min_ndim:
        raise ValueError(f"shoal: {call.label} needs a tensor with at least one dimension (it works on the "
                         "first one), got a 0-d tensor. HINT: pass tensor.reshape(1).")


def _check_factor(call: _Call, value: Any, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"shoal: {call.label}: {arg}={_brief(value)} is {_a(value)}, not a number. "
                        f"HINT: pass a float, e.g. {arg}=1.0 / hvd.size() (float(t) for a 0-d tensor).")
    if not math.isfinite(value):
        raise ValueError(f"shoal: {call.label}: {arg}={value} is not finite. HINT: pass a finite float.")
    return float(value)


def _tensor_list(call: _Call, tensors: Any) -> list:
    """``tensors`` of a grouped call as a list (each element is checked by the caller)."""
    if isinstance(tensors, (torch.Tensor, str, bytes, Mapping)) or not isinstance(tensors, Iterable):
        raise TypeError(f"shoal: {call.label}: tensors must be a list or tuple of torch.Tensors, got "
                        f"{_type_name(tensors)}. HINT: wrap a single tensor in a list: [t].")
    return list(tensors)


def _check_reducible(call: _Call, dtype: torch.dtype, op: ReduceOp) -> None:
    if dtype == torch.bool and op not in (ReduceOp.Min, ReduceOp.Max):
        raise ValueError(f"shoal: {call.label}: op {op.name} is not defined for bool tensors. HINT: use "
                         "op=hvd.Min (logical and) or op=hvd.Max (logical or), or cast to an integer dtype.")
    if op is ReduceOp.Adasum and not (dtype.is_floating_point and dtype.itemsize >= 2):
        raise ValueError(f"shoal: {call.label}: Adasum combines gradients by their dot products and needs "
                         f"floating-point tensors, got {_short(dtype)}. HINT: use op=hvd.Sum for integers.")
    if dtype == torch.uint64 and op in (ReduceOp.Min, ReduceOp.Max):
        raise ValueError(f"shoal: {call.label}: op {op.name} of uint64 is not supported (no backend compares "
                         "unsigned 64-bit integers). HINT: cast to int64 when the values are below 2**63.")


def _wire_dtype(dtype: torch.dtype, device: torch.device, op: ReduceOp) -> torch.dtype:
    """The dtype a reduction runs in (see "Numerics" in the module docstring): float32 for 16-bit floats
    summed on CPU and for Adasum of 16-bit floats anywhere; a wider dtype for those the backend lacks."""
    if dtype in _HALF_TYPES and (op is ReduceOp.Adasum or device.type == "cpu" and op in (
            ReduceOp.Sum, ReduceOp.Average, ReduceOp.Product)):
        return torch.float32
    return _WIDER.get(dtype, dtype)


def _scale_(buf: torch.Tensor, factor: float) -> None:
    if factor == 1.0:
        return
    if buf.is_floating_point() or buf.is_complex():
        buf.mul_(factor)
    else:
        # Integers: scale in float64 and truncate toward zero (copy_ casts), like Horovod's C++ scaling.
        buf.copy_(buf.to(torch.float64).mul_(factor))


def _post_reduce_(buf: torch.Tensor, op: ReduceOp, set_size: int, postscale_factor: float) -> None:
    if op is ReduceOp.Average:
        if buf.is_floating_point() or buf.is_complex():
            buf.div_(set_size)
        else:
            buf.div_(set_size, rounding_mode="trunc")
    _scale_(buf, postscale_factor)


def _wire_copy(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return src.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


# ---------------------------------------------------------------------------------------------------------
# allreduce
# ---------------------------------------------------------------------------------------------------------

def _start_allreduce(tensor: torch.Tensor, average: Optional[bool], name: Optional[str], op: Any,
                     prescale_factor: float, postscale_factor: float, process_set: _ProcessSetArg,
                     inplace: bool) -> Handle:
    call = _begin("allreduce", name, process_set)
    with _deferred(call):
        _check_tensor(call, tensor)
        call.dtype, call.shape, call.device = tensor.dtype, tuple(tensor.shape), tensor.device.type
        call.op = resolve_op(op, average, call.label)
        _check_reducible(call, tensor.dtype, call.op)
        prescale_factor = _check_factor(call, prescale_factor, "prescale_factor")
        postscale_factor = _check_factor(call, postscale_factor, "postscale_factor")
    joined = _joined(_negotiate(call))
    rop, n = call.op, len(call.ps.ranks)
    with torch.no_grad():
        src = tensor.detach()
        wire = _wire_dtype(src.dtype, src.device, rop)
        buf = src if inplace and wire == src.dtype and src.is_contiguous() else _wire_copy(src, wire)
        _scale_(buf, prescale_factor)
        with _converting(call):
            if rop is ReduceOp.Adasum:
                work = start_adasum(buf, call.ps)
            elif joined:  # flat on the set's group: the stream groups carry the joined ranks' shadow steps
                work = dist.all_reduce(buf, op=_TORCH_OPS[rop], group=call.ps.group, async_op=True)
            else:
                work = start_allreduce(buf, call.ps, _TORCH_OPS[rop])  # hierarchical when configured

    def finish() -> torch.Tensor:
        with torch.no_grad():
            _post_reduce_(buf, rop, n, postscale_factor)
            if buf is src:
                return tensor
            if inplace:
                tensor.detach().copy_(buf)
                return tensor
            return buf if buf.dtype == src.dtype else buf.to(src.dtype)

    return Handle(call, [work], finish)


def allreduce_async(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
                    op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                    process_set: _ProcessSetArg = None) -> Handle:
    """Start reducing ``tensor`` across the process set; the input is not modified.

    Args:
        tensor: the same dtype and shape on every member.
        average: deprecated (Horovod < 0.19): True = Average, False = Sum. Use ``op``.
        name: a name for error messages; default ``allreduce.<n>`` (counted per process set).
        op: Average (default), Sum, Min, Max or Product.
        prescale_factor: multiplies the input before the reduction.
        postscale_factor: multiplies the result after the reduction (and after averaging).
        process_set: a registered :class:`~shoal.core.runtime.ProcessSet`; None = all ranks.

    Returns:
        A :class:`Handle`; :func:`synchronize` returns a new tensor of the input's dtype and shape.

    Raises:
        MismatchError: members disagree on name, dtype, shape or op (raised on every member).
        ValueError: the caller is not in ``process_set``, or the op does not apply to the dtype.
        RankFailureError: a peer died or never joined (after ``timeout_s``).

    Example:
        >>> h = hvd.allreduce_async(grad, name="w.grad", op=hvd.Sum)
        >>> total = hvd.synchronize(h)
    """
    return _start_allreduce(tensor, average, name, op, prescale_factor, postscale_factor, process_set, False)


def allreduce_async_(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
                     op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                     process_set: _ProcessSetArg = None) -> Handle:
    """In-place :func:`allreduce_async`: ``synchronize`` writes the result into ``tensor`` and returns it."""
    return _start_allreduce(tensor, average, name, op, prescale_factor, postscale_factor, process_set, True)


def allreduce(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
              op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set: _ProcessSetArg = None) -> torch.Tensor:
    """Reduce ``tensor`` across the process set and return a new tensor (see :func:`allreduce_async`).

    Example:
        >>> hvd.allreduce(torch.ones(2) * hvd.rank(), op=hvd.Sum)   # 2 ranks -> tensor([1., 1.])
    """
    return allreduce_async(tensor, average, name, op, prescale_factor, postscale_factor, process_set).wait()


def allreduce_(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
               op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
               process_set: _ProcessSetArg = None) -> torch.Tensor:
    """Reduce ``tensor`` in place across the process set; returns ``tensor``."""
    return allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set).wait()


# ---------------------------------------------------------------------------------------------------------
# grouped allreduce: one flat buffer (one collective) per dtype and device
# ---------------------------------------------------------------------------------------------------------

def _start_grouped(tensors: Sequence[torch.Tensor], average: Optional[bool], name: Optional[str], op: Any,
                   prescale_factor: float, postscale_factor: float, process_set: _ProcessSetArg,
                   inplace: bool) -> Handle:
    call = _begin("grouped_allreduce", name, process_set)
    with _deferred(call):
        tensors = _tensor_list(call, tensors)
        call.count = len(tensors)
        for i, t in enumerate(tensors):
            _check_tensor(call, t, arg=f"tensors[{i}]")
        call.entries = tuple((t.dtype, tuple(t.shape)) for t in tensors)
        call.device = tensors[0].device.type if tensors else ""
        call.op = resolve_op(op, average, call.label)
        for t in tensors:
            _check_reducible(call, t.dtype, call.op)
        prescale_factor = _check_factor(call, prescale_factor, "prescale_factor")
        postscale_factor = _check_factor(call, postscale_factor, "postscale_factor")
    _negotiate(call)
    rop, n = call.op, len(call.ps.ranks)
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    flats: list[tuple[list[int], torch.Tensor]] = []
    works = []
    with torch.no_grad():
        for (dtype, device), idx in buckets.items():
            wire = _wire_dtype(dtype, device, rop)
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
            if flat.dtype != wire:
                flat = flat.to(wire)
            _scale_(flat, prescale_factor)
            with _converting(call):
                if rop is ReduceOp.Adasum:  # tensor by tensor inside the flat buffer
                    works.append(start_adasum(flat, call.ps, [tensors[i].numel() for i in idx]))
                else:
                    works.append(dist.all_reduce(flat, op=_TORCH_OPS[rop], group=call.ps.group, async_op=True))
            flats.append((idx, flat))

    def finish() -> list[torch.Tensor]:
        out: list[Optional[torch.Tensor]] = [None] * len(tensors)
        with torch.no_grad():
            for idx, flat in flats:
                _post_reduce_(flat, rop, n, postscale_factor)
                pieces = flat.split([tensors[i].numel() for i in idx])
                for i, piece in zip(idx, pieces):
                    piece = piece.view(tensors[i].shape)
                    if inplace:
                        tensors[i].detach().copy_(piece)
                        out[i] = tensors[i]
                    else:
                        out[i] = piece if piece.dtype == tensors[i].dtype else piece.to(tensors[i].dtype)
        return out  # type: ignore[return-value]

    return Handle(call, works, finish)


def grouped_allreduce_async(tensors: Sequence[torch.Tensor], average: Optional[bool] = None,
                            name: Optional[str] = None, op: Any = None, prescale_factor: float = 1.0,
                            postscale_factor: float = 1.0, process_set: _ProcessSetArg = None) -> Handle:
    """Start reducing a list of tensors as one fused operation: one flat buffer and one collective per
    dtype (and device), not one per tensor. Inputs are not modified.

    Returns:
        A :class:`Handle`; :func:`synchronize` returns a list of new tensors (in the input order).

    Raises:
        MismatchError: members disagree on the number, dtypes or shapes of the tensors (the message names
            the first differing position), or on name/op.

    Example:
        >>> w, b = hvd.grouped_allreduce([w_grad, b_grad], name="layer1")
    """
    return _start_grouped(tensors, average, name, op, prescale_factor, postscale_factor, process_set, False)


def grouped_allreduce_async_(tensors: Sequence[torch.Tensor], average: Optional[bool] = None,
                             name: Optional[str] = None, op: Any = None, prescale_factor: float = 1.0,
                             postscale_factor: float = 1.0, process_set: _ProcessSetArg = None) -> Handle:
    """In-place :func:`grouped_allreduce_async`: results are written into the given tensors."""
    return _start_grouped(tensors, average, name, op, prescale_factor, postscale_factor, process_set, True)


def grouped_allreduce(tensors: Sequence[torch.Tensor], average: Optional[bool] = None,
                      name: Optional[str] = None, op: Any = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set: _ProcessSetArg = None) -> list[torch.Tensor]:
    """Fused reduction of a list of tensors; returns a list of new tensors (see
    :func:`grouped_allreduce_async`)."""
    return grouped_allreduce_async(tensors, average, name, op, prescale_factor, postscale_factor,
                                   process_set).wait()


def grouped_allreduce_(tensors: Sequence[torch.Tensor], average: Optional[bool] = None,
                       name: Optional[str] = None, op: Any = None, prescale_factor: float = 1.0,
                       postscale_factor: float = 1.0, process_set: _ProcessSetArg = None) -> list[torch.Tensor]:
    """Fused in-place reduction of a list of tensors; returns the same tensors."""
    return grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor,
                                    process_set).wait()


# ---------------------------------------------------------------------------------------------------------
# allgather
# ---------------------------------------------------------------------------------------------------------

def _gather_dim0(call: _Call, dim0: int) -> list[int]:
    """First-dimension sizes of every member, when the signature exchange did not bring them."""
    mine = torch.tensor([dim0], dtype=torch.int64, device=_ctl_device())
    out = torch.empty(len(call.ps.ranks), dtype=torch.int64, device=_ctl_device())
    with _converting(call):
        _all_gather_single(out, mine, group=call.ps.group)
    return out.tolist()


def allgather_async(tensor: torch.Tensor, name: Optional[str] = None,
                    process_set: _ProcessSetArg = None) -> Handle:
    """Start concatenating every member's ``tensor`` along the first dimension (see :func:`allgather`)."""
    call = _begin("allgather", name, process_set)
    with _deferred(call):
        _check_tensor(call, tensor, min_ndim=1)
        call.dtype, call.shape, call.device = tensor.dtype, tuple(tensor.shape), tensor.device.type
    rows = _negotiate(call)
    ps, n = call.ps, len(call.ps.ranks)
    # The signature already carries every member's first dimension: uneven sizes cost no extra exchange.
    sizes = [row[_F_DIM0] for row in rows] if rows is not None else _gather_dim0(call, tensor.shape[0])
    src = tensor.detach()
    rest = tuple(src.shape[1:])
    most, total = max(sizes), sum(sizes)
    if most == 0 or math.prod(rest) == 0:
        return _done_handle(call, src.new_empty((total, *rest)))
    out = src.new_empty((n * most, *rest))
    if all(s == most for s in sizes):
        inp = src.contiguous()
    else:
        # gloo's allgather needs equal sizes: pad every member to the largest, slice after.
        inp = src.new_zeros((most, *rest))
        inp[: src.shape[0]] = src
    with _converting(call):
        work = _all_gather_single(_as_bytes(out), _as_bytes(inp), group=ps.group, async_op=True)

    def finish() -> torch.Tensor:
        if total == n * most:
            return out
        return torch.cat([out[i * most: i * most + s] for i, s in enumerate(sizes)])

    return Handle(call, [work], finish)


def allgather(tensor: torch.Tensor, name: Optional[str] = None,
              process_set: _ProcessSetArg = None) -> torch.Tensor:
    """Concatenate every member's ``tensor`` along the first dimension, in rank order.

    The first dimension may differ across members (also 0); the other dimensions and the dtype must match.

    Example:
        >>> hvd.allgather(torch.full((hvd.rank() + 1, 2), hvd.rank()))   # 2 ranks -> shape [3, 2]
    """
    return allgather_async(tensor, name, process_set).wait()


def sparse_allreduce_async(tensor: torch.Tensor, name: Optional[str] = None, op: Any = ReduceOp.Average,
                           process_set: _ProcessSetArg = None) -> Handle:
    """Start reducing a sparse COO tensor as Horovod does: allgather its indices and its values (no dense
    copy); ``synchronize`` (or calling the handle, Horovod's form) returns the uncoalesced sum, divided by
    the set size for Average.

    Args:
        tensor: a ``torch.sparse_coo`` tensor, the same dense shape on every member (any number of entries).
        name: names the two allgathers ``<name>.indices`` and ``<name>.values``.
        op: Average (default) or Sum.

    Raises:
        TypeError: ``tensor`` is not a sparse COO tensor. ValueError: another op. (Carried by the first
            allgather's exchange, so that the other members raise at once: constraint 3.)

    Example:
        >>> h = hvd.sparse_allreduce_async(emb.weight.grad, name="emb", op=hvd.Average)
        >>> grad = h()        # or hvd.synchronize(h)
    """
    if not runtime.is_initialized():
        raise NotInitializedError("sparse_allreduce")
    base = name if isinstance(name, str) else None
    error: Optional[BaseException] = None
    rop = ReduceOp.Average
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.sparse_coo:
        error = TypeError(f"shoal: sparse_allreduce_async needs a sparse COO tensor, got {_type_name(tensor)}"
                          f"{'' if not isinstance(tensor, torch.Tensor) else ' with layout ' + str(tensor.layout)}"
                          ". HINT: allreduce_async() reduces dense tensors.")
    else:
        try:
            rop = resolve_op(op, None, "sparse_allreduce_async")
        except (TypeError, ValueError) as exc:
            error = exc
        if error is None and rop not in (ReduceOp.Average, ReduceOp.Sum):
            error = ValueError(f"shoal: sparse_allreduce_async supports op=Average or Sum, got {rop.name}. "
                               "HINT: reduce tensor.to_dense() for other ops.")
    if error is not None:
        call = _begin("allgather", None if base is None else f"{base}.indices", process_set)
        call.error = call.error or error
        _negotiate(call)  # raises this rank's error; the peers' first allgather raises MismatchError
        raise error
    t = tensor.detach()
    # allgather concatenates along the first dimension: the indices travel transposed (one row per entry).
    h_idx = allgather_async(t._indices().t().contiguous(), None if base is None else f"{base}.indices", process_set)
    h_val = allgather_async(t._values().contiguous(), None if base is None else f"{base}.values", process_set)
    n = runtime.get_process_set(process_set).size()

    def finish() -> torch.Tensor:
        indices, values = h_idx.wait(), h_val.wait()
        if rop is ReduceOp.Average:
            values = values / n if values.is_floating_point() or values.is_complex() else \
                values.div(n, rounding_mode="trunc")
        return torch.sparse_coo_tensor(indices.t(), values, t.shape)

    return Handle(h_val._call, h_idx._works + h_val._works, finish)


# ---------------------------------------------------------------------------------------------------------
# broadcast
# ---------------------------------------------------------------------------------------------------------

def _as_int(value: Any) -> int:
    """An integer argument: ints, numpy integers, integer 0-d tensors (``operator.index``); not bools, not
    floats (``int(2.7)`` would truncate silently). TypeError otherwise."""
    if isinstance(value, bool):
        raise TypeError("a bool is not a count or a rank")
    return operator.index(value)


def _check_root(call: _Call, root_rank: Any) -> int:
    try:
        root = _as_int(root_rank)
    except TypeError:
        raise TypeError(f"shoal: {call.label}: root_rank={_brief(root_rank)} is {_a(root_rank)}, "
                        "not an integer rank. HINT: pass a global rank such as root_rank=0.") from None
    if root not in call.ps.ranks:
        raise ValueError(f"shoal: {call.label}: root_rank {root} is not in process set {list(call.ps.ranks)}. "
                         "HINT: root_rank is a global rank (as in Horovod) and must belong to the set.")
    return root


def _start_broadcast(tensor: torch.Tensor, root_rank: int, name: Optional[str], process_set: _ProcessSetArg,
                     inplace: bool) -> Handle:
    call = _begin("broadcast", name, process_set)
    with _deferred(call):
        _check_tensor(call, tensor)
        call.dtype, call.shape, call.device = tensor.dtype, tuple(tensor.shape), tensor.device.type
        call.root = _check_root(call, root_rank)
    _negotiate(call)
    src = tensor.detach()
    buf = src if inplace and src.is_contiguous() else _wire_copy(src, src.dtype)
    with _converting(call):
        work = dist.broadcast(_as_bytes(buf, keep_dim0=False), src=call.root, group=call.ps.group,
                              async_op=True)

    def finish() -> torch.Tensor:
        if buf is src:
            return tensor
        if inplace:
            with torch.no_grad():
                tensor.detach().copy_(buf)
            return tensor
        return buf

    return Handle(call, [work], finish)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
                    process_set: _ProcessSetArg = None) -> Handle:
    """Start sending ``root_rank``'s tensor to every member; the input is not modified."""
    return _start_broadcast(tensor, root_rank, name, process_set, False)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
                     process_set: _ProcessSetArg = None) -> Handle:
    """In-place :func:`broadcast_async`."""
    return _start_broadcast(tensor, root_rank, name, process_set, True)


def broadcast(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
              process_set: _ProcessSetArg = None) -> torch.Tensor:
    """Return a copy of ``root_rank``'s ``tensor`` on every member.

    Args:
        root_rank: a global rank (as in Horovod) that belongs to ``process_set``.

    Example:
        >>> w = hvd.broadcast(w, root_rank=0, name="init.w")
    """
    return broadcast_async(tensor, root_rank, name, process_set).wait()


def broadcast_(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None,
               process_set: _ProcessSetArg = None) -> torch.Tensor:
    """Overwrite ``tensor`` with ``root_rank``'s on every member; returns ``tensor``."""
    return broadcast_async_(tensor, root_rank, name, process_set).wait()


# ---------------------------------------------------------------------------------------------------------
# alltoall
# ---------------------------------------------------------------------------------------------------------

def _split_sizes(call: _Call, splits: Any, dim0: int, n: int) -> list[int]:
    if splits is None:
        if dim0 % n:
            raise ValueError(
                f"shoal: {call.label}: the first dimension ({dim0}) is not divisible by the process set size "
                f"({n}). HINT: pass splits=[rows for each rank], or pad the tensor.")
        return [dim0 // n] * n
    if isinstance(splits, torch.Tensor):
        if (splits.dim() != 1 or splits.is_floating_point() or splits.is_complex()
                or splits.dtype == torch.bool):
            raise ValueError(f"shoal: {call.label}: splits must be a 1-d integer tensor, got "
                             f"{_short(splits.dtype)} {list(splits.shape)}. "
                             "HINT: torch.tensor([...], dtype=torch.int32).")
        sizes = [int(s) for s in splits.tolist()]
    else:
        try:
            if isinstance(splits, (str, bytes, Mapping)):
                raise TypeError
            sizes = [_as_int(s) for s in splits]
        except TypeError:
            raise TypeError(f"shoal: {call.label}: splits={_brief(splits)} must be a list of integers (rows "
                            "for each member) or a 1-d integer tensor. HINT: splits=[2, 3], or "
                            "torch.tensor([2, 3]).") from None
    if len(sizes) != n or any(s < 0 for s in sizes) or sum(sizes) != dim0:
        raise ValueError(
            f"shoal: {call.label}: splits {sizes} must have one non-negative entry per member of the process "
            f"set ({n}) and add up to the first dimension ({dim0}). HINT: splits[i] is the number of rows "
            "sent to the i-th member of the set.")
    return sizes


def alltoall_async(tensor: torch.Tensor, splits: Any = None, name: Optional[str] = None,
                   process_set: _ProcessSetArg = None) -> Handle:
    """Start an alltoall (see :func:`alltoall`); :func:`synchronize` returns ``(output, received_splits)``."""
    call = _begin("alltoall", name, process_set)
    n = len(call.ps.ranks)
    send: list[int] = []
    with _deferred(call):
        _check_tensor(call, tensor, min_ndim=1)
        call.dtype, call.shape, call.device = tensor.dtype, tuple(tensor.shape), tensor.device.type
        call.count = 0 if splits is None else 1
        send = _split_sizes(call, splits, tensor.shape[0], n)
    rows = _negotiate(call)
    if splits is None and rows is not None:
        recv = [row[_F_DIM0] // n for row in rows]
    else:
        mine = torch.tensor(send, dtype=torch.int64, device=_ctl_device())
        theirs = torch.empty_like(mine)
        with _converting(call):
            dist.all_to_all_single(theirs, mine, group=call.ps.group)
        recv = theirs.tolist()
    src = tensor.detach().contiguous()
    out = src.new_empty((sum(recv), *src.shape[1:]))
    with _converting(call):
        work = dist.all_to_all_single(_as_bytes(out), _as_bytes(src), output_split_sizes=recv,
                                      input_split_sizes=send, group=call.ps.group, async_op=True)
    if isinstance(splits, torch.Tensor):
        received = torch.tensor(recv, dtype=splits.dtype, device=splits.device)
    else:
        received = torch.tensor(recv, dtype=torch.int32)
    return Handle(call, [work], lambda: (out, received))


def alltoall(tensor: torch.Tensor, splits: Any = None, name: Optional[str] = None,
             process_set: _ProcessSetArg = None) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Send ``splits[i]`` rows of ``tensor`` to the i-th member and receive what every member sends here.

    Args:
        splits: rows per member (list or 1-d integer tensor), summing to ``tensor.shape[0]``; default: the
            first dimension divided evenly (it must be divisible by the set size).

    Returns:
        Horovod's convention: without ``splits``, the output tensor; with ``splits``, ``(output,
        received_splits)`` where ``received_splits[i]`` is the number of rows received from member i
        (same dtype/device as a tensor ``splits``, else int32 on CPU).

    Example:
        >>> out, got = hvd.alltoall(x, splits=[1, 3])
    """
    out, received = alltoall_async(tensor, splits, name, process_set).wait()
    return out if splits is None else (out, received)


# ---------------------------------------------------------------------------------------------------------
# reducescatter
# ---------------------------------------------------------------------------------------------------------

def _scatter_counts(dim0: int, n: int) -> list[int]:
    """Horovod's split of the first dimension: the first ``dim0 % n`` members get one extra row."""
    return [dim0 // n + (1 if i < dim0 % n else 0) for i in range(n)]


def reducescatter_async(tensor: torch.Tensor, name: Optional[str] = None, op: Any = ReduceOp.Average,
                        process_set: _ProcessSetArg = None, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> Handle:
    """Start a reducescatter (see :func:`reducescatter`)."""
    call = _begin("reducescatter", name, process_set)
    with _deferred(call):
        _check_tensor(call, tensor, min_ndim=1)
        call.dtype, call.shape, call.device = tensor.dtype, tuple(tensor.shape), tensor.device.type
        call.op = resolve_op(op, None, call.label)
        if call.op is ReduceOp.Adasum:
            raise NotImplementedError(f"shoal: {call.label}: reducescatter has no Adasum (as in Horovod: each "
                                      "member would need every other's whole tensor). HINT: use op=hvd.Sum or "
                                      "hvd.Average, or allreduce(..., op=hvd.Adasum) and slice.")
        _check_reducible(call, tensor.dtype, call.op)
        prescale_factor = _check_factor(call, prescale_factor, "prescale_factor")
        postscale_factor = _check_factor(call, postscale_factor, "postscale_factor")
    _negotiate(call)
    rop, ps, n = call.op, call.ps, len(call.ps.ranks)
    me = ps.ranks.index(dist.get_rank())
    src = tensor.detach()
    rest = tuple(src.shape[1:])
    counts = _scatter_counts(src.shape[0], n)
    if counts[0] == 0 or math.prod(rest) == 0:
        return _done_handle(call, src.new_empty((counts[me], *rest)))
    with torch.no_grad():
        buf = _wire_copy(src, _wire_dtype(src.dtype, src.device, rop))
        _scale_(buf, prescale_factor)
        most = counts[0]
        if any(c != most for c in counts):
            # The tensor form of reduce_scatter needs equal chunks: pad each member's chunk to the largest.
            padded = buf.new_zeros((n * most, *rest))
            offset = 0
            for i, c in enumerate(counts):
                padded[i * most: i * most + c] = buf[offset: offset + c]
                offset += c
            buf = padded
        out = buf.new_empty((most, *rest))
        with _converting(call):
            work = _reduce_scatter_single(out, buf, op=_TORCH_OPS[rop], group=ps.group, async_op=True)

    def finish() -> torch.Tensor:
        with torch.no_grad():
            result = out[: counts[me]]
            _post_reduce_(result, rop, n, postscale_factor)
            return result if result.dtype == src.dtype else result.to(src.dtype)

    return Handle(call, [work], finish)


def reducescatter(tensor: torch.Tensor, name: Optional[str] = None, op: Any = ReduceOp.Average,
                  process_set: _ProcessSetArg = None, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce ``tensor`` across the set and return this member's slice of the first dimension.

    The tensor must have the same shape on every member. Rows are split as Horovod does: with ``d`` rows
    and ``n`` members, member ``i`` gets ``d // n`` rows, plus one when ``i < d % n``. Argument order
    follows Horovod's ``reducescatter(tensor, name, ..., op, process_set, prescale, postscale)``.

    Example:
        >>> part = hvd.reducescatter(torch.ones(5, 2), op=hvd.Sum)   # 2 ranks: rank 0 [3, 2], rank 1 [2, 2]
    """
    return reducescatter_async(tensor, name, op, process_set, prescale_factor, postscale_factor).wait()


# ---------------------------------------------------------------------------------------------------------
# grouped allgather / reducescatter: one handle over one collective per tensor
# ---------------------------------------------------------------------------------------------------------

def _grouped(handles: list[Handle], what: str, name: Optional[str], process_set: _ProcessSetArg) -> Handle:
    """One handle over ``handles``: done when all are; ``wait`` returns their results in order."""
    if not handles:  # as grouped_allreduce([]): nothing to move, an empty list back
        return _done_handle(_begin(what, name, process_set), [])
    return Handle(handles[0]._call, [w for h in handles for w in h._works], lambda: [h.wait() for h in handles])


def _member_name(name: Optional[str], i: int) -> Optional[str]:
    return None if name is None else f"{name}.{i}"


def _members(what: str, member: str, tensors: Any, name: Any, process_set: Any) -> list:
    """The tensors of a grouped call as a list; on a bad ``tensors`` or ``name``, the rejection rides on
    the first member's exchange (constraint 3), so that the peers' first member call raises at once."""
    if not runtime.is_initialized():
        raise NotInitializedError(what)
    label = what if not isinstance(name, str) else f"{what} of '{name}'"
    error: Optional[BaseException] = None
    if name is not None and not isinstance(name, str):
        error = TypeError(f"shoal: {what}: name={_brief(name)} is {_a(name)}, not a str. HINT: pass "
                          "a string (member i is named f\"{name}.{i}\"), or leave it out.")
    elif isinstance(tensors, (torch.Tensor, str, bytes, Mapping)) or not isinstance(tensors, Iterable):
        error = TypeError(f"shoal: {label}: tensors must be a list or tuple of torch.Tensors, got "
                          f"{_type_name(tensors)}. HINT: wrap a single tensor in a list: [t].")
    if error is None:
        return list(tensors)
    call = _begin(member, _member_name(name if isinstance(name, str) else None, 0), process_set)
    call.error = call.error or error
    _negotiate(call)  # raises this rank's error (and, through the exchange, every peer's MismatchError)
    raise error


def grouped_allgather_async(tensors: Sequence[torch.Tensor], name: Optional[str] = None,
                            process_set: _ProcessSetArg = None) -> Handle:
    """Start :func:`allgather` of every tensor of ``tensors``; ``synchronize`` returns the list of results.

    Each tensor is checked and named on its own (``name.0``, ``name.1``, ...), so a mismatch names the
    tensor. Example:
        >>> xs, ys = hvd.synchronize(hvd.grouped_allgather_async([x, y], name="batch"))
    """
    tensors = _members("grouped_allgather", "allgather", tensors, name, process_set)
    return _grouped([allgather_async(t, _member_name(name, i), process_set) for i, t in enumerate(tensors)],
                    "grouped_allgather", name, process_set)


def grouped_allgather(tensors: Sequence[torch.Tensor], name: Optional[str] = None,
                      process_set: _ProcessSetArg = None) -> list[torch.Tensor]:
    """:func:`allgather` of each tensor of ``tensors`` (Horovod's ``grouped_allgather``), all in flight at once."""
    return grouped_allgather_async(tensors, name, process_set).wait()


def grouped_reducescatter_async(tensors: Sequence[torch.Tensor], name: Optional[str] = None,
                                op: Any = ReduceOp.Average, process_set: _ProcessSetArg = None,
                                prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> Handle:
    """Start :func:`reducescatter` of every tensor of ``tensors``; ``synchronize`` returns the list."""
    tensors = _members("grouped_reducescatter", "reducescatter", tensors, name, process_set)
    return _grouped([reducescatter_async(t, _member_name(name, i), op, process_set, prescale_factor,
                                         postscale_factor) for i, t in enumerate(tensors)],
                    "grouped_reducescatter", name, process_set)


def grouped_reducescatter(tensors: Sequence[torch.Tensor], name: Optional[str] = None,
                          op: Any = ReduceOp.Average, process_set: _ProcessSetArg = None,
                          prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> list[torch.Tensor]:
    """:func:`reducescatter` of each tensor of ``tensors`` (Horovod's ``grouped_reducescatter``), all in
    flight at once.

    Example:
        >>> a, b = hvd.grouped_reducescatter([torch.ones(4, 2), torch.ones(6)], op=hvd.Sum)
    """
    return grouped_reducescatter_async(tensors, name, op, process_set, prescale_factor, postscale_factor).wait()


# ---------------------------------------------------------------------------------------------------------
# barrier and object collectives
# ---------------------------------------------------------------------------------------------------------

def barrier(process_set: _ProcessSetArg = None) -> None:
    """Return once every member of the process set has called ``barrier``.

    With ``check_collectives`` on, the signature exchange is the barrier (an all_gather completes only when
    every member has contributed), and a member inside a different collective is reported.

    Raises:
        TypeError: ``process_set`` is not a ProcessSet (raised after the exchange on the global set, so that
            the other ranks raise too; constraint 3).
    """
    call = _begin("barrier", None, process_set)
    if runtime.config().check_collectives:
        _negotiate(call)
        return
    if call.error is not None:
        raise call.error
    with _converting(call):
        dist.barrier(group=call.ps.group)


def _object_mode(call: _Call, trusted: Any) -> int:
    if not isinstance(trusted, bool):
        raise TypeError(f"shoal: {call.label}: trusted={_brief(trusted)} must be True or False. HINT: "
                        "trusted=False carries plain data without pickle.")
    return _MODE_PICKLE if trusted else _MODE_PLAIN


def _encode_object(call: _Call, obj: Any) -> bytes:
    """``obj`` as bytes in the call's mode; TypeError/ValueError here are this rank's argument errors."""
    if call.mode == _MODE_PLAIN:
        return plain.encode(obj, what=f"{call.label}: the object")
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 (a __reduce__ may raise anything; it is this rank's argument)
        raise TypeError(f"shoal: {call.label}: the object cannot be pickled ({type(exc).__name__}: {exc}). "
                        "HINT: send plain data (a dict of numbers, strings, tensors).") from exc


def _decode_object(call: _Call, data: bytes, sender: int) -> Any:
    """A member's object from its bytes. Restricted mode: refused (never run) unless it is plain data."""
    if call.mode == _MODE_PLAIN:
        cuda = _ctl_device() if _ctl_device().type == "cuda" else None
        try:
            return plain.decode(data, cuda=cuda)
        except ValueError as exc:
            raise MismatchError(
                f"shoal: {call.label} with trusted=False: rank {sender} sent bytes that are not Shoal's "
                f"restricted encoding ({exc}); refused, nothing of them was run or unpickled. HINT: every "
                f"member must call {call.kind}(..., trusted=False) with plain data; a rank that sends anything "
                "else runs other code, or is not a rank of this job.", culprit_ranks=[sender]) from None
    try:
        return pickle.loads(data)
    except Exception as exc:  # noqa: BLE001 (unpickling runs the sender's code: anything can fail)
        raise MismatchError(
            f"shoal: {call.label}: rank {sender}'s object cannot be unpickled on rank {dist.get_rank()} "
            f"({type(exc).__name__}: {exc}). HINT: the object's classes must be importable on every rank; "
            "or send plain data.", culprit_ranks=[sender]) from exc


def broadcast_object(obj: Any, root_rank: int = 0, name: Optional[str] = None,
                     process_set: _ProcessSetArg = None, *, trusted: bool = True) -> Any:
    """Return ``root_rank``'s ``obj`` on every member (Horovod's ``broadcast_object``).

    Two modes, and every member must pass the same one (it is compared before anything moves):

    * ``trusted=True`` (the default, Horovod's semantics): ``obj`` is pickled. Unpickling runs whatever
      the root's bytes say, so this mode trusts every rank of the process set, and anything that can
      reach the job's sockets.
    * ``trusted=False``: plain data only (``None``, bools, numbers, strings, bytes, lists, tuples, dicts,
      sets and strided tensors; :mod:`shoal.core.plain`), carried without pickle: a peer can at worst
      send wrong data, and bytes that are not this encoding are refused.

    Args:
        obj: the object (used on the root only).
        root_rank: a global rank (as in Horovod) that belongs to ``process_set``.
        name: labels the call in errors.
        trusted: see above.

    Returns:
        The root's object: on the root ``obj`` itself, elsewhere a copy.

    Raises:
        TypeError: on the root, ``obj`` cannot be pickled, or (``trusted=False``) holds a type that is not
            plain data; every other member then raises MismatchError naming the root.
        MismatchError: members disagree on the call (root, name, ``trusted``), or (``trusted=False``) the
            root sent bytes that are not the restricted encoding (``culprit_ranks`` names it).

    Example:
        >>> start_epoch = hvd.broadcast_object(start_epoch, root_rank=0)
        >>> cfg = hvd.broadcast_object(cfg, root_rank=0, trusted=False)   # a dict of plain values
    """
    call = _begin("broadcast_object", name, process_set)
    data = b""
    with _deferred(call):
        call.mode = _object_mode(call, trusted)
        call.root = _check_root(call, root_rank)
        if dist.get_rank() == call.root:
            data = _encode_object(call, obj)
    _negotiate(call)
    with _converting(call):
        data = exchange.broadcast_bytes(data, src=call.root, group=call.ps.group, device=_ctl_device())
    if dist.get_rank() == call.root:
        return obj
    return _decode_object(call, data, call.root)


def allgather_object(obj: Any, name: Optional[str] = None, process_set: _ProcessSetArg = None, *,
                     trusted: bool = True) -> list[Any]:
    """Return the list of every member's ``obj``, in rank order (Horovod's ``allgather_object``).

    ``trusted`` as in :func:`broadcast_object`: True (default) pickles, and trusts every member;
    False carries plain data only, without pickle.

    Raises:
        TypeError: ``obj`` cannot be pickled, or (``trusted=False``) is not plain data; the other members
            then raise MismatchError naming this rank.
        MismatchError: members disagree on the call (name, ``trusted``), or (``trusted=False``) a member
            sent bytes that are not the restricted encoding (``culprit_ranks`` names it).

    Example:
        >>> counts = hvd.allgather_object(len(my_shard))
        >>> stats = hvd.allgather_object({"loss": 0.3, "seen": 1024}, trusted=False)
    """
    call = _begin("allgather_object", name, process_set)
    data = b""
    with _deferred(call):
        call.mode = _object_mode(call, trusted)
        data = _encode_object(call, obj)
    _negotiate(call)
    with _converting(call):
        payloads = exchange.allgather_bytes(data, group=call.ps.group, device=_ctl_device())
    return [_decode_object(call, d, r) for r, d in zip(call.ps.ranks, payloads)]
