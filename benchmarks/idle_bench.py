"""What Shoal costs when it has nothing to do: an idle rank's CPU, and a world of one's step time.

Part 1, idle CPU (2 ranks on this host by default). Each rank initializes Shoal, builds a
``DistributedOptimizer`` over the ``many_small`` model (482 gradients, several buckets and streams) and
trains a few steps, so that every thread the engine and gloo will ever start is running; then it sleeps
``--idle-s`` seconds while its own CPU time (``time.process_time()``: every thread of the process) is
measured. Reported: the share of one core the idle rank burned. Horovod's background loop wakes up every
``HOROVOD_CYCLE_TIME`` (1 ms); an idle Horovod rank was measured at ~7% of a core on this class of machine
(the engine issue's anchor; Horovod no longer builds against the torch pinned here); Shoal has no
loop of its own, so the number should be noise.

Part 2, a world of one (``--world-of-one``, run without a launcher): the ``many_small`` and ``mlp_big``
models train with the bare optimizer and with ``DistributedOptimizer`` wrapping it, in interleaved rounds
in the same process; the overhead is the median over rounds of ``t_shoal / t_bare - 1``.

Run::

    shoal run -np 2 python benchmarks/idle_bench.py          # part 1
    python benchmarks/idle_bench.py --world-of-one           # part 2

Writes ``benchmarks/results/<date>-idle.json`` / ``<date>-world-of-one.json`` and prints a line each.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _save(name: str, report: dict) -> Path:
    from _results import save_report  # noqa: PLC0415

    return save_report(report, name)


def _step(model, opt, x, y) -> None:
    import torch.nn.functional as F  # noqa: PLC0415

    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def idle(args) -> int:
    import torch  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415
    from models import build_model, synthetic_batch  # noqa: PLC0415

    torch.set_num_threads(1)
    hvd.init()
    model = build_model("many_small", 0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), num_streams=3)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    x, y = synthetic_batch("many_small", 64, seed=1 + hvd.rank())
    for _ in range(args.steps):
        _step(model, opt, x, y)
    hvd.barrier()
    import threading  # noqa: PLC0415

    threads = threading.active_count()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    time.sleep(args.idle_s)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    share = cpu / wall
    shares = hvd.allgather_object(share)
    if hvd.rank() == 0:
        report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": "shoal run -np %d python benchmarks/idle_bench.py --idle-s %g" % (hvd.size(), args.idle_s),
                  "torch": torch.__version__, "python": platform.python_version(), "world_size": hvd.size(),
                  "cores": os.cpu_count(), "load_avg": [round(v, 2) for v in os.getloadavg()],
                  "idle_s": args.idle_s, "python_threads_rank0": threads,
                  "cpu_share_per_rank": [round(s, 5) for s in shares],
                  "horovod_reference": "~7% of a core (1 ms cycle): the engine issue's anchor, not measured in this run"}
        path = _save("idle", report)
        print(f"idle rank CPU over {args.idle_s:g} s: " + ", ".join(f"rank {r}: {s * 100:.3f}% of a core"
                                                                   for r, s in enumerate(shares)))
        print(f"results: {path}")
    hvd.shutdown()
    return 0


def world_of_one(args) -> int:
    import torch  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415
    from models import MODELS, build_model, synthetic_batch  # noqa: PLC0415

    torch.set_num_threads(1)
    hvd.init()
    if hvd.size() != 1:
        print("--world-of-one runs without a launcher (plain python)", file=sys.stderr)
        return 2
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": f"python benchmarks/idle_bench.py --world-of-one --rounds {args.rounds}",
              "torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count(),
              "load_avg_start": [round(v, 2) for v in os.getloadavg()], "models": {}}
    for name in ("many_small", "mlp_big"):
        x, y = synthetic_batch(name, MODELS[name].batch_size, seed=1)
        bare_model, shoal_model = build_model(name, 0), build_model(name, 0)
        bare = torch.optim.SGD(bare_model.parameters(), lr=0.01)
        wrapped = hvd.DistributedOptimizer(torch.optim.SGD(shoal_model.parameters(), lr=0.01),
                                           named_parameters=shoal_model.named_parameters())
        runs = [("bare", bare_model, bare), ("shoal", shoal_model, wrapped)]
        for _, m, o in runs:  # warm-up
            for _ in range(3):
                _step(m, o, x, y)
        times = {"bare": [], "shoal": []}
        for rnd in range(args.rounds):
            for label, m, o in (runs if rnd % 2 == 0 else runs[::-1]):
                t0 = time.perf_counter()
                _step(m, o, x, y)
                times[label].append(time.perf_counter() - t0)
        ratios = [s / b - 1 for s, b in zip(times["shoal"], times["bare"])]
        report["models"][name] = {
            "bare_median_ms": round(statistics.median(times["bare"]) * 1e3, 2),
            "shoal_median_ms": round(statistics.median(times["shoal"]) * 1e3, 2),
            "overhead_median": round(statistics.median(ratios), 5),
            "bare_ms": [round(t * 1e3, 2) for t in times["bare"]],
            "shoal_ms": [round(t * 1e3, 2) for t in times["shoal"]]}
        r = report["models"][name]
        print(f"{name}: bare {r['bare_median_ms']:.1f} ms, DistributedOptimizer {r['shoal_median_ms']:.1f} ms, "
              f"overhead {r['overhead_median'] * 100:+.2f}% (median of per-round ratios, {args.rounds} rounds)")
    report["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"results: {_save('world-of-one', report)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-of-one", action="store_true", help="part 2: overhead in a world of one")
    ap.add_argument("--idle-s", type=float, default=20.0, help="part 1: seconds to sleep while measured")
    ap.add_argument("--steps", type=int, default=5, help="part 1: training steps before idling")
    ap.add_argument("--rounds", type=int, default=40, help="part 2: interleaved rounds per model")
    args = ap.parse_args(argv)
    return world_of_one(args) if args.world_of_one else idle(args)


if __name__ == "__main__":
    sys.exit(main())
