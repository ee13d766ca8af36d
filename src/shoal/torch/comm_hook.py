"""DDP communication hook: Shoal's algorithms for existing ``DistributedDataParallel`` code.

DDP keeps its own bucketing and overlap; this hook replaces only what happens to each bucket, with the
same per-bucket algorithm the engine uses (compression, hierarchical allreduce, several buckets in flight
on separate process groups). One line changes in the user's script::

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(*shoal.torch.comm_hook(compression=shoal.torch.Compression.fp16))

PowerSGD through the same hook (compare it with torch's ``powerSGD_hook`` at the same rank and start)::

    ddp.register_comm_hook(*shoal.torch.comm_hook(compression=shoal.torch.Compression.powersgd(
        rank=4, start_step=10)))
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from shoal.core import runtime
from shoal.core.algorithms import ReduceContext, get_algorithm
from shoal.core.checks import FiniteCheck, NonFiniteReport, apply_nan_policy, make_finite_check
from shoal.core.compression import resolve_compression
from shoal.core.registration import check_registration

__all__ = ["comm_hook", "CommHookState", "allreduce_hook"]


@dataclass
class CommHookState:
    """What :func:`allreduce_hook` needs: the process set, its stream groups and the algorithm."""

    process_set: runtime.ProcessSet
    streams: list
    algorithm: object  # noqa: the engine's Algorithm callable
    compression: str
    hierarchical: str
    #: NaN/Inf check (None: off); names by ``id(param)``; the report of the last backward (None: finite).
    nan_check: Optional[FiniteCheck] = None
    param_names: dict = field(default_factory=dict)
    nan_report: Optional[NonFiniteReport] = None
    #: Per bucket index: state that persists across steps (error-feedback residuals, PowerSGD's factors).
    bucket_state: dict = field(default_factory=dict)
    #: Steps whose last bucket went through the hook (PowerSGD's warm-up counts them).
    steps: int = 0


# No `from __future__ import annotations` here: DDP checks these annotations against the real classes.
def allreduce_hook(state: CommHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` across the process set with Shoal's algorithm; DDP's hook signature."""
    buffer = bucket.buffer()
    ctx = ReduceContext(group=state.streams[bucket.index() % len(state.streams)],
                        process_set=state.process_set, prescale=1.0,
                        postscale=1.0 / state.process_set.size(), bucket_index=bucket.index(),
                        state=state.bucket_state.setdefault(bucket.index(), {}), step=state.steps + 1)
    if state.compression != "none":  # read now: the algorithm may run after DDP let go of `bucket`
        layout = _layout(bucket)
        ctx.layout = lambda: layout
    if state.nan_check is not None:  # before the bucket leaves the rank (shoal.core.checks)
        state.nan_check.check_bucket(bucket.index(), buffer, lambda: [
            (state.param_names.get(id(p), f"<unnamed {tuple(p.shape)}>"), g)
            for p, g in zip(bucket.parameters(), bucket.gradients())], last=bucket.is_last())
    fut = runtime.launch_in_order(ctx.group, lambda: state.algorithm(buffer, ctx))  # one per stream, in order
    if state.nan_check is not None and bucket.is_last():
        # Every rank gets the same report. DDP cannot skip the user's optimizer step: under "skip" (and
        # "warn") the hook only logs, and the caller skips when state.nan_report is not None.
        state.nan_report = state.nan_check.finish_step()
        apply_nan_policy(state.nan_report)
    if bucket.is_last():
        state.steps += 1
    return fut


def _layout(bucket: dist.GradBucket) -> list:
    """``(offset, shape)`` of the bucket's gradients: DDP lays them out back to back, in this order."""
    out, offset = [], 0
    for p in bucket.parameters():
        out.append((offset, tuple(p.shape)))
        offset += p.numel()
    return out


def comm_hook(process_set: Optional[runtime.ProcessSet] = None, compression=None,
              hierarchical: Optional[str] = None, num_streams: Optional[int] = None,
              nan_check: Optional[str] = None, named_parameters=None, error_feedback: Optional[bool] = None):
    """Build ``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

    Args:
        process_set: must span the same ranks as the DDP module's process group (default: all).
        compression: ``Compression.none`` / ``.fp16`` / ``.bf16`` / ``.int8`` / ``.powersgd(rank=,
            start_step=)`` / a ``mixed_`` variant; default from the config. PowerSGD counts its warm-up
            in steps of this hook (one per backward whose last bucket it reduced).
        hierarchical: ``auto`` / ``on`` / ``off``; default from the config.
        num_streams: buckets in flight at once; default from the config.
        nan_check: ``raise`` / ``skip`` / ``warn`` / ``off``; default from the config. Under ``skip`` the
            hook cannot skip your optimizer step: step only when ``state.nan_report is None``
            (the same on every rank). See docs/nan_check.md.
        named_parameters: ``model.named_parameters()``, for names in NaN/Inf reports; when given, ranks
            also check that they registered the same names, shapes and dtypes (raises ``MismatchError``).
        error_feedback: with 16-bit compression, keep what rounding drops per bucket; default from the config.

    Returns:
        ``(state, hook)``: pass both to ``ddp.register_comm_hook``.

    Raises:
        MismatchError: on every rank, when ranks registered different parameters, or ``nan_check``,
            ``compression``, ``hierarchical`` or ``num_streams`` differs across ranks (they decide which
            collectives the hook runs: a flag allreduce after the last bucket, the stream groups, each
            bucket's algorithm).

    Example:
        >>> ddp.register_comm_hook(*hvd.comm_hook())
    """
    cfg = runtime.config()
    ps = runtime.get_process_set(process_set)
    named = list(named_parameters or ())
    policy = nan_check or cfg.nan_check
    comp = resolve_compression(compression) or cfg.compression
    hier = hierarchical or cfg.hierarchical
    count = int(num_streams or cfg.num_streams)
    # Registration check (shoal.core.registration), one 16-byte allreduce: the names, shapes and dtypes when
    # given, and always the settings that decide which collectives run: the NaN policy (a rank without the
    # check would leave its peers waiting in the flag allreduce), the stream count (the stream groups are
    # created next, collectively: ranks asking for different counts would hang there), the wire format
    # and the hierarchy (which collectives each bucket runs).
    check_registration([(n, tuple(p.shape), p.dtype) for n, p in named], ps, what="DDP comm hook",
                       settings={"nan_check": policy, "compression": comp, "hierarchical": hier,
                                 "num_streams": count})
    streams = runtime.stream_groups(ps, count)
    algorithm = get_algorithm(comp, hier, ps, num_streams=count, error_feedback=error_feedback)
    state = CommHookState(ps, streams, algorithm, comp, hier,
                          nan_check=make_finite_check(policy, ps),
                          param_names={id(p): n for n, p in named})
    return state, allreduce_hook
