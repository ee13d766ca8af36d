"""What the per-step negotiation costs: control bytes per rank per step, and step time.

Part 1, bytes (world sizes ``--worlds``, processes on this machine, gloo over loopback). A 482-tensor model
(the layout of ``many_small``, narrowed to width 8 so that 8 ranks fit on 2 cores) trains ``--steps``
steps in each negotiation mode, each mode with its own optimizer. Bytes a rank SENDS are read from
``/proc/self/io`` (``wchar`` counts socket writes; checked here against a 1 MiB ring allreduce, which
sends 2(N-1)/N MiB per rank); the control traffic of a mode is its bytes minus those of mode ``off`` over
the same steps (same buckets, same NaN-check flags). Reported: the payload one rank contributes
(``control_nbytes``), the measured bytes per rank per step with gloo's framing, and the number of
negotiation collectives. Beside it, Horovod's uncached coordinator (``HOROVOD_CACHE_CAPACITY=0``) for the
same tensors, counted from its protocol (Horovod is not installable here): each step every worker sends
rank 0 a RequestList with one Request per tensor (flatbuffers: table, name string, shape vector), rank 0
answers every worker with a ResponseList naming every tensor. Bytes per Request are estimated from the
flatbuffers layout of ``horovod/common/wire/message.fbs`` (``_horovod_request_nbytes``).

Part 2, step time (world 2, the real ``many_small`` model: 482 tensors, 5.0 M parameters, batch 256 per
rank). Three copies of the model train side by side in interleaved rounds (one step each per round, order
rotating): negotiation ``off`` (the baseline: buckets only), ``auto`` (static after 5 steps: a flag in the
last bucket) and ``always`` (one bit-vector allreduce per step). Per round, each mode's time is the slowest
rank's; the overhead is the median over rounds of ``t_mode / t_off - 1``, so a busy neighbour hurts all
three alike.

Part 3, why user collectives keep their plain blocking waits (world 2): a timed ``Work.wait(timeout)``
would let a waiting rank announce itself after 1 s, so that its peers could name it early; its cost on the
healthy path against the plain blocking call, on a 12-int64 ``all_gather_into_tensor`` (the size of the
signature exchange), calls interleaved one by one (plain, timed, plain again: the A/A noise floor),
``--wait-calls`` of each; the median per-call time of the slower rank. (Blocks of 200 calls per mode were
tried first: their per-block ratios spread over -14% to +41% on this shared machine, which resolves
nothing; per-call interleaving sees the same moments.) ``2026-12-04-negotiation-2.json`` measured the
timed wait inside the helper that then wrapped it (+4.9%, A/A -0.6%), ``2026-12-04-negotiation-wait.json``
the bare timed wait below (-0.5%, A/A -0.85%). User collectives keep the plain wait, free by construction,
and write to the store only when they time out (``shoal.core.negotiation.name_missing_members``).

Run (about 3-6 minutes on 2 loaded cores)::

    .venv/bin/python benchmarks/negotiation_bench.py
    .venv/bin/python benchmarks/negotiation_bench.py --worlds 2 4 8 --steps 30 --rounds 30

Writes ``benchmarks/results/<date>-negotiation.json`` and prints a table (with ``uptime`` before and after:
the machine is shared, load changes the step times, not the bytes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Fixed bucket plan (25 MB buckets, 2 streams) in every mode: the autotuner would re-plan each copy of the
#: model differently during the first steps, and the comparison is about negotiation only.
_ENV = {"SHOAL_AUTOTUNE": "0"}
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def _sent_bytes() -> int:
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["wchar"])


# ------------------------------------------------------------------------------------------- Horovod estimate
def _horovod_request_nbytes(name: str, ndim: int) -> int:
    """Bytes of one serialized Request (flatbuffers): 4 (offset in the list's vector) + the table (soffset 4,
    request_rank 4, root_rank 4, device 4, group_id 4, name offset 4, shape offset 4, prescale 8,
    postscale 8, request_type 1, tensor_type 1, reduce_op 1, padded to 8: 56) + the name string (4 + len + 1,
    padded to 4) + the shape vector (4, padded to 8, + 8 per dim). The vtable (about 26 bytes) is shared
    by identical tables and counted once per list."""
    return 4 + 56 + (4 + len(name) + 1 + 3) // 4 * 4 + 8 + 8 * ndim


def _horovod_uncached(names: list[str], ndims: list[int], world: int) -> dict:
    request_list = 8 + 26 + 4 + sum(_horovod_request_nbytes(n, d) for n, d in zip(names, ndims))
    # ResponseList: one fused ALLREDUCE response per bucket; its names dominate (4-byte offset + string).
    response_list = 8 + 26 + 64 + sum(4 + (4 + len(n) + 1 + 3) // 4 * 4 for n in names)
    return {
        "worker_sent_nbytes": request_list, "worker_received_nbytes": response_list,
        "rank0_received_nbytes": (world - 1) * request_list, "rank0_sent_nbytes": (world - 1) * response_list,
        "rank0_messages": 2 * (world - 1),
    }


# ------------------------------------------------------------------------------------------- part 1: bytes
def _narrow_model():
    import models  # noqa: PLC0415 (benchmarks/models.py)
    import torch  # noqa: PLC0415

    torch.manual_seed(0)
    return models._ManySmall(width=8)


def _bytes_rank(steps: int) -> dict:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    me = hvd.rank()
    # Sanity check of the counter: a 1 MiB ring allreduce sends 2(N-1)/N MiB from every rank.
    probe = torch.zeros(262144)
    dist.barrier()
    before = _sent_bytes()
    dist.all_reduce(probe)
    probe_sent = _sent_bytes() - before
    out = {"probe_sent_nbytes": probe_sent, "modes": {}}
    g = torch.Generator().manual_seed(me)
    x, y = torch.randn(4, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    for mode in ("off", "always", "auto"):
        model = _narrow_model()
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                       named_parameters=model.named_parameters(), negotiation=mode)
        warm = 8  # past step 1 (discovery) and, for auto, into static mode (after step 6)
        for step in range(warm + steps):
            if step == warm:
                dist.barrier()
                before, negotiations = _sent_bytes(), opt.engine.negotiation["negotiations"]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sent = _sent_bytes() - before
        out["modes"][mode] = {"sent_nbytes_per_step": sent / steps,
                              "negotiations_per_step": (opt.engine.negotiation["negotiations"] - negotiations)
                              / steps,
                              "static": opt.engine.negotiation["static"]}
        if mode == "off":
            out["names"] = [n for n, _ in opt.named_parameters()]
            out["ndims"] = [p.dim() for _, p in opt.named_parameters()]
    return out


# ------------------------------------------------------------------------------------------- part 3: wait
def _wait_rank(calls: int) -> dict:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    torch.set_num_threads(1)
    mine = torch.zeros(12, dtype=torch.int64)
    out = torch.empty(12 * dist.get_world_size(), dtype=torch.int64)
    first = datetime.timedelta(seconds=1.0)
    modes = ("plain", "timed", "plain_again")
    us = {m: [] for m in modes}
    dist.barrier()
    for i in range(3 * calls):
        mode = modes[i % 3]
        start = time.perf_counter()
        if mode == "timed":  # the rejected design: a timed first wait, then the stall inspector
            try:
                dist.all_gather_into_tensor(out, mine, async_op=True).wait(timeout=first)
            except RuntimeError:
                pass  # a >1 s call on the loaded machine: the inspector would take over here
        else:                # what shoal.core.collectives does
            dist.all_gather_into_tensor(out, mine)
        us[mode].append((time.perf_counter() - start) * 1e6)
    return us


# ------------------------------------------------------------------------------------------- part 2: time
def _time_rank(rounds: int, warm: int) -> dict:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import models  # noqa: PLC0415
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    spec = models.MODELS["many_small"]
    x, y = models.synthetic_batch("many_small", spec.batch_size, seed=1 + hvd.rank())
    # "off_again": a second copy of the baseline, so the table shows the noise floor (an A/A ratio).
    modes = ("off", "auto", "always", "off_again")
    runs, spent = {}, {}
    for mode in modes:
        model = models.build_model("many_small")
        # Each copy gets its own mode (the optimizer's negotiation= keyword over SHOAL_NEGOTIATION).
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                       named_parameters=model.named_parameters(),
                                       negotiation="off" if mode == "off_again" else mode)
        spent[mode] = []
        runs[mode] = (model, opt)
    times = {m: [] for m in modes}
    cpu = {m: [] for m in modes}  # CPU seconds of this process (all threads): less hurt by a busy host
    losses = {}
    for r in range(warm + rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            model, opt = runs[mode]
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            outside = opt.engine.timings["negotiation_outside_s"]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if r >= warm:
                times[mode].append(time.perf_counter() - start)
                cpu[mode].append(time.process_time() - start_cpu)
                # Per step, the seconds the negotiation spends outside the buckets' wait (packing the bits,
                # the slot, the part of the exchange not hidden behind the buckets): its own clock.
                spent[mode].append(opt.engine.timings["negotiation_outside_s"] - outside)
            losses[mode] = float(loss)
    return {"times": times, "cpu": cpu, "losses": losses,
            "static": {m: runs[m][1].engine.negotiation["static"] for m in modes},
            "outside_reducer_s": {m: spent[m][-rounds:] for m in modes},
            "negotiations": {m: runs[m][1].engine.negotiation["negotiations"] for m in modes},
            "buckets": {m: runs[m][1].engine.num_buckets for m in modes},
            "num_tensors": len(runs["off"][1].named_parameters())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per mode (bytes)")
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds (step time)")
    parser.add_argument("--warm", type=int, default=8, help="unmeasured rounds first (step time)")
    parser.add_argument("--skip-bytes", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--wait-calls", type=int, default=6000, help="calls per mode (part 3; 0: skip)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch  # noqa: PLC0415

    from shoal.core.negotiation import control_nbytes  # noqa: PLC0415
    from shoal.testing import run_ranks  # noqa: PLC0415

    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
              "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
              "command": " ".join(sys.argv), "uptime_before": _uptime(), "bytes": [], "time": None}
    print(f"torch {torch.__version__}, {result['cpus']} cpus; {result['uptime_before']}")
    for world in ([] if args.skip_bytes else args.worlds):
        per_rank = run_ranks(_bytes_rank, world_size=world, timeout_s=900, args=(args.steps,), env=_ENV)
        names, ndims = per_rank[0]["names"], per_rank[0]["ndims"]
        off = statistics.mean(r["modes"]["off"]["sent_nbytes_per_step"] for r in per_rank)
        row = {"world": world, "num_tensors": len(names), "payload_nbytes": control_nbytes(len(names)),
               "probe_sent_nbytes": per_rank[0]["probe_sent_nbytes"],
               "probe_expected_nbytes": int(2 * (world - 1) / world * 1024 * 1024),
               "horovod_uncached": _horovod_uncached(names, ndims, world)}
        for mode in ("always", "auto"):
            control = [r["modes"][mode]["sent_nbytes_per_step"] - r["modes"]["off"]["sent_nbytes_per_step"]
                       for r in per_rank]
            row[mode] = {"control_sent_nbytes_per_rank_per_step": statistics.mean(control),
                         "max_over_ranks": max(control),
                         "negotiations_per_step": per_rank[0]["modes"][mode]["negotiations_per_step"],
                         "static": per_rank[0]["modes"][mode]["static"]}
        row["off_sent_nbytes_per_rank_per_step"] = off
        result["bytes"].append(row)
        hv = row["horovod_uncached"]
        print(f"N={world}: T={len(names)}  payload {row['payload_nbytes']} B/rank/step  "
              f"measured always {row['always']['control_sent_nbytes_per_rank_per_step']:.0f} B "
              f"(auto, static: {row['auto']['control_sent_nbytes_per_rank_per_step']:.0f} B, "
              f"{row['auto']['negotiations_per_step']:.2f} negotiations/step)  |  Horovod uncached: worker "
              f"sends {hv['worker_sent_nbytes']} B, rank 0 receives {hv['rank0_received_nbytes']} B and "
              f"sends {hv['rank0_sent_nbytes']} B in {hv['rank0_messages']} messages  "
              f"(probe {row['probe_sent_nbytes']} vs {row['probe_expected_nbytes']} expected)")
    if not args.skip_time:
        per_rank = run_ranks(_time_rank, world_size=2, timeout_s=1800, args=(args.rounds, args.warm),
                             env=_ENV)
        slowest = {m: [max(ts) for ts in zip(*(r["times"][m] for r in per_rank))]
                   for m in per_rank[0]["times"]}
        overhead = {}
        for mode in ("auto", "always", "off_again"):
            ratios = sorted(t / b - 1 for t, b in zip(slowest[mode], slowest["off"]))
            outside = [statistics.median(r["outside_reducer_s"][mode]) for r in per_rank]
            cpu_ratio = [statistics.median(r["cpu"][mode]) / statistics.median(r["cpu"]["off"])
                         for r in per_rank]
            overhead[mode] = {"median_overhead": statistics.median(ratios),
                              "p25_overhead": ratios[len(ratios) // 4],
                              "p75_overhead": ratios[3 * len(ratios) // 4],
                              "median_step_s": statistics.median(slowest[mode]),
                              "median_outside_reducer_s": max(outside),
                              "cpu_overhead": max(cpu_ratio) - 1}
        result["time"] = {"model": "many_small", "num_tensors": per_rank[0]["num_tensors"], "world": 2,
                          "rounds": args.rounds, "median_step_s_off": statistics.median(slowest["off"]),
                          "overhead": overhead, "static": per_rank[0]["static"],
                          "negotiations": per_rank[0]["negotiations"], "losses": per_rank[0]["losses"],
                          "buckets": per_rank[0]["buckets"],
                          "slowest_step_s": slowest}
        print(f"many_small ({per_rank[0]['num_tensors']} tensors), 2 ranks, {args.rounds} rounds: off "
              f"{result['time']['median_step_s_off'] * 1e3:.1f} ms/step (median of the slowest rank)")
        for mode, o in overhead.items():
            print(f"  {mode:>9}: step time {o['median_overhead'] * 100:+.2f}% vs off (median of per-round "
                  f"ratios; p25 {o['p25_overhead'] * 100:+.2f}%, p75 {o['p75_overhead'] * 100:+.2f}%); "
                  f"CPU time {o['cpu_overhead'] * 100:+.2f}%; "
                  f"negotiation outside the bucket wait {o['median_outside_reducer_s'] * 1e3:.3f} ms/step")
        print(f"  final losses {per_rank[0]['losses']}")
    if args.wait_calls:
        per_rank = run_ranks(_wait_rank, world_size=2, timeout_s=900, args=(args.wait_calls,), env=_ENV)
        slower = {m: [max(v) for v in zip(*(r[m] for r in per_rank))] for m in per_rank[0]}
        wait = {"calls_per_mode": args.wait_calls,
                "median_us": {m: statistics.median(v) for m, v in slower.items()},
                "p25_us": {m: sorted(v)[len(v) // 4] for m, v in slower.items()},
                "p75_us": {m: sorted(v)[3 * len(v) // 4] for m, v in slower.items()}}
        for mode in ("timed", "plain_again"):
            wait[f"{mode}_vs_plain"] = wait["median_us"][mode] / wait["median_us"]["plain"] - 1
        result["wait"] = wait
        print(f"user-collective wait (12-int64 all_gather, 2 ranks, {args.wait_calls} calls each, interleaved): "
              f"median plain {wait['median_us']['plain']:.1f} us, timed {wait['median_us']['timed']:.1f} us "
              f"({wait['timed_vs_plain'] * 100:+.2f}%; A/A {wait['plain_again_vs_plain'] * 100:+.2f}%)")
    result["uptime_after"] = _uptime()
    print(result["uptime_after"])
    out = args.out or RESULTS_DIR / f"{datetime.date.today().isoformat()}-negotiation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from _results import write_result  # noqa: PLC0415

    write_result(out, json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
