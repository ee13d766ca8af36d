"""Bad arguments to the user collectives, on real gloo ranks: Shoal's own TypeError / ValueError naming the
collective and the argument, with a HINT, never a raw AttributeError; and when only ONE rank passes the bad
argument, every rank fails at once (the bad rank with its own error, the others with a MismatchError that
names it in ``culprit_ranks``) instead of waiting for the process-group timeout.

Every public collective of ``shoal.torch`` (the autograd wrappers included) is covered, each async and
in-place variant, the object collectives and ``barrier``. The process-group timeout is 30 s and every
case must fail in under 5 s: a case that fell back to waiting would be caught by the time, not only by
the message. One launch of 3 ranks runs every case; the group must stay aligned after each (a Sum at the
end).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from shoal.testing import run_ranks

_BAD_RANK = 1
#: Cases whose bad value only the root sees (the others pass theirs through unused): on every rank alike
#: they are the one-bad-rank case again, so the all-bad test leaves them out.
_ROOT_ONLY = {"broadcast_object unpicklable"}


def _cases(hvd, bad: bool) -> dict:
    """name -> (call, what the bad rank's message must contain). ``bad``: this rank passes the bad value."""
    import torch.distributed as dist  # noqa: PLC0415

    t = torch.ones(6, 2)
    lst = [[1.0, 2.0]] * 6
    arr = np.ones((6, 2), dtype=np.float32)

    def pick(good, wrong):
        return wrong if bad else good

    return {
        "allreduce list": (lambda: hvd.allreduce(pick(t, lst), name="c"), ["allreduce of 'c'", "got list",
                                                                           "torch.as_tensor"]),
        "allreduce numpy": (lambda: hvd.allreduce(pick(t, arr), name="c"), ["got numpy.ndarray", "torch.as_tensor"]),
        "allreduce name": (lambda: hvd.allreduce(t, name=pick("c", 123)), ["allreduce: name=123 is an int"]),
        "allreduce op": (lambda: hvd.allreduce(t, name="c", op=pick(hvd.Sum, "Sum")), ["op='Sum' is a str"]),
        "allreduce prescale": (lambda: hvd.allreduce(t, name="c", prescale_factor=pick(0.5, "0.5")),
                               ["prescale_factor='0.5' is a str"]),
        "allreduce postscale": (lambda: hvd.allreduce(t, name="c", postscale_factor=pick(2.0, float("nan"))),
                                ["postscale_factor=nan is not finite"]),
        "allreduce_": (lambda: hvd.allreduce_(pick(t.clone(), lst), name="c"), ["got list"]),
        "allreduce_async": (lambda: hvd.synchronize(hvd.allreduce_async(pick(t, arr), name="c")),
                            ["got numpy.ndarray"]),
        "allreduce_async_": (lambda: hvd.synchronize(hvd.allreduce_async_(t.clone(), name=pick("c", 1.5))),
                             ["name=1.5 is a float"]),
        "grouped_allreduce tensor": (lambda: hvd.grouped_allreduce(pick([t], t), name="c"),
                                     ["tensors must be a list", "[t]"]),
        "grouped_allreduce element": (lambda: hvd.grouped_allreduce([t, pick(t, arr)], name="c"),
                                      ["tensors[1] must be a torch.Tensor"]),
        "grouped_allreduce_": (lambda: hvd.grouped_allreduce_([pick(t.clone(), lst)], name="c"), ["tensors[0]"]),
        "grouped_allreduce_async": (lambda: hvd.synchronize(hvd.grouped_allreduce_async(pick([t], 5), name="c")),
                                    ["tensors must be a list", "got int"]),
        "grouped_allreduce_async_": (lambda: hvd.synchronize(hvd.grouped_allreduce_async_([t.clone()], name="c",
                                                                                          op=pick(None, 2.5))),
                                     ["op=2.5 is a float"]),
        "allgather": (lambda: hvd.allgather(pick(t, arr), name="c"), ["allgather of 'c'", "numpy.ndarray"]),
        "allgather grad": (lambda: hvd.allgather(pick(t.clone().requires_grad_(), lst), name="c"), ["got list"]),
        "allgather_async": (lambda: hvd.synchronize(hvd.allgather_async(t, name=pick("c", 7))), ["name=7"]),
        "broadcast": (lambda: hvd.broadcast(pick(t, lst), 0, name="c"), ["broadcast of 'c'", "got list"]),
        "broadcast root": (lambda: hvd.broadcast(t, pick(0, 0.0), name="c"), ["root_rank=0.0 is a float"]),
        "broadcast_": (lambda: hvd.broadcast_(t.clone(), pick(0, "0"), name="c"), ["root_rank='0' is a str"]),
        "broadcast_async": (lambda: hvd.synchronize(hvd.broadcast_async(pick(t, arr), 0, name="c")),
                            ["numpy.ndarray"]),
        "broadcast_async_": (lambda: hvd.synchronize(hvd.broadcast_async_(t.clone(), 0, name="c",
                                                                          process_set=pick(None, "all"))),
                             ["process_set='all' is a str, not a ProcessSet"]),
        "alltoall": (lambda: hvd.alltoall(pick(t, arr), name="c"), ["alltoall of 'c'", "numpy.ndarray"]),
        "alltoall splits": (lambda: hvd.alltoall(t, splits=pick([2, 2, 2], [2.0, 2.0, 2.0]), name="c"),
                            ["splits=[2.0, 2.0, 2.0] must be a list of integers"]),
        "alltoall_async": (lambda: hvd.synchronize(hvd.alltoall_async(t, splits=pick([2, 2, 2], 6), name="c")),
                           ["splits=6"]),
        "reducescatter": (lambda: hvd.reducescatter(pick(t, lst), name="c"), ["reducescatter of 'c'", "got list"]),
        "reducescatter op": (lambda: hvd.reducescatter(t, name="c", op=pick(hvd.Sum, dist.ReduceOp.BXOR)),
                             ["ReduceOp.BXOR is not supported"]),
        "reducescatter_async": (lambda: hvd.synchronize(hvd.reducescatter_async(t, name=pick("c", b"c"))),
                                ["name=b'c' is a bytes"]),
        "grouped_allgather": (lambda: hvd.grouped_allgather(pick([t], t), name="c"),
                              ["grouped_allgather of 'c': tensors must be a list"]),
        "grouped_allgather name": (lambda: hvd.grouped_allgather([t], name=pick("c", 3)),
                                   ["grouped_allgather: name=3 is an int"]),
        "grouped_allgather_async": (lambda: hvd.synchronize(hvd.grouped_allgather_async([pick(t, arr)], name="c")),
                                    ["allgather of 'c.0'", "numpy.ndarray"]),
        "grouped_reducescatter": (lambda: hvd.grouped_reducescatter(pick([t], {"t": t}), name="c"),
                                  ["tensors must be a list", "got dict"]),
        "grouped_reducescatter_async": (lambda: hvd.synchronize(hvd.grouped_reducescatter_async(
            [t], name="c", op=pick(hvd.Sum, dist.ReduceOp.PREMUL_SUM))), ["ReduceOp.PREMUL_SUM"]),
        "broadcast_object name": (lambda: hvd.broadcast_object(1, name=pick("c", 123)),
                                  ["broadcast_object: name=123"]),
        "broadcast_object root": (lambda: hvd.broadcast_object(1, root_rank=pick(0, None), name="c"),
                                  ["root_rank=None is a NoneType"]),
        "broadcast_object trusted": (lambda: hvd.broadcast_object(1, name="c", trusted=pick(True, "yes")),
                                     ["trusted='yes' must be True or False"]),
        "broadcast_object unpicklable": (lambda: hvd.broadcast_object(pick(1, lambda: 0), root_rank=_BAD_RANK,
                                                                      name="c"), ["cannot be pickled"]),
        "allgather_object name": (lambda: hvd.allgather_object(1, name=pick("c", ["c"])),
                                  ["allgather_object: name=['c'] is a list"]),
        "allgather_object plain": (lambda: hvd.allgather_object(pick(1, np.float32(1)), name="c", trusted=False),
                                   ["the object is a numpy.float32", ".item()"]),
        "barrier": (lambda: hvd.barrier(process_set=pick(None, [0, 1, 2])),
                    ["barrier: process_set=[0, 1, 2] is a list, not a ProcessSet"]),
    }


def _one_bad_rank() -> dict:
    import shoal.torch as hvd  # noqa: PLC0415

    me = hvd.rank()
    out = {}
    for key, (call, _) in _cases(hvd, bad=me == _BAD_RANK).items():
        start = time.monotonic()
        try:
            call()
            out[key] = {"error": "no error"}
        except Exception as exc:  # noqa: BLE001 (the test reports what each rank raised)
            out[key] = {"error": f"{type(exc).__name__}: {exc}", "culprits": list(getattr(exc, "culprit_ranks", ())),
                        "s": time.monotonic() - start}
    out["after"] = hvd.allreduce(torch.ones(1), op=hvd.Sum, name="after").tolist()
    return out


def test_a_bad_argument_on_one_rank_fails_every_rank_at_once_with_the_named_error():
    import shoal.torch as hvd

    results = run_ranks(_one_bad_rank, world_size=3, timeout_s=120, pg_timeout_s=30)
    for key, (_, needed) in _cases(hvd, bad=True).items():
        bad = results[_BAD_RANK][key]
        assert bad["error"].split(":")[0] in ("TypeError", "ValueError"), (key, bad)
        for text in needed + ["HINT"]:
            assert text in bad["error"], (key, text, bad["error"])
        for r in (0, 2):
            peer = results[r][key]
            assert peer["error"].startswith("MismatchError"), (key, r, peer)
            assert f"rank {_BAD_RANK} rejected" in peer["error"] and "HINT" in peer["error"], (key, r, peer)
            assert peer["culprits"] == [_BAD_RANK], (key, r, peer)
        for r in range(3):
            assert results[r][key]["s"] < 5, (key, r, results[r][key])
    assert all(res["after"] == [3.0] for res in results)


# ------------------------------------------------------------------------------------------------------
# The same bad argument on every rank: each raises its own error (no MismatchError: nobody disagrees
# about what was called); and with check_collectives off the errors are still Shoal's, at once.
# ------------------------------------------------------------------------------------------------------

def _all_bad() -> dict:
    import shoal.torch as hvd  # noqa: PLC0415

    out = {}
    for key, (call, _) in _cases(hvd, bad=True).items():
        if key in _ROOT_ONLY:
            continue
        try:
            call()
            out[key] = "no error"
        except Exception as exc:  # noqa: BLE001
            out[key] = f"{type(exc).__name__}: {exc}"
    out["after"] = hvd.allreduce(torch.ones(1), op=hvd.Sum, name="after").tolist()
    return out


def test_a_bad_argument_on_every_rank_is_each_ranks_own_error():
    import shoal.torch as hvd

    cases = _cases(hvd, bad=True)
    for env in ({}, {"SHOAL_CHECK_COLLECTIVES": "0"}):
        results = run_ranks(_all_bad, world_size=3, timeout_s=120, pg_timeout_s=30, env=env)
        for r, res in enumerate(results):
            for key, (_, needed) in cases.items():
                if key in _ROOT_ONLY:
                    continue
                assert res[key].split(":")[0] in ("TypeError", "ValueError"), (env, r, key, res[key])
                assert all(text in res[key] for text in needed), (env, r, key, res[key])
            assert res["after"] == [3.0]
