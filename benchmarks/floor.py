"""The floor of a data-parallel step on a link: the fastest step any engine could take that reduces whole
gradient tensors, on one serial wire, with no stale weights.

It answers "how close to the wire can this model get here?" before anyone tunes anything, and it is the
yardstick the step-time targets are checked against (``vs wire`` in ``synthetic.py``).

What it measures, on this host, with ``--ranks`` processes computing side by side (as the ranks of a
2-rank job share this host's cores), each with one torch thread and no communication:

- when each gradient tensor is ready, counted from the start of the step (the forward pass included);
- what the optimizer step of each tensor costs alone, and of all of them at once.

What it assumes for the wire: one serial link that moves the gradient bytes at the rate of a flat
allreduce of all of them (``--wire-ms``: ``synthetic.py``'s ``wire`` or ``wire_16`` median, or
``--result``: a ``synthetic.py`` result file to read it from), starting a tensor the moment it is ready
and the wire is free, with no gap and no CPU cost (both optimistic).

The bound (milliseconds from the start of one step to the start of the next):

- the wire: a tensor cannot land before it is ready plus its own bytes on the wire, and the last one
  cannot land before ``max_k(ready_k + bytes from k on / rate)`` (tensors in their ready order);
- the optimizer, overlapped: each tensor is stepped after it lands, one at a time, on the step's thread;
  or, not overlapped, the whole step after the last tensor lands. The floor takes the better of the two.

Every real cost left out (the communication's CPU time taking cores from the backward pass, gaps between
buckets, 16-bit casts) only adds to it, so a target below the floor cannot be met on this host by
scheduling whole tensors: only by splitting a tensor's gradient computation, or by stale weights.

What the bound leaves out can be measured apart: ``--link RATE`` (root; the script re-launches itself in
an emulated cluster of two nodes, :mod:`shoal.testing.cluster`) times the same compute on each rank in
blocks of steps that take turns: with no communication, and with each gradient summed over the link by a
plain ``all_reduce`` the moment it is ready (in ready order, one at a time, as an engine would). The
difference in the ready times is what communicating costs the computation on this host.

Run::

    python benchmarks/floor.py --model mlp_big --optimizer momentum --result benchmarks/results/<file>.json
    python benchmarks/floor.py --model mlp_big --optimizer adam --wire-ms 882 --precision fp32
    python benchmarks/floor.py --model mlp_big --link 1gbit

Results: a table on the console and JSON under ``benchmarks/results/`` (``--name``, default
``floor-<model>-<optimizer>``), with the load average.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

from _results import save_report
from synthetic import OPTIMIZERS, make_optimizer



def _compute(model: str, optimizer: str, steps: int, warmup: int, barrier, queue) -> None:
    """One rank's compute, timed: per tensor, when its gradient is ready and what its step costs."""
    import torch  # noqa: PLC0415

    from models import MODELS, build_model, synthetic_batch  # noqa: PLC0415

    torch.set_num_threads(1)
    net = build_model(model)
    x, y = synthetic_batch(model, MODELS[model].batch_size)
    params = list(net.parameters())
    opt = make_optimizer(params, 0.01, optimizer)
    start = [0.0]
    ready: dict[int, float] = {}
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda _p, i=i: ready.__setitem__(i, time.perf_counter() - start[0]))
    rows = []
    barrier.wait()
    for step in range(warmup + steps):
        opt.zero_grad(set_to_none=False)
        ready.clear()
        start[0] = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        backward_end = time.perf_counter() - start[0]
        opt.step()
        step_end = time.perf_counter() - start[0]
        if step >= warmup:
            rows.append((backward_end, step_end - backward_end, dict(ready)))
    barrier.wait()  # then every rank times single steps, side by side as well
    step_of = []
    for p in params:
        one = make_optimizer([p], 0.0, optimizer)
        one.step()  # its state exists from here, as in training
        times = []
        for _ in range(5):
            t = time.perf_counter()
            one.step()
            times.append(time.perf_counter() - t)
        step_of.append(statistics.median(times) * 1e3)
    med = lambda v: statistics.median(v) * 1e3  # noqa: E731
    queue.put({
        "backward_end_ms": med([r[0] for r in rows]),
        "step_all_ms": med([r[1] for r in rows]),
        "ready_ms": [med([r[2][i] for r in rows]) for i in range(len(params))],
        "step_of_ms": step_of,
        "nbytes": [p.numel() * p.element_size() for p in params],
        "names": [n for n, _ in net.named_parameters()],
    })


def measure(model: str, optimizer: str, ranks: int, steps: int, warmup: int) -> list[dict]:
    """Run ``ranks`` compute processes side by side; each one's timings."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(ranks), ctx.Queue()
    procs = [ctx.Process(target=_compute, args=(model, optimizer, steps, warmup, barrier, queue)) for _ in range(ranks)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return out


def floor_ms(ready: list[float], nbytes: list[float], step_of: list[float], step_all: float,
             ms_per_byte: float) -> dict:
    """The bound (module docstring) for tensors ready at ``ready`` ms with ``nbytes`` on the wire each."""
    order = sorted(range(len(ready)), key=lambda i: ready[i])
    wire_free, landed = 0.0, {}
    for i in order:  # one serial wire, each tensor as soon as it is ready and the wire is free
        wire_free = max(wire_free, ready[i]) + nbytes[i] * ms_per_byte
        landed[i] = wire_free
    last_landing = wire_free
    stepper = 0.0
    for i in order:  # overlapped: each tensor's step after it lands, one at a time
        stepper = max(stepper, landed[i]) + step_of[i]
    plain = last_landing + step_all
    return {"last_landing_ms": last_landing, "overlapped_ms": stepper, "plain_ms": plain,
            "floor_ms": min(stepper, plain), "last_tensor": order[-1]}


def _probe(model: str, steps: int, warmup: int) -> dict:
    """One rank of ``--link``: the ready times of every tensor, in blocks that take turns between no
    communication and a plain ``all_reduce`` of each gradient as it is ready (one at a time, in order)."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from models import MODELS, build_model, synthetic_batch  # noqa: PLC0415

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    net = build_model(model)
    x, y = synthetic_batch(model, MODELS[model].batch_size)
    params = list(net.parameters())
    bufs = [torch.zeros_like(p) for p in params]
    start, ready, comm = [0.0], {}, [False]
    tail: list = [None]

    def launch(i: int):
        return dist.all_reduce(bufs[i], async_op=True).get_future()

    def hook(p, i: int) -> None:
        ready[i] = time.perf_counter() - start[0]
        bufs[i].copy_(p.grad)  # into the bucket, in both kinds of block
        if not comm[0]:
            return
        prev = tail[0]
        if prev is None:
            tail[0] = launch(i)
            return
        nxt = torch.futures.Future()  # one in flight at a time: the next starts when the last has landed
        prev.add_done_callback(lambda _f, i=i, nxt=nxt: launch(i).add_done_callback(
            lambda f, nxt=nxt: nxt.set_result(f.value())))
        tail[0] = nxt

    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda p, i=i: hook(p, i))
    rows: dict[bool, list] = {False: [], True: []}
    for block in range(6):
        comm[0] = block % 2 == 1
        for step in range(warmup + steps):
            for p in params:
                p.grad = None
            ready.clear()
            tail[0] = None
            start[0] = time.perf_counter()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            if tail[0] is not None:
                tail[0].wait()
            end = time.perf_counter() - start[0]
            dist.barrier()
            if step >= warmup:
                rows[comm[0]].append([ready[i] for i in range(len(params))] + [end])
    out = {}
    for on, label in ((False, "no_communication"), (True, "allreduce_as_ready")):
        med = torch.tensor([statistics.median(r[k] for r in rows[on]) * 1e3 for k in range(len(params) + 1)],
                           dtype=torch.float64)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)  # the job waits for its slowest rank
        out[label] = {"ready_ms": med[:-1].tolist(), "end_ms": float(med[-1])}
    out["names"] = [n for n, _ in net.named_parameters()]
    out["rank"] = dist.get_rank()
    dist.destroy_process_group()
    return out


def _run_probe(args, argv: list[str]) -> None:
    """``--link``: re-launch this script on two emulated nodes; rank 0 prints and saves."""
    if not args.in_cluster:
        from shoal.testing.cluster import run_in_cluster  # noqa: PLC0415

        sys.exit(run_in_cluster([sys.executable, os.path.abspath(__file__), *argv, "--in-cluster"], nodes=2,
                                ranks_per_node=1, rate=args.link, timeout_s=900))
    load_start = os.getloadavg()
    out = _probe(args.model, args.steps, args.warmup)
    if out["rank"] != 0:
        return
    quiet, busy = out["no_communication"], out["allreduce_as_ready"]
    print(f"{args.model}: when each gradient is ready, ms from the step's start (slowest rank's median), 2 nodes "
          f"joined by {args.link}")
    print(f"{'tensor':<28} {'no communication':>17} {'allreduce as ready':>19} {'later by':>9}")
    for i in sorted(range(len(quiet["ready_ms"])), key=lambda i: quiet["ready_ms"][i]):
        a, b = quiet["ready_ms"][i], busy["ready_ms"][i]
        print(f"{out['names'][i]:<28} {a:17.1f} {b:19.1f} {b - a:9.1f}")
    print(f"{'backward ends':<28} {quiet['end_ms']:17.1f} {max(busy['ready_ms']):19.1f}")
    print(f"{'last allreduce lands':<28} {'':>17} {busy['end_ms']:19.1f}")
    load_end = os.getloadavg()
    print(f"load average: {load_start[0]:.2f} -> {load_end[0]:.2f}")
    if not args.no_save:
        report = {"name": args.name or f"floor-contention-{args.model}-{args.link}",
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "command": "python " + " ".join([sys.argv[0], *[a for a in argv if a != "--in-cluster"]]),
                  "hardware": {"cores": os.cpu_count(), "platform": platform.platform()},
                  "load_avg_start": load_start, "load_avg_end": load_end, "link": args.link, **out}
        print(f"results: {save_report(report, report['name'])}")


def _wire_from_result(path: str, model: str, precision: str) -> float:
    data = json.load(open(path))
    mode = "wire" if precision == "fp32" else "wire_16"
    return float(data["models"][model]["modes"][mode]["median_ms"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp_big")
    ap.add_argument("--optimizer", default="momentum", choices=OPTIMIZERS)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                    help="bytes on the wire per value: 4 or 2 (with --result: reads wire or wire_16)")
    ap.add_argument("--wire-ms", type=float, default=None,
                    help="a flat allreduce of all the gradient bytes at --precision, in ms (synthetic.py's wire "
                         "or wire_16 median)")
    ap.add_argument("--result", default=None, help="a synthetic.py result file to read --wire-ms from")
    ap.add_argument("--ranks", type=int, default=2, help="processes computing side by side (ranks on this host)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--name", default=None)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--link", default=None, metavar="RATE",
                    help="instead: measure what communicating over a RATE link costs the compute (root)")
    ap.add_argument("--in-cluster", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.link:
        _run_probe(args, sys.argv[1:])
        return
    if (args.wire_ms is None) == (args.result is None):
        ap.error("give exactly one of --wire-ms or --result")
    wire_ms = args.wire_ms if args.wire_ms is not None else _wire_from_result(args.result, args.model,
                                                                               args.precision)
    load_start = os.getloadavg()
    runs = measure(args.model, args.optimizer, args.ranks, args.steps, args.warmup)
    # The job runs at its slowest rank: take, per tensor, the latest ready time and the dearest step.
    ready = [max(r["ready_ms"][i] for r in runs) for i in range(len(runs[0]["ready_ms"]))]
    step_of = [max(r["step_of_ms"][i] for r in runs) for i in range(len(ready))]
    step_all = max(r["step_all_ms"] for r in runs)
    scale = 0.5 if args.precision == "fp16" else 1.0
    nbytes = [b * scale for b in runs[0]["nbytes"]]
    ms_per_byte = wire_ms / sum(nbytes)
    bound = floor_ms(ready, nbytes, step_of, step_all, ms_per_byte)
    names = runs[0]["names"]
    print(f"{args.model}, {args.optimizer}, {args.precision} on the wire; {args.ranks} ranks computing side by "
          f"side; wire {wire_ms:.1f} ms for {sum(nbytes) / 1e6:.1f} MB")
    print(f"{'tensor':<28} {'MB':>8} {'ready ms':>9} {'step ms':>8}")
    for i in sorted(range(len(ready)), key=lambda i: ready[i]):
        print(f"{names[i]:<28} {nbytes[i] / 1e6:8.2f} {ready[i]:9.1f} {step_of[i]:8.1f}")
    print(f"backward ends {max(r['backward_end_ms'] for r in runs):.1f} ms; whole optimizer step {step_all:.1f} ms")
    print(f"last tensor lands at {bound['last_landing_ms']:.1f} ms; step ends at {bound['overlapped_ms']:.1f} "
          f"(overlapped) or {bound['plain_ms']:.1f} (after the wire)")
    print(f"floor: {bound['floor_ms']:.1f} ms = {bound['floor_ms'] / wire_ms:.3f}x the wire")
    load_end = os.getloadavg()
    print(f"load average: {load_start[0]:.2f} -> {load_end[0]:.2f}")
    if args.no_save:
        return
    import torch  # noqa: PLC0415

    report = {
        "name": args.name or f"floor-{args.model}-{args.optimizer}-{args.precision}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python " + " ".join(sys.argv),
        "hardware": {"cores": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "load_avg_start": load_start, "load_avg_end": load_end,
        "model": args.model, "optimizer": args.optimizer, "precision": args.precision,
        "ranks": args.ranks, "wire_ms": wire_ms,
        "tensors": [{"name": names[i], "nbytes_on_wire": nbytes[i], "ready_ms": ready[i], "step_ms": step_of[i]}
                    for i in range(len(ready))],
        "step_all_ms": step_all,
        **bound,
        "floor_vs_wire": bound["floor_ms"] / wire_ms,
    }
    print(f"results: {save_report(report, report['name'])}")


if __name__ == "__main__":
    main()
