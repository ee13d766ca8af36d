"""Reference tests for the Horovod-style collectives (shoal.core.collectives) on real gloo ranks.

Every rank builds the inputs of *every* rank from a seed, so it can compute the expected result on its own
(a single-process reference) and compare. Many cases run inside one rank function to keep process launches
few (each run_ranks costs about a second here).

Tolerances (written out, per dtype) for float results; integer and bool results must be exact:
    float64  rtol 1e-12, atol 1e-12   (summation order differs from the reference)
    float32  rtol 1e-5,  atol 1e-6
    float16  rtol 1e-3,  atol 1e-3    (one ulp at 1.0 is 2**-10 ~ 9.8e-4)
    bfloat16 rtol 8e-3,  atol 8e-3    (one ulp at 1.0 is 2**-7 ~ 7.8e-3)
"""

from __future__ import annotations

import time

import pytest
import torch

from shoal.testing import run_ranks

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTS = (torch.int32, torch.int64, torch.uint8)
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def _data(rank: int, shape, dtype: torch.dtype, seed: int = 0, positive: bool = False) -> torch.Tensor:
    """The input of ``rank`` (any rank can build any rank's input)."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        if positive:  # for Product: stays near 1, no overflow
            return (0.5 + torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    low, high = (1, 4) if positive else ((0, 40) if dtype == torch.uint8 else (-50, 50))
    return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)


def _reduce(xs: list[torch.Tensor], op: str) -> torch.Tensor:
    """Single-process reference: float inputs in float64, integers in int64; cast back to the input dtype."""
    dtype = xs[0].dtype
    wide = torch.stack([x.to(torch.float64 if dtype.is_floating_point else torch.int64) for x in xs])
    if op == "Sum":
        out = wide.sum(0)
    elif op == "Average":
        out = wide.sum(0) / len(xs) if dtype.is_floating_point else torch.div(wide.sum(0), len(xs),
                                                                             rounding_mode="trunc")
    elif op == "Min":
        out = wide.min(0).values
    elif op == "Max":
        out = wide.max(0).values
    elif op == "Product":
        out = wide.prod(0)
    else:
        raise AssertionError(op)
    return out.to(dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.dtype in TOL:
        # torch.isclose, not torch.testing.assert_close: the latter imports ~500 modules on first use
        # (measured 2.4 s per rank here).
        rtol, atol = TOL[expected.dtype]
        a, e = actual.double(), expected.double()
        bad = ~torch.isclose(a, e, rtol=rtol, atol=atol)
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements outside rtol={rtol}, "
                                 f"atol={atol}; first at flat index {i}: {a.reshape(-1)[i].item()} vs "
                                 f"{e.reshape(-1)[i].item()}")
    else:
        assert torch.equal(actual, expected), f"{what}: {actual.tolist()} != {expected.tolist()}"


# --------------------------------------------------------------------------------------------------------
# Reductions: allreduce (every op x dtype, in place, async), scaling, legacy average=, grouped
# --------------------------------------------------------------------------------------------------------

def _reductions() -> dict:
    import torch.distributed as dist

    from shoal.core import collectives as C
    from shoal.core import runtime as rt

    me, n = rt.rank(), rt.size()
    shape = (3, 5)
    cases = 0
    for seed, dtype in enumerate(FLOATS + INTS):
        for op in ("Sum", "Average", "Min", "Max", "Product"):
            if op == "Average" and dtype == torch.uint8:
                continue  # covered by the int types; uint8 sums overflow by design
            pos = op == "Product" or dtype == torch.uint8
            xs = [_data(r, shape, dtype, seed, positive=pos) for r in range(n)]
            expected = _reduce(xs, op)
            what = f"allreduce {op} {dtype}"
            before = xs[me].clone()
            _close(C.allreduce(xs[me], op=getattr(C, op)), expected, what)
            assert torch.equal(xs[me], before), f"{what}: out-of-place call modified its input"
            cases += 1
            if op in ("Sum", "Average"):  # the variants share the code path; check them on every dtype once
                inplace = xs[me].clone()
                assert C.allreduce_(inplace, op=getattr(C, op)) is inplace
                _close(inplace, expected, what + " (in place)")
                handle = C.allreduce_async_(xs[me].clone(), op=getattr(C, op), name=f"async.{op}.{dtype}")
                _close(C.synchronize(handle), expected, what + " (async, in place)")
                cases += 2

    # bool: Min is logical and, Max logical or; Sum is refused with a HINT (raised on every rank alike).
    bs = [_data(r, (8,), torch.bool, 7) for r in range(n)]
    _close(C.allreduce(bs[me], op=C.Min), torch.stack(bs).all(0), "bool Min")
    _close(C.allreduce(bs[me], op=C.Max), torch.stack(bs).any(0), "bool Max")
    try:
        C.allreduce(bs[me], op=C.Sum)
        raise AssertionError("bool Sum should raise")
    except ValueError as exc:
        assert "bool" in str(exc) and "HINT" in str(exc)

    # Default op is Average; legacy average=True/False; both given -> ValueError on every rank.
    xs = [_data(r, (4,), torch.float32, 11) for r in range(n)]
    _close(C.allreduce(xs[me]), _reduce(xs, "Average"), "default op")
    _close(C.allreduce(xs[me], average=True), _reduce(xs, "Average"), "average=True")
    _close(C.allreduce(xs[me], average=False), _reduce(xs, "Sum"), "average=False")
    try:
        C.allreduce(xs[me], average=True, op=C.Sum)
        raise AssertionError("average= and op= together should raise")
    except ValueError as exc:
        assert "average=" in str(exc)
    # Adasum: the tree of pairwise combinations, computed here from every rank's input (the algorithm's
    # own tests are in test_adasum.py).
    from shoal.core.algorithms.adasum import adasum_combine

    vs = [x.double() for x in xs]
    p = 1 << (n.bit_length() - 1)  # ranks past the largest power of two fold into a partner first
    vs = [adasum_combine(vs[i], vs[i + p]) if i + p < n else vs[i] for i in range(p)]
    d = 1
    while d < p:  # then pairs at distance 1, 2, 4, ...: combine(combine(v0, v1), combine(v2, v3))
        vs = [adasum_combine(vs[i], vs[i + d]) if i % (2 * d) == 0 else vs[i] for i in range(p)]
        d *= 2
    _close(C.allreduce(xs[me], op=C.Adasum), vs[0].float(), "Adasum")

    # prescale before the sum, postscale after (and after averaging).
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        xs = [_data(r, (6,), dtype, 12) for r in range(n)]
        wide = [x.double() for x in xs]
        exp_sum = (torch.stack([w * 0.5 for w in wide]).sum(0) * 3.0).to(dtype)
        exp_avg = (torch.stack([w * 0.5 for w in wide]).sum(0) / n * 3.0).to(dtype)
        _close(C.allreduce(xs[me], op=C.Sum, prescale_factor=0.5, postscale_factor=3.0), exp_sum, f"scale {dtype}")
        _close(C.allreduce(xs[me], op=C.Average, prescale_factor=0.5, postscale_factor=3.0), exp_avg,
               f"scale avg {dtype}")
    # Integers: scaled in float64 and truncated toward zero (5 * 0.5 -> 2 on every rank).
    five = torch.full((2,), 5, dtype=torch.int32)
    _close(C.allreduce(five, op=C.Sum, prescale_factor=0.5), torch.full((2,), 2 * n, dtype=torch.int32),
           "int prescale truncates")
    _close(C.allreduce(five, op=C.Sum, postscale_factor=2.0), torch.full((2,), 10 * n, dtype=torch.int32),
           "int postscale")

    # Integer Average truncates toward zero (Horovod's C++ core scales by 1/size in double and stores the
    # integer; its test suite checks div(rounding_mode="trunc")): on 3 ranks the sums are -10 and 8, so
    # the averages are -3 (flooring would give -4) and 2.
    ints = torch.tensor([me * me - 5, me * me + 1], dtype=torch.int64)
    exp = torch.div(torch.tensor([sum(r * r - 5 for r in range(n)), sum(r * r + 1 for r in range(n))]), n,
                    rounding_mode="trunc")
    if n == 3:
        assert exp.tolist() == [-3, 2]
    _close(C.allreduce(ints, op=C.Average), exp, "int average truncates")

    # Non-contiguous in-place target: the result lands in the base storage.
    base = _data(me, (4, 3), torch.float32, 13)
    view = base.t()
    assert not view.is_contiguous()
    expected = _reduce([_data(r, (4, 3), torch.float32, 13) for r in range(n)], "Sum").t()
    C.allreduce_(view, op=C.Sum)
    _close(view, expected, "non-contiguous allreduce_")
    _close(base, expected.t(), "non-contiguous allreduce_ base storage")

    # Zero elements, 0-d tensors, a tensor that requires grad (the collective does not track autograd).
    _close(C.allreduce(torch.empty(0, 3), op=C.Sum), torch.empty(0, 3), "empty")
    _close(C.allreduce(torch.tensor(float(me)), op=C.Sum), torch.tensor(float(sum(range(n)))), "0-d")
    leaf = torch.ones(2, requires_grad=True)
    C.allreduce_(leaf, op=C.Sum)
    _close(leaf.detach(), torch.full((2,), float(n)), "requires_grad leaf in place")

    # grouped_allreduce with mixed dtypes: one collective per dtype (counted through a wrapper around the
    # real dist.all_reduce), results equal to tensor-by-tensor references.
    specs = [((3, 4), torch.float32), ((5,), torch.float16), ((2, 2), torch.int64), ((7,), torch.float32),
             ((1,), torch.bfloat16), ((0,), torch.float32)]
    calls = []
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    for op in ("Sum", "Average"):
        groups = [[_data(r, s, d, 20 + i) for i, (s, d) in enumerate(specs)] for r in range(n)]
        dist.all_reduce = counting
        try:
            outs = C.grouped_allreduce(groups[me], op=getattr(C, op), name=f"grouped.{op}")
        finally:
            dist.all_reduce = real
        assert len(calls) == 4, f"grouped {op}: {len(calls)} collectives for 4 dtypes"
        calls.clear()
        for i in range(len(specs)):
            _close(outs[i], _reduce([groups[r][i] for r in range(n)], op), f"grouped {op} tensor {i}")
        mine = [t.clone() for t in groups[me]]
        res = C.grouped_allreduce_(mine, op=getattr(C, op))
        assert all(a is b for a, b in zip(res, mine))
        for i in range(len(specs)):
            _close(mine[i], _reduce([groups[r][i] for r in range(n)], op), f"grouped_ {op} tensor {i}")
        h = C.grouped_allreduce_async(groups[me], op=getattr(C, op))
        for i, t in enumerate(C.synchronize(h)):
            _close(t, _reduce([groups[r][i] for r in range(n)], op), f"grouped async {op} tensor {i}")
    assert C.grouped_allreduce([]) == []
    # Min / Max / Product, grouped, on the same mixed dtypes (positive inputs keep Product near 1).
    for op in ("Min", "Max", "Product"):
        groups = [[_data(r, s, d, 40 + i, positive=op == "Product") for i, (s, d) in enumerate(specs)]
                  for r in range(n)]
        outs = C.grouped_allreduce(groups[me], op=getattr(C, op), name=f"grouped.{op}")
        for i in range(len(specs)):
            _close(outs[i], _reduce([groups[r][i] for r in range(n)], op), f"grouped {op} tensor {i}")
        mine = [t.clone() for t in groups[me]]
        C.synchronize(C.grouped_allreduce_async_(mine, op=getattr(C, op)))
        for i in range(len(specs)):
            _close(mine[i], _reduce([groups[r][i] for r in range(n)], op), f"grouped async_ {op} tensor {i}")

    # Several operations in flight at once; poll until all are done; synchronize in another order.
    a = [_data(r, (1000,), torch.float32, 30) for r in range(n)]
    b = [_data(r, (r + 1, 2), torch.int64, 31) for r in range(n)]
    c = _data(me, (5,), torch.float64, 32)
    handles = [C.allreduce_async(a[me], op=C.Sum), C.allgather_async(b[me]), C.broadcast_async_(c, root_rank=1),
               C.allreduce_async_(a[me].clone(), op=C.Max)]
    deadline = time.monotonic() + 20
    while not all(C.poll(h) for h in handles):
        assert time.monotonic() < deadline, "async handles never completed"
        time.sleep(0.001)
    _close(C.synchronize(handles[3]), _reduce(a, "Max"), "in flight: max")
    _close(C.synchronize(handles[2]), _data(1, (5,), torch.float64, 32), "in flight: broadcast_")
    assert C.synchronize(handles[2]) is c  # a second synchronize returns the same result
    _close(C.synchronize(handles[1]), torch.cat(b), "in flight: allgather")
    _close(C.synchronize(handles[0]), _reduce(a, "Sum"), "in flight: sum")
    assert "allreduce" in repr(handles[0])
    try:
        C.synchronize(7)
        raise AssertionError("synchronize(int) should raise")
    except TypeError as exc:
        assert "HINT" in str(exc)
    return {"cases": cases}


@pytest.mark.timeout(120)
def test_reductions_match_single_process_reference():
    results = run_ranks(_reductions, world_size=3, timeout_s=90)
    n_dtypes = len(FLOATS) + len(INTS)
    assert results[0]["cases"] == (n_dtypes * 5 - 1) + 2 * (2 * n_dtypes - 1)


# --------------------------------------------------------------------------------------------------------
# Data movement: allgather, broadcast, alltoall, reducescatter, object collectives, barrier
# --------------------------------------------------------------------------------------------------------

DATA_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8,
               torch.bool, torch.float64)


def _data_movement() -> dict:
    from shoal.core import collectives as C
    from shoal.core import runtime as rt

    me, n = rt.rank(), rt.size()
    assert n == 3
    for seed, dtype in enumerate(DATA_DTYPES):
        # Every dtype once through each collective; the shape and variant cases on two dtypes.
        variants = dtype in (torch.float32, torch.int64)

        # allgather: uneven (with a rank of 0 rows); even, all empty, 1-d, async.
        for rows in ((2, 0, 3),) + (((2, 2, 2), (0, 0, 0)) if variants else ()):
            xs = [_data(r, (rows[r], 4), dtype, seed) for r in range(n)]
            _close(C.allgather(xs[me]), torch.cat(xs), f"allgather {rows} {dtype}")
        if variants:
            xs = [_data(r, (r + 1,), dtype, seed) for r in range(n)]
            _close(C.synchronize(C.allgather_async(xs[me])), torch.cat(xs), f"allgather 1-d {dtype}")

        # broadcast: out of place leaves the input alone; in place overwrites it; every root.
        for root in range(n) if variants else (1,):
            x = _data(me, (2, 3), dtype, seed)
            before = x.clone()
            _close(C.broadcast(x, root_rank=root), _data(root, (2, 3), dtype, seed), f"broadcast {root} {dtype}")
            assert torch.equal(x, before)
        if variants:
            x = _data(me, (2, 3), dtype, seed)
            assert C.broadcast_(x, 2) is x
            _close(x, _data(2, (2, 3), dtype, seed), f"broadcast_ {dtype}")
            y = _data(me, (3, 2), dtype, seed).t()   # non-contiguous in-place target
            C.synchronize(C.broadcast_async_(y, 0))
            _close(y, _data(0, (3, 2), dtype, seed).t(), f"broadcast_async_ non-contiguous {dtype}")

        # alltoall with uneven splits, zeros included: rank s sends S[s][d] rows to rank d.
        split = [[(s + 2 * d) % 3 for d in range(n)] for s in range(n)]   # has zeros
        xs = [_data(s, (sum(split[s]), 2), dtype, seed) for s in range(n)]
        offsets = [[sum(split[s][:d]) for d in range(n)] for s in range(n)]
        expected = torch.cat([xs[s][offsets[s][me]: offsets[s][me] + split[s][me]] for s in range(n)])
        out, got = C.alltoall(xs[me], splits=split[me])
        _close(out, expected, f"alltoall splits {dtype}")
        assert got.dtype == torch.int32 and got.tolist() == [split[s][me] for s in range(n)]
        if variants:
            out, got = C.alltoall(xs[me], splits=torch.tensor(split[me], dtype=torch.int64))
            _close(out, expected, f"alltoall tensor splits {dtype}")
            assert got.dtype == torch.int64 and got.tolist() == [split[s][me] for s in range(n)]
            out, got = C.synchronize(C.alltoall_async(xs[me], splits=split[me]))
            _close(out, expected, f"alltoall async {dtype}")
            # Even split (no splits): rank s sends chunk d of its rows to rank d; Horovod returns only
            # the output in this case.
            xs = [_data(r, (6, 2), dtype, seed) for r in range(n)]
            expected = torch.cat([xs[s][2 * me: 2 * me + 2] for s in range(n)])
            _close(C.alltoall(xs[me]), expected, f"alltoall even {dtype}")

    # reducescatter: every op x dtype, uneven rows (7 over 3 ranks: 3, 2, 2), fewer rows than ranks,
    # prescale/postscale. Horovod's split: the first dim0 % n ranks get one extra row.
    for seed, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32,
                                  torch.int64)):
        variants = dtype in (torch.float32, torch.int32)
        for rows in (6, 7, 2) if variants else (7,):
            counts = [rows // n + (1 if i < rows % n else 0) for i in range(n)]
            start = sum(counts[:me])
            # Every op on every dtype (16-bit Product is computed in float32 and rounded once).
            for op in ("Sum", "Average", "Min", "Max", "Product"):
                xs = [_data(r, (rows, 3), dtype, seed, positive=op == "Product") for r in range(n)]
                expected = _reduce(xs, op)[start: start + counts[me]]
                _close(C.reducescatter(xs[me], op=getattr(C, op)), expected, f"reducescatter {rows} {op} {dtype}")
        if dtype.is_floating_point:
            xs = [_data(r, (5, 2), dtype, seed) for r in range(n)]
            counts = [2, 2, 1]
            start = sum(counts[:me])
            exp = (torch.stack([x.double() * 0.25 for x in xs]).sum(0) / n * 4.0).to(dtype)[start: start + counts[me]]
            _close(C.synchronize(C.reducescatter_async(xs[me], op=C.Average, prescale_factor=0.25,
                                                       postscale_factor=4.0)), exp, f"reducescatter scaled {dtype}")

    # Object collectives and barrier.
    assert C.broadcast_object({"from": me, "list": [me] * 3}, root_rank=2) == {"from": 2, "list": [2, 2, 2]}
    assert C.broadcast_object("zero") == "zero"
    assert C.allgather_object(("r", me)) == [("r", r) for r in range(n)]
    C.barrier()
    return {"ok": True}


@pytest.mark.timeout(120)
def test_data_movement_matches_reference():
    assert run_ranks(_data_movement, world_size=3, timeout_s=90) == [{"ok": True}] * 3


# --------------------------------------------------------------------------------------------------------
# Process sets, and 16-bit accumulation on 4 ranks
# --------------------------------------------------------------------------------------------------------

def _process_sets() -> dict:
    from shoal.core import collectives as C
    from shoal.core import runtime as rt

    me, n = rt.rank(), rt.size()
    evens = rt.add_process_set([0, 2])
    odd_out = {}
    if evens.included():
        members = [0, 2]
        xs = {r: _data(r, (4,), torch.float32, 40) for r in members}
        _close(C.allreduce(xs[me], op=C.Sum, process_set=evens), _reduce([xs[0], xs[2]], "Sum"), "set allreduce")
        _close(C.allreduce(xs[me], process_set=evens), _reduce([xs[0], xs[2]], "Average"), "set average (/2)")
        ys = {r: _data(r, (r + 1, 2), torch.int64, 41) for r in members}
        _close(C.allgather(ys[me], process_set=evens), torch.cat([ys[0], ys[2]]), "set allgather")
        _close(C.broadcast(xs[me], root_rank=2, process_set=evens), xs[2], "set broadcast, global root 2")
        zs = {r: _data(r, (4, 2), torch.float32, 42) for r in members}
        pos = members.index(me)
        _close(C.alltoall(zs[me], process_set=evens), torch.cat([zs[s][2 * pos: 2 * pos + 2] for s in members]),
               "set alltoall")
        _close(C.reducescatter(zs[me], op=C.Sum, process_set=evens),
               _reduce([zs[0], zs[2]], "Sum")[2 * pos: 2 * pos + 2], "set reducescatter")
        outs = C.grouped_allreduce([xs[me], ys[0]], op=C.Sum, process_set=evens)
        _close(outs[0], _reduce([xs[0], xs[2]], "Sum"), "set grouped")
        C.barrier(process_set=evens)
        assert C.broadcast_object(me * 10, root_rank=2, process_set=evens) == 20
        assert C.allgather_object(me, process_set=evens) == [0, 2]
        try:
            C.broadcast(xs[me], root_rank=1, process_set=evens)
            raise AssertionError("a root outside the set should raise")
        except ValueError as exc:
            assert "root_rank 1" in str(exc) and "HINT" in str(exc)
    else:
        # A rank outside the set gets a clear error, and no collective is started.
        try:
            C.allreduce(torch.ones(2), name="outsider", process_set=evens)
            raise AssertionError("a non-member call should raise")
        except ValueError as exc:
            odd_out["error"] = str(exc)
    try:
        C.allreduce(torch.ones(1), process_set=rt.ProcessSet([0, 1]))
        raise AssertionError("an unregistered set should raise")
    except ValueError as exc:
        assert "not registered" in str(exc)

    # The world still works afterwards.
    _close(C.allreduce(torch.ones(1), op=C.Sum), torch.tensor([float(n)]), "world after sets")

    # 16-bit floats are reduced in float32 on CPU: the result is the correctly rounded sum. Inputs in
    # [0.5, 1) keep every float32 partial sum exact, so the reference is exact too (tolerance: none).
    # Summing in 16 bits would round at every hop and miss it on a third of the elements (measured).
    exact = {}
    for dtype in (torch.float16, torch.bfloat16):
        xs = [(0.5 + 0.5 * torch.rand(4096, generator=torch.Generator().manual_seed(50 + r))).to(dtype)
              for r in range(n)]
        expected = torch.stack([x.double() for x in xs]).sum(0).to(dtype)
        got = C.allreduce(xs[me], op=C.Sum)
        exact[str(dtype)] = bool(torch.equal(got, expected))
    return {"odd": odd_out, "exact": exact}


@pytest.mark.timeout(120)
def test_process_sets_and_half_precision():
    results = run_ranks(_process_sets, world_size=4, timeout_s=90)
    for r in (1, 3):
        msg = results[r]["odd"]["error"]
        assert f"rank {r}" in msg and "'outsider'" in msg and "[0, 2]" in msg and "HINT" in msg
    for res in results:
        assert res["exact"] == {"torch.float16": True, "torch.bfloat16": True}


# --------------------------------------------------------------------------------------------------------
# With check_collectives off, the paths that need sizes still exchange them
# --------------------------------------------------------------------------------------------------------

def _unchecked() -> dict:
    from shoal.core import collectives as C
    from shoal.core import runtime as rt

    assert rt.config().check_collectives is False
    me, n = rt.rank(), rt.size()
    xs = [_data(r, (2 * r + 1, 3), torch.float32, 60) for r in range(n)]
    _close(C.allgather(xs[me]), torch.cat(xs), "unchecked allgather")
    ys = [_data(r, (2 * (r + 1), 1), torch.int64, 61) for r in range(n)]   # dim0 differs; even split
    out = C.alltoall(ys[me])
    _close(out, torch.cat([ys[s][(s + 1) * me: (s + 1) * (me + 1)] for s in range(n)]), "unchecked alltoall")
    _close(C.allreduce(xs[0], op=C.Sum), xs[0] * n, "unchecked allreduce")
    C.barrier()
    return {"ok": True}


def test_unchecked_mode_still_exchanges_sizes():
    assert run_ranks(_unchecked, world_size=2, timeout_s=60,
                     env={"SHOAL_CHECK_COLLECTIVES": "0"}) == [{"ok": True}] * 2


# --------------------------------------------------------------------------------------------------------
# Horovod's surface on real ranks: calls before init, init(comm=, process_sets=), alltoall through
# autograd, remove_process_set. One launch of 3 ranks (init=False: the rank function calls hvd.init).
# --------------------------------------------------------------------------------------------------------

def _before_init_messages() -> dict:
    import shoal.torch as hvd
    from shoal.core.errors import NotInitializedError

    model = torch.nn.Linear(2, 2)
    calls = {
        "rank": hvd.rank, "size": hvd.size, "local_rank": hvd.local_rank,
        "DistributedOptimizer": lambda: hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()),
        "broadcast_parameters": lambda: hvd.broadcast_parameters(model.state_dict(), root_rank=0),
        "broadcast_optimizer_state": lambda: hvd.broadcast_optimizer_state(
            torch.optim.SGD(model.parameters(), lr=0.1), root_rank=0),
        "join": hvd.join,
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "no error"
        except NotInitializedError as exc:
            out[name] = str(exc)
    return out


def _alltoall_grad_reference(splits: list[list[int]], me: int, seed: int) -> tuple[torch.Tensor, list]:
    """Single process: every rank's alltoall output, each rank's loss sum(W_d * out_d), the gradient
    of the sum of the losses with respect to rank ``me``'s input (what the distributed backward gives)."""
    n = len(splits)
    xs = [_data(s, (sum(splits[s]), 2), torch.float64, seed).requires_grad_() for s in range(n)]
    offsets = [[sum(splits[s][:d]) for d in range(n)] for s in range(n)]
    weights = []
    total = torch.zeros((), dtype=torch.float64)
    for d in range(n):
        out_d = torch.cat([xs[s][offsets[s][d]: offsets[s][d] + splits[s][d]] for s in range(n)])
        w = torch.linspace(0.5, 2.0, out_d.numel(), dtype=torch.float64).reshape(out_d.shape) * (d + 1)
        weights.append(w)
        total = total + (w * out_d).sum()
    total.backward()
    return xs[me].grad, weights


def _horovod_surface() -> dict:
    import shoal.torch as hvd

    result = {"before_init": _before_init_messages()}
    n_env = 3
    evens, pair = hvd.ProcessSet([0, 2]), [1, 2]
    got = hvd.init(comm=list(range(n_env)), process_sets=[evens, pair])
    me, n = hvd.rank(), hvd.size()
    assert n == n_env and got[0] is evens and evens.process_set_id is not None
    pair_set = got[1]
    assert pair_set.ranks == (1, 2) and pair_set.included() == (me in (1, 2))
    assert hvd.init(comm=None, process_sets=[evens]) == [evens]  # a second init is a no-op
    assert hvd.gloo_enabled() and not hvd.mpi_enabled()
    try:
        hvd.mpi_threads_supported()
        raise AssertionError("mpi_threads_supported on gloo should raise")
    except ValueError as exc:
        assert "HINT" in str(exc)

    # alltoall through autograd: the backward is an alltoall with the splits swapped. Reference:
    # single-process autograd over every rank's forward. Tolerance float64, atol 1e-12.
    splits = [[(s + 2 * d) % 3 for d in range(n)] for s in range(n)]   # has zeros
    expected, weights = _alltoall_grad_reference(splits, me, seed=70)
    x = _data(me, (sum(splits[me]), 2), torch.float64, 70).requires_grad_()
    out, received = hvd.alltoall(x, splits=splits[me], name="a2a.grad")
    assert received.tolist() == [splits[s][me] for s in range(n)] and not received.requires_grad
    (weights[me] * out).sum().backward()
    assert torch.allclose(x.grad, expected, rtol=0, atol=1e-12), (x.grad, expected)
    even = [[2] * n for _ in range(n)]
    expected, weights = _alltoall_grad_reference(even, me, seed=71)
    x = _data(me, (2 * n, 2), torch.float64, 71).requires_grad_()
    out = hvd.alltoall(x, name="a2a.even")       # Horovod: no splits -> only the output
    (weights[me] * out).sum().backward()
    assert torch.allclose(x.grad, expected, rtol=0, atol=1e-12), (x.grad, expected)

    # Ops without a gradient are refused when the input requires grad, before any collective starts.
    for fn in (lambda t: hvd.allreduce(t, op=hvd.Max, name="nograd"),
               lambda t: hvd.reducescatter(t, op=hvd.Min, name="nograd")):
        try:
            fn(torch.ones(n, 2, requires_grad=True))
            raise AssertionError("Min/Max with requires_grad should raise")
        except ValueError as exc:
            assert "'nograd'" in str(exc) and "no gradient" in str(exc) and "HINT" in str(exc)

    # Process sets registered by init work; removing one makes its next collective a clear error.
    if me in (1, 2):
        _close(hvd.allreduce(torch.tensor([float(me)]), op=hvd.Sum, process_set=pair_set),
               torch.tensor([3.0]), "init-registered set")
    assert hvd.remove_process_set(pair_set) is True
    assert hvd.remove_process_set(pair_set) is False            # already gone
    assert hvd.remove_process_set(hvd.global_process_set) is False   # the global set stays
    try:
        hvd.allreduce(torch.ones(1), name="after.remove", process_set=pair_set)
        raise AssertionError("a collective on a removed set should raise")
    except ValueError as exc:
        result["removed"] = str(exc)
    again = hvd.add_process_set([1, 2])                        # the ranks are free again
    if me in (1, 2):
        _close(hvd.allreduce(torch.ones(1), op=hvd.Sum, process_set=again), torch.tensor([2.0]), "re-added")
    _close(hvd.allreduce(torch.ones(1), op=hvd.Sum), torch.tensor([float(n)]), "world after removal")
    return result


@pytest.fixture(scope="module")
def horovod_surface() -> list:
    return run_ranks(_horovod_surface, world_size=3, timeout_s=60, init=False)


def test_horovod_init_alltoall_autograd_and_removed_sets(horovod_surface):
    for r, res in enumerate(horovod_surface):
        msg = res["removed"]
        assert "not registered" in msg and "HINT" in msg and "[1, 2]" in msg, (r, msg)


def test_calls_before_init_name_themselves(horovod_surface):
    for name in ("rank", "size", "local_rank"):
        msg = horovod_surface[0]["before_init"][name]
        assert f"{name}() was called before shoal.init()" in msg and "HINT" in msg, (name, msg)


def test_frontend_calls_before_init_name_themselves(horovod_surface):
    for name in ("DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state", "join"):
        msg = horovod_surface[0]["before_init"][name]
        assert f"{name}() was called before shoal.init()" in msg and "HINT" in msg, (name, msg)
