"""``shoal.torch.join()``: uneven inputs, with Horovod's semantics.

The mechanism (rounds of zero-gradient steps, the "joined" flag in the per-step negotiation, who joined
last) lives in :func:`shoal.core.join.join`; this is the PyTorch spelling of it.
"""

from __future__ import annotations

from typing import Optional

from shoal.core import join as _join
from shoal.core import runtime

__all__ = ["join"]


def join(device: int = -1, process_set: Optional[runtime.ProcessSet] = None) -> int:
    """Say that this rank has finished its data; return the rank that joined last.

    Until every rank has called ``join()``, this rank takes part in the other ranks' optimizer steps with
    zero gradients (every ``DistributedOptimizer`` it stepped is synchronized once per round, its own
    ``step()`` is not called), so ranks with more batches finish them instead of hanging. ``Average`` divides
    by the full number of ranks, joined ones included, as in Horovod. A joined rank's parameters stay where
    its last step left them: broadcast from the returned rank afterwards if every rank needs the final model.

    Only the optimizers' gradient reductions are shadowed. A user collective (``hvd.allreduce`` of a metric,
    say) that the other ranks call while this rank is joined finds no partner: this rank raises
    ``StallError`` after ``stall_timeout_s`` (default 90% of ``timeout_s``), the others
    ``RankFailureError`` after ``timeout_s``, each naming the other and where it is (here: ``step k of
    DistributedOptimizer (inside join())``; there: ``allreduce of 'name' (call n on process set [...])``,
    seen when their timeout comes within this rank's last 1.5 s of looking). Keep such collectives out of
    loops whose length differs across ranks.

    Args:
        device: accepted for Horovod compatibility (where Horovod allocates its zero tensors); the zeros
            here are the optimizer's own gradient buffers.
        process_set: the ranks to join over (default: all).

    Returns:
        The rank of the last process that called ``join()``.

    Raises:
        ShoalError: a ``DistributedOptimizer`` was built with ``negotiation="off"``.
        MismatchError / RankFailureError / StallError: as in ``optimizer.step()``; StallError also when the
            other ranks are in a user collective (see above).

    Example:
        >>> for x, y in loader:           # not the same number of batches on every rank
        ...     opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        >>> last = hvd.join()
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=last)
    """
    del device  # the zeros are the optimizers' own (zeroed) buffers
    return _join.join(process_set)
