"""Every user collective of ``shoal.torch`` on CUDA tensors: two ranks share the GPU through gloo.

One rank function calls each collective (and its in-place, async and grouped variants, the object
collectives, the barrier, join, a sparse allreduce and two autograd backwards) on tensors of the device
under test, checks that the result stays on that device, and compares it with tests/dist's single-process
reference (``test_collectives._reduce`` and ``_close``, tolerances per dtype written out there). The
same function runs on CPU tensors too: the CPU half of each collective is tested at length in tests/dist,
this run keeps the device check itself honest where there is no GPU.
"""

from __future__ import annotations

import time

import pytest
import torch

from _gpu import DEADLINE_S, cuda_and_cpu
from shoal.testing import run_ranks


def _every_collective(device: str) -> list[str]:
    import shoal.torch as hvd  # noqa: PLC0415
    from test_collectives import FLOATS, INTS, _close, _data, _reduce  # noqa: PLC0415

    me, n = hvd.rank(), hvd.size()
    dev = torch.device(device)
    checked: list[str] = []

    def on(t: torch.Tensor) -> torch.Tensor:
        return t.to(dev)

    def same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        assert actual.device.type == dev.type, f"{what}: the result is on {actual.device}, the input on {dev}"
        _close(actual.cpu(), expected, what)
        checked.append(what)

    # allreduce: every op on every dtype; the variants once per dtype family.
    for seed, dtype in enumerate(FLOATS + INTS):
        for op in ("Sum", "Average", "Min", "Max", "Product"):
            if op == "Average" and dtype == torch.uint8:
                continue  # uint8 sums overflow by design (tests/dist)
            xs = [_data(r, (3, 5), dtype, seed, positive=op == "Product" or dtype == torch.uint8) for r in range(n)]
            expected = _reduce(xs, op)
            mine = on(xs[me])
            same(hvd.allreduce(mine, op=getattr(hvd, op), name=f"ar.{op}.{dtype}"), expected, f"allreduce {op} {dtype}")
            if op == "Sum" and dtype in (torch.float32, torch.float16, torch.int64):
                inplace = mine.clone()
                assert hvd.allreduce_(inplace, op=hvd.Sum) is inplace
                same(inplace, expected, f"allreduce_ {dtype}")
                same(hvd.synchronize(hvd.allreduce_async(mine, op=hvd.Sum)), expected, f"allreduce_async {dtype}")
                handle = hvd.allreduce_async_(mine.clone(), op=hvd.Sum)
                while not hvd.poll(handle):
                    time.sleep(0.001)
                same(hvd.synchronize(handle), expected, f"allreduce_async_ {dtype}")
    xs = [_data(r, (6,), torch.float32, 12) for r in range(n)]
    exp = (torch.stack([x.double() * 0.5 for x in xs]).sum(0) / n * 3.0).float()
    same(hvd.allreduce(on(xs[me]), op=hvd.Average, prescale_factor=0.5, postscale_factor=3.0), exp, "scaled")

    # grouped allreduce over mixed dtypes (one collective per dtype), all four spellings.
    specs = [((3, 4), torch.float32), ((5,), torch.float16), ((2, 2), torch.int64), ((1,), torch.bfloat16)]
    groups = [[_data(r, s, d, 20 + i) for i, (s, d) in enumerate(specs)] for r in range(n)]
    want = [_reduce([groups[r][i] for r in range(n)], "Sum") for i in range(len(specs))]
    mine = [on(t) for t in groups[me]]
    for i, t in enumerate(hvd.grouped_allreduce(mine, op=hvd.Sum)):
        same(t, want[i], f"grouped_allreduce {i}")
    for i, t in enumerate(hvd.synchronize(hvd.grouped_allreduce_async(mine, op=hvd.Sum))):
        same(t, want[i], f"grouped_allreduce_async {i}")
    copies = [t.clone() for t in mine]
    hvd.grouped_allreduce_(copies, op=hvd.Sum)
    hvd.synchronize(hvd.grouped_allreduce_async_(copies, op=hvd.Average))  # averages the sums again
    for i, t in enumerate(copies):
        same(t, want[i], f"grouped_allreduce_ + async_ {i}")

    # allgather (uneven first dimensions, one of them 0) and grouped_allgather.
    for dtype in (torch.float32, torch.float16, torch.int64, torch.bool):
        rows = [2, 0, 3][:n] if n <= 3 else [1] * n
        xs = [_data(r, (rows[r], 4), dtype, 30) for r in range(n)]
        same(hvd.allgather(on(xs[me])), torch.cat(xs), f"allgather {dtype}")
    same(hvd.synchronize(hvd.allgather_async(on(xs[me]))), torch.cat(xs), "allgather_async")
    ys = [[_data(r, (r + 1, 2), torch.float32, 31), _data(r, (r,), torch.int64, 32)] for r in range(n)]
    for i, t in enumerate(hvd.grouped_allgather([on(t) for t in ys[me]])):
        same(t, torch.cat([ys[r][i] for r in range(n)]), f"grouped_allgather {i}")

    # broadcast from each root, in place and async.
    for root in range(n):
        x = on(_data(me, (2, 3), torch.float32, 40))
        same(hvd.broadcast(x, root_rank=root), _data(root, (2, 3), torch.float32, 40), f"broadcast from {root}")
        assert torch.equal(x.cpu(), _data(me, (2, 3), torch.float32, 40)), "broadcast modified its input"
    x = on(_data(me, (4,), torch.bfloat16, 41))
    assert hvd.broadcast_(x, root_rank=1) is x
    same(x, _data(1, (4,), torch.bfloat16, 41), "broadcast_")
    x = on(_data(me, (4,), torch.int32, 42))
    hvd.synchronize(hvd.broadcast_async_(x, root_rank=0))
    same(x, _data(0, (4,), torch.int32, 42), "broadcast_async_")

    # alltoall: uneven splits with a zero, and the even split.
    split = [[(s + 2 * d) % 3 for d in range(n)] for s in range(n)]
    xs = [_data(s, (sum(split[s]), 2), torch.float32, 50) for s in range(n)]
    offsets = [[sum(split[s][:d]) for d in range(n)] for s in range(n)]
    expected = torch.cat([xs[s][offsets[s][me]: offsets[s][me] + split[s][me]] for s in range(n)])
    out, received = hvd.alltoall(on(xs[me]), splits=split[me])
    same(out, expected, "alltoall splits")
    assert received.tolist() == [split[s][me] for s in range(n)]
    out, _ = hvd.synchronize(hvd.alltoall_async(on(xs[me]), splits=split[me]))
    same(out, expected, "alltoall_async")
    xs = [_data(r, (2 * n, 3), torch.float16, 51) for r in range(n)]
    same(hvd.alltoall(on(xs[me])), torch.cat([x[2 * me: 2 * me + 2] for x in xs]), "alltoall even")

    # reducescatter (Horovod's split: the first rows % n ranks get one more row) and its grouped form.
    rows = 2 * n + 1
    counts = [rows // n + (1 if i < rows % n else 0) for i in range(n)]
    lo = sum(counts[:me])
    for op in ("Sum", "Average"):
        xs = [_data(r, (rows, 3), torch.float32, 60) for r in range(n)]
        same(hvd.reducescatter(on(xs[me]), op=getattr(hvd, op)), _reduce(xs, op)[lo: lo + counts[me]],
             f"reducescatter {op}")
    same(hvd.synchronize(hvd.reducescatter_async(on(xs[me]), op=hvd.Average)),
         _reduce(xs, "Average")[lo: lo + counts[me]], "reducescatter_async")
    zs = [[_data(r, (rows, 2), torch.float32, 61), _data(r, (n,), torch.float32, 62)] for r in range(n)]
    got = hvd.grouped_reducescatter([on(t) for t in zs[me]], op=hvd.Sum)
    same(got[0], _reduce([z[0] for z in zs], "Sum")[lo: lo + counts[me]], "grouped_reducescatter 0")
    same(got[1], _reduce([z[1] for z in zs], "Sum")[me: me + 1], "grouped_reducescatter 1")

    # A sparse allreduce (Horovod's: allgather of indices and values), coalesced here to compare.
    idx = torch.tensor([[me, 3]], dtype=torch.int64)
    sparse = torch.sparse_coo_tensor(idx, torch.tensor([1.0 + me, 2.0]), (5,)).to(dev)
    dense = hvd.synchronize(hvd.sparse_allreduce_async(sparse, name="sparse", op=hvd.Sum)).to_dense()
    want = torch.zeros(5)
    for r in range(n):
        want[r] += 1.0 + r
        want[3] += 2.0
    same(dense, want, "sparse_allreduce_async")

    # Autograd: allreduce's backward averages the gradient; allgather's returns this rank's rows of it.
    x = on(torch.ones(4)).requires_grad_()
    w = [torch.arange(4.0) * (r + 1) for r in range(n)]
    (hvd.allreduce(x, op=hvd.Average) * on(w[me])).sum().backward()
    same(x.grad, torch.stack(w).mean(0), "allreduce backward")
    x = on(torch.ones(me + 1, 2)).requires_grad_()
    g = hvd.allgather(x)
    (g * on(torch.arange(float(g.numel())).reshape(g.shape))).sum().backward()
    start = sum(r + 1 for r in range(me)) * 2
    same(x.grad, torch.arange(start, start + x.numel(), dtype=torch.float32).reshape(x.shape), "allgather backward")

    # Objects, barrier, join.
    assert hvd.broadcast_object({"from": me}, root_rank=1) == {"from": 1}
    assert hvd.allgather_object(("r", me)) == [("r", r) for r in range(n)]
    hvd.barrier()
    assert hvd.join() in range(n)
    checked += ["broadcast_object", "allgather_object", "barrier", "join"]
    return checked


@pytest.mark.parametrize("device", cuda_and_cpu())
def test_every_user_collective_on_the_device(device):
    results = run_ranks(_every_collective, world_size=2, timeout_s=DEADLINE_S, args=(device,))
    assert results[0] == results[1]
    covered = {what.split(" ")[0] for what in results[0]}
    assert covered == {
        "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "scaled", "grouped_allreduce",
        "grouped_allreduce_async", "grouped_allreduce_", "allgather", "allgather_async", "grouped_allgather",
        "broadcast", "broadcast_", "broadcast_async_", "alltoall", "alltoall_async", "reducescatter",
        "reducescatter_async", "grouped_reducescatter", "sparse_allreduce_async", "broadcast_object",
        "allgather_object", "barrier", "join"}, covered
