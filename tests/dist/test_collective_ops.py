"""Reduce ops in both spellings on real gloo ranks: Horovod's constants (``hvd.Sum``, their integer values)
and torch.distributed's (``ReduceOp.SUM``, ``RedOpType`` members, ``ReduceOp(...)`` instances), each
against a single-process reference; the torch ops Shoal cannot honour are refused on every rank.

torch's integer values are not Horovod's (torch SUM is 0 = Horovod Average, AVG 1 = Sum, PRODUCT 2 =
Adasum, BAND 5 = Product), so a resolution by value gives the wrong reduction silently: every case below
compares values, not just "no error".

Reference: every rank builds every rank's input from a seed and reduces them in float64 (floats) or
int64 (integers). Tolerances: float32 rtol 1e-5, atol 1e-6 (summation order); integers exact.
"""

from __future__ import annotations

import time

import torch

from shoal.testing import run_ranks

OPS = ("Average", "Sum", "Min", "Max", "Product")
#: Horovod's op name -> torch.distributed's name of the same reduction.
TORCH_NAME = {"Average": "AVG", "Sum": "SUM", "Min": "MIN", "Max": "MAX", "Product": "PRODUCT"}


def _inputs(n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    out = []
    for r in range(n):
        g = torch.Generator().manual_seed(100 * seed + r)
        if dtype.is_floating_point:
            out.append((0.5 + torch.rand(6, generator=g, dtype=torch.float64)).to(dtype))  # Product stays small
        else:
            out.append(torch.randint(-9, 10, (6,), generator=g, dtype=torch.int64).to(dtype))
    return out


def _reference(xs: list[torch.Tensor], op: str) -> torch.Tensor:
    wide = torch.stack([x.double() if x.is_floating_point() else x.long() for x in xs])
    if op == "Sum":
        out = wide.sum(0)
    elif op == "Average":
        out = wide.sum(0) / len(xs) if xs[0].is_floating_point() else torch.div(wide.sum(0), len(xs),
                                                                                rounding_mode="trunc")
    elif op == "Min":
        out = wide.min(0).values
    elif op == "Max":
        out = wide.max(0).values
    else:
        out = wide.prod(0)
    return out.to(xs[0].dtype)


def _same(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    if expected.is_floating_point():
        return bool(torch.allclose(actual.double(), expected.double(), rtol=1e-5, atol=1e-6))
    return bool(torch.equal(actual, expected))


def _spellings(op: str) -> dict:
    import torch.distributed as dist  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415

    torch_op = getattr(dist.ReduceOp, TORCH_NAME[op])
    return {"horovod": getattr(hvd, op), "horovod int": int(getattr(hvd, op)), "torch": torch_op,
            "torch RedOpType": getattr(dist.ReduceOp.RedOpType, TORCH_NAME[op]),
            "torch instance": dist.ReduceOp(torch_op)}


def _every_op() -> dict:
    import torch.distributed as dist  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415

    me, n = hvd.rank(), hvd.size()
    wrong: list[str] = []
    checked = 0

    def check(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
        nonlocal checked
        checked += 1
        if not _same(actual, expected):
            wrong.append(f"{what}: {actual.tolist()} != {expected.tolist()}")

    for seed, dtype in enumerate((torch.float32, torch.int64)):
        for op in OPS:
            xs = _inputs(n, dtype, seed)
            expected = _reference(xs, op)
            rows = 2 * n  # reducescatter: 2 rows each
            ys = [torch.stack([x] * rows) for x in xs]
            exp_rs = _reference(ys, op)[2 * me: 2 * me + 2]
            for spelling, value in _spellings(op).items():
                what = f"{op} as {spelling} ({dtype})"
                check(f"allreduce {what}", hvd.allreduce(xs[me], op=value), expected)
                inplace = xs[me].clone()
                hvd.allreduce_(inplace, op=value)
                check(f"allreduce_ {what}", inplace, expected)
                check(f"allreduce_async {what}", hvd.synchronize(hvd.allreduce_async(xs[me], op=value)), expected)
                grouped = hvd.grouped_allreduce([xs[me], xs[me] * 1], op=value)
                check(f"grouped_allreduce {what}", grouped[1], expected)
                check(f"reducescatter {what}", hvd.reducescatter(ys[me], op=value), exp_rs)
                check(f"grouped_reducescatter {what}", hvd.grouped_reducescatter([ys[me]], op=value)[0], exp_rs)

    # Ranks that spell the same op differently agree (the signature carries the resolved op).
    x = torch.ones(3) * (me + 1)
    mixed = hvd.allreduce(x, op=hvd.Sum if me == 0 else dist.ReduceOp.SUM, name="mixed")
    check("Sum on rank 0, ReduceOp.SUM elsewhere", mixed, torch.full((3,), float(sum(range(1, n + 1)))))

    # Through autograd (shoal.torch's allreduce): torch's SUM and AVG carry their gradient. Single-process
    # reference: the sum over ranks of sum(w * out), where out = op over r of leaf * (r + 1); its gradient
    # with respect to rank me's leaf is (me + 1) * n * w for a sum and (me + 1) * w for an average.
    w = torch.linspace(0.5, 2.0, 3, dtype=torch.float64)
    for name, op, scale in (("SUM", dist.ReduceOp.SUM, n), ("AVG", dist.ReduceOp.AVG, 1)):
        leaf = torch.ones(3, dtype=torch.float64, requires_grad=True)
        out = hvd.allreduce(leaf * (me + 1), op=op, name=f"grad.{name}")
        forward = float(sum(range(1, n + 1))) / (1 if name == "SUM" else n)
        check(f"autograd forward {name}", out.detach(), torch.full((3,), forward, dtype=torch.float64))
        (w * out).sum().backward()
        check(f"autograd grad {name}", leaf.grad, (me + 1) * scale * w)
    return {"wrong": wrong, "checked": checked}


def test_every_op_in_both_spellings_matches_the_reference():
    results = run_ranks(_every_op, world_size=3, timeout_s=90)
    for r, res in enumerate(results):
        assert res["wrong"] == [], f"rank {r}: " + "\n".join(res["wrong"])
        assert res["checked"] == 2 * 5 * 5 * 6 + 1 + 4


# ------------------------------------------------------------------------------------------------------
# Ops Shoal cannot honour: refused on every rank, also when only one rank passes one
# ------------------------------------------------------------------------------------------------------

def _refused() -> dict:
    import torch.distributed as dist  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415

    me = hvd.rank()
    out = {}
    ops = {"BAND": dist.ReduceOp.BAND, "BOR": dist.ReduceOp.BOR, "BXOR": dist.ReduceOp.BXOR,
           "PREMUL_SUM": dist._make_nccl_premul_sum(2.0), "string": "Sum", "float": 1.0, "int 9": 9}
    t = torch.ones(4, dtype=torch.int64)
    for key, op in ops.items():
        for where, call in (("allreduce", lambda o: hvd.allreduce(t, op=o, name="flags")),
                            ("reducescatter", lambda o: hvd.reducescatter(t, op=o, name="flags")),
                            ("grouped_allreduce", lambda o: hvd.grouped_allreduce([t], op=o, name="flags"))):
            try:
                call(op)
                out[f"{where} {key}"] = "no error"
            except (TypeError, ValueError) as exc:
                out[f"{where} {key}"] = f"{type(exc).__name__}: {exc}"
    # Only rank 1 passes BAND: it raises its ValueError, the others learn from the exchange at once.
    start = time.monotonic()
    try:
        hvd.allreduce(t, op=dist.ReduceOp.BAND if me == 1 else dist.ReduceOp.SUM, name="one")
        out["one rank"] = "no error"
    except Exception as exc:  # noqa: BLE001 (the test reports whatever each rank raised)
        out["one rank"] = f"{type(exc).__name__}: {exc}"
        out["one rank culprits"] = list(getattr(exc, "culprit_ranks", ()))
    out["one rank s"] = time.monotonic() - start
    out["after"] = hvd.allreduce(torch.ones(2), op=dist.ReduceOp.SUM, name="after").tolist()
    return out


def test_ops_shoal_cannot_honour_are_refused_on_every_rank():
    results = run_ranks(_refused, world_size=3, timeout_s=60, pg_timeout_s=25)
    for r, res in enumerate(results):
        for where in ("allreduce", "reducescatter", "grouped_allreduce"):
            for key in ("BAND", "BOR", "BXOR", "PREMUL_SUM"):
                msg = res[f"{where} {key}"]
                assert msg.startswith("ValueError") and f"ReduceOp.{key} is not supported" in msg, (r, msg)
                assert "'flags'" in msg and "HINT" in msg, (r, msg)
            assert "prescale_factor" in res[f"{where} PREMUL_SUM"]
            assert "hvd.Min is a logical and" in res[f"{where} BAND"]
            msg = res[f"{where} string"]
            assert msg.startswith("TypeError") and "op='Sum' is a str" in msg and "HINT" in msg, (r, msg)
            assert res[f"{where} float"].startswith("TypeError"), res[f"{where} float"]
            assert res[f"{where} int 9"].startswith("ValueError") and "unknown reduce op 9" in res[f"{where} int 9"]
        if r == 1:
            assert res["one rank"].startswith("ValueError") and "ReduceOp.BAND" in res["one rank"], res
        else:
            assert res["one rank"].startswith("MismatchError"), res
            assert "rank 1 rejected allreduce of 'one'" in res["one rank"] and "ReduceOp.BAND" in res["one rank"]
            assert res["one rank culprits"] == [1]
        assert res["one rank s"] < 5, res["one rank s"]   # the exchange, not the 25 s timeout
        assert res["after"] == [3.0, 3.0]
