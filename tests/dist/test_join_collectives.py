"""``hvd.join()`` with the other ranks' user collectives (Horovod's semantics, shoal.core.join constraint 2):
a joined rank adds zeros to allreduce / grouped_allreduce (Sum, Average, Adasum), passes a barrier, and any
other collective fails at once on the ranks that called it, naming the joined ranks. Before, every such
collective waited for the whole timeout and then failed on both sides.

References: the same computation on one process (a joined rank contributes zeros; Average divides by the
whole set, integers truncated as Horovod does). Exact equality (small integers and floats).
"""

from __future__ import annotations

import time

import pytest
import torch

from shoal.testing import RanksFailed, run_ranks


def _x(rank: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.arange(6, dtype=torch.float64).reshape(2, 3) - 3 + 2 * rank).to(dtype)


def _rank_collectives_while_joined(world: int) -> dict:
    """Each rank in turn joins first; the others run every kind of collective against it."""
    import shoal.torch as hvd

    hvd.init()
    me = hvd.rank()
    out = {}
    start = time.monotonic()
    for first in range(world):
        if me == first:
            out[f"ret{first}"] = hvd.join()
            out[f"rets{first}"] = hvd.allgather_object(out[f"ret{first}"])
            continue
        others = [r for r in range(world) if r != first]
        got = {
            "avg": hvd.allreduce(_x(me), name="a"),
            "sum": hvd.allreduce(_x(me), name="s", op=hvd.Sum),
            "int_avg": hvd.allreduce(_x(me, torch.int32), name="i", op=hvd.Average),
            "grouped": hvd.grouped_allreduce([_x(me), _x(me, torch.float64)], name="g", op=hvd.Sum),
            "async": hvd.synchronize(hvd.allreduce_async(_x(me), name="h", op=hvd.Sum)),
        }
        exp_sum = sum(_x(r, torch.float64) for r in others)
        checks = {
            "avg": torch.equal(got["avg"], (exp_sum / world).float()),
            "sum": torch.equal(got["sum"], exp_sum.float()),
            "int_avg": torch.equal(got["int_avg"], torch.div(exp_sum.long(), world, rounding_mode="trunc").int()),
            "grouped": torch.equal(got["grouped"][0], exp_sum.float()) and torch.equal(got["grouped"][1], exp_sum),
            "async": torch.equal(got["async"], exp_sum.float()),
        }
        hvd.barrier()  # passes: the joined rank answers it
        refused = {}
        for kind, call in (("allgather", lambda: hvd.allgather(_x(me))),
                           ("broadcast", lambda: hvd.broadcast(_x(me), others[0])),
                           ("min", lambda: hvd.allreduce(_x(me), op=hvd.Min)),
                           ("alltoall", lambda: hvd.alltoall(_x(me).reshape(-1)[:world * 2]))):
            t0 = time.monotonic()
            try:
                call()
                refused[kind] = "no error"
            except hvd.MismatchError as exc:
                refused[kind] = (f"rank {first} called join()" in str(exc) and exc.culprit_ranks == (first,)
                                 and time.monotonic() - t0 < 5)
        out[f"checks{first}"], out[f"refused{first}"] = checks, refused
        out[f"ret{first}"] = hvd.join()
        out[f"rets{first}"] = hvd.allgather_object(out[f"ret{first}"])
    out["seconds"] = time.monotonic() - start
    hvd.shutdown()
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_joined_rank_answers_the_others_collectives(world):
    results = run_ranks(_rank_collectives_while_joined, world_size=world, timeout_s=90, pg_timeout_s=30,
                        args=(world,))
    for me, r in enumerate(results):
        for first in range(world):
            assert r[f"rets{first}"] == [r[f"ret{first}"]] * world, r  # the same answer on every rank
            assert r[f"ret{first}"] != first or world == 1, r           # the first to join is not the last
            if me != first:
                assert all(r[f"checks{first}"].values()), r[f"checks{first}"]
                assert all(v is True for v in r[f"refused{first}"].values()), r[f"refused{first}"]
        assert r["seconds"] < 30, r  # no timeout anywhere (the groups' timeout is 30 s)


def _rank_training_with_metrics(batches: tuple[int, int]) -> dict:
    """Uneven batches, an optimizer, and a user allreduce of the loss after every step: the joined rank
    shadows the steps and answers the metric's allreduce with zeros."""
    import shoal.torch as hvd

    hvd.init()
    me, world = hvd.rank(), hvd.size()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ref = torch.nn.Linear(4, 2)
    ref.load_state_dict(model.state_dict())
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                   named_parameters=model.named_parameters())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)

    def batch(step, rank):
        g = torch.Generator().manual_seed(100 * step + rank)
        return torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g)

    metrics, expected = [], []
    for step in range(batches[me]):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(*batch(step, me)[:1]), batch(step, me)[1])
        loss.backward()
        opt.step()
        metrics.append(hvd.allreduce(loss.detach(), name="metrics.loss", op=hvd.Sum).item())
        expected.append(sum(torch.nn.functional.mse_loss(ref(batch(step, r)[0]), batch(step, r)[1]).item()
                            for r in range(world) if step < batches[r]))
        # Reference step after the metric: the metric is of the weights before the step, on every rank.
        ref_opt.zero_grad()
        sum(torch.nn.functional.mse_loss(ref(batch(step, r)[0]), batch(step, r)[1])
            for r in range(world) if step < batches[r]).div(world).backward()
        ref_opt.step()
    last = hvd.join()
    hvd.broadcast_parameters(model.state_dict(), root_rank=last)
    for step in range(batches[me], max(batches)):  # the rest of the reference, for the final weights
        ref_opt.zero_grad()
        sum(torch.nn.functional.mse_loss(ref(batch(step, r)[0]), batch(step, r)[1])
            for r in range(world) if step < batches[r]).div(world).backward()
        ref_opt.step()
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    hvd.shutdown()
    return {"last": last, "metric_diff": max([abs(a - b) for a, b in zip(metrics, expected)] or [0.0]),
            "weight_diff": diff}


@pytest.mark.parametrize("batches", [(5, 2), (3, 0)], ids=["joins-after-2-steps", "joins-before-step-1"])
def test_metric_allreduce_after_each_step_while_a_rank_is_joined(batches):
    results = run_ranks(_rank_training_with_metrics, world_size=2, timeout_s=60, pg_timeout_s=20, args=(batches,))
    for r in results:
        assert r["last"] == 0, r
        assert r["metric_diff"] < 1e-5 and r["weight_diff"] < 1e-6, r


def _rank_joined_and_forgotten() -> dict:
    import shoal.torch as hvd

    hvd.init()
    if hvd.rank() == 1:
        try:
            hvd.join()
        except hvd.StallError as exc:
            return {"type": "StallError", "text": str(exc), "ranks": exc.missing_ranks}
        return {"type": None}
    time.sleep(6)  # neither a collective nor join() for longer than timeout_s (3 s)
    return {"type": None}


def test_joined_rank_with_nothing_to_answer_stops_after_the_timeout():
    start = time.monotonic()
    try:
        results = run_ranks(_rank_joined_and_forgotten, world_size=2, timeout_s=40, pg_timeout_s=3, grace_s=8)
    except RanksFailed as exc:  # rank 0 may see rank 1's exit; rank 1's report is what is checked
        results = [r.value for r in exc.results]
    r1 = results[1]
    assert r1["type"] == "StallError" and "joined so far: 1 of 2 ranks" in r1["text"], r1
    assert time.monotonic() - start < 30
