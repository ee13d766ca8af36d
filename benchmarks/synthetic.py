"""Synthetic-data throughput benchmark: Shoal side by side with DDP, naive allreduce and the wire.

Every mode trains the same model (same seed, same synthetic batch) in the same processes and the same
process group; modes take turns in interleaved rounds, so that a noisy neighbour or a warm cache
hurts all of them alike. Per mode: median, p10 and p90 of the step time (the slowest rank's time
of each step), ratios against DDP and against the wire limit, and the final loss (modes with the
same numerics must agree). Results: a table on the console, JSON (and ``--plot``: a PNG) under
``benchmarks/results/``.

Modes (``--modes``; unavailable ones are reported as such):

    shoal        shoal.torch.DistributedOptimizer (fp32 on the wire)
    shoal_overlap the same with overlap_step=True: the optimizer steps bucket by bucket while later
                 buckets are still on the wire, not after the last one
    shoal_elastic the same under elastic training: hvd.elastic.TorchState(model, optimizer) committed every
                 --commit-every steps (launch with shoal run --min-np/--max-np for the elastic world itself)
    shoal_fp16   the same with compression=Compression.fp16
    shoal_int8   the same with compression=Compression.int8 (8 bits, a scale per block, error feedback)
    shoal_powersgd  the same with compression=Compression.powersgd(rank=R, start_step=K) (--powersgd-rank,
                 --powersgd-start-step)
    ddp          torch DistributedDataParallel, defaults (25 MB buckets)
    ddp_fp16     DDP + torch's fp16_compress_hook
    ddp_powersgd DDP + torch's powerSGD_hook at the same rank and start step (error feedback, warm start),
                 with one DDP bucket: the only layout in which the hook runs correctly on gloo (see DDP())
    ddp_shoal_powersgd  DDP + shoal.torch.comm_hook(compression=Compression.powersgd(...)): Shoal's
                 PowerSGD under DDP's own bucketing
    naive        one allreduce per gradient tensor after backward
    nocomm       no communication at all: the compute floor
    horovod      horovod.torch.DistributedOptimizer, when ``import horovod.torch`` works
    wire         one flat fp32 allreduce of as many bytes as the model's gradients: the wire limit
    wire_16      one flat fp32 allreduce of half those bytes: the wire limit of 16-bit gradients
                 (fp32 on purpose: gloo's own fp16 sum is slower than the wire, see the compression issue)
    wire_8       the same with a quarter of the bytes: the wire limit of 8-bit gradients

Launch (2 ranks on one host, loopback)::

    shoal run -np 2 python benchmarks/synthetic.py --model mlp_big
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/synthetic.py

Over an emulated 1 Gbit/s link (two network namespaces, needs root; the script re-launches itself
inside :class:`shoal.testing.cluster.EmulatedCluster`)::

    python benchmarks/synthetic.py --link 1gbit --model mlp_big

Plain ``python benchmarks/synthetic.py`` runs a world of one (the cost of a wrapper with nothing to
reduce). Each rank uses one thread (``--threads``): 2 ranks on 2 cores.

On GPUs, ``--device cuda``: models and batches on each rank's GPU (``LOCAL_RANK``), the process group on
NCCL, each step timed up to a ``torch.cuda.synchronize()``. ``python benchmarks/synthetic.py --device cuda
--modes nocomm shoal ddp`` is a world of one on one GPU against the bare optimizer (scripts/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional



# ----------------------------------------------------------------------------------------- modes

class Unavailable(Exception):
    """A mode that cannot run here (a missing package); the reason goes into the table."""


#: ``--optimizer``: the torch optimizer every mode trains with (set once by ``main``).
OPTIMIZER = "sgd"
OPTIMIZERS = ("sgd", "momentum", "adam")
#: ``--powersgd-rank`` / ``--powersgd-start-step``: the same for Shoal's PowerSGD and torch's hook.
POWERSGD = {"rank": 4, "start_step": 2}


def powersgd_name() -> str:
    """Shoal's compression value for the run's PowerSGD settings."""
    return f"powersgd:rank={POWERSGD['rank']},start_step={POWERSGD['start_step']}"


def make_optimizer(params, lr: float, name: Optional[str] = None):
    """Optimizer ``name`` (default: this run's ``--optimizer``) over ``params``: plain SGD, SGD with momentum
    0.9, or Adam."""
    import torch  # noqa: PLC0415

    name = OPTIMIZER if name is None else name
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "momentum" else 0.0)


class Mode:
    """One way of training: ``step(x, y)`` runs forward, backward, reduction and the update."""

    #: "fp32", "fp16", "int8" or "lowrank": which wire limit this mode is compared with (none for lowrank).
    wire_precision = "fp32"

    def __init__(self, model, lr: float):
        self.model = model
        self.optimizer = make_optimizer(model.parameters(), lr)

    def loss(self, x, y):
        import torch.nn.functional as F  # noqa: PLC0415

        return F.cross_entropy(self.model(x), y)

    def step(self, x, y):
        self.optimizer.zero_grad()
        loss = self.loss(x, y)
        loss.backward()
        self.reduce()
        self.optimizer.step()
        return loss.detach()

    def reduce(self) -> None:
        """Make gradients global after backward (nothing for modes that reduce during backward)."""

    def finish_round(self) -> None:
        """End of a mode's round (timed with its last step): nothing left in flight for the next mode."""

    def extra(self) -> dict:
        """What else to record about the mode after its rounds (e.g. the elastic mode's commit times)."""
        return {}

    def settle(self, x, y) -> Optional[dict]:
        """Untimed steps before the rounds, for modes that adapt during their first steps (the tuner);
        returns what to record about it, or None."""
        return None


class NoComm(Mode):
    pass


class Naive(Mode):
    def reduce(self) -> None:
        import torch.distributed as dist  # noqa: PLC0415

        world = dist.get_world_size()
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)


class DDP(Mode):
    def __init__(self, model, lr: float, hook: str = "none"):
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        # torch's powerSGD_hook issues its P and Q allreduces from completion callbacks, on one process
        # group; with several DDP buckets on gloo those interleave differently on different ranks (here:
        # "Received data size doesn't match expected size. 5120 vs 4000" in its first steps). One bucket
        # is the configuration in which it runs correctly on gloo.
        ddp = DistributedDataParallel(model, **({"bucket_cap_mb": 4096} if hook == "powersgd" else {}))
        if hook == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: PLC0415

            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
            self.wire_precision = "fp16"
        elif hook == "powersgd":  # torch's own, at the run's rank and start step
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook  # noqa: PLC0415

            state = powerSGD_hook.PowerSGDState(process_group=None,
                                                matrix_approximation_rank=POWERSGD["rank"],
                                                start_powerSGD_iter=POWERSGD["start_step"])
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
            self.wire_precision = "lowrank"
        elif hook == "shoal_powersgd":
            try:
                import shoal.torch as sh  # noqa: PLC0415
            except ImportError as exc:
                raise Unavailable(f"no shoal.torch here ({exc})") from None
            sh.init()
            ddp.register_comm_hook(*sh.comm_hook(compression=powersgd_name()))
            self.wire_precision = "lowrank"
        self.model = ddp
        self.optimizer = make_optimizer(ddp.parameters(), lr)


class Shoal(Mode):
    def __init__(self, model, lr: float, compression: str = "none", overlap_step: Optional[bool] = None):
        try:
            import shoal.torch as sh  # noqa: PLC0415
            sh.DistributedOptimizer  # noqa: B018 (the engine may not exist yet)
        except (ImportError, AttributeError) as exc:
            raise Unavailable(f"shoal.torch has no DistributedOptimizer here ({exc})") from None
        super().__init__(model, lr)
        sh.init()
        self.optimizer = sh.DistributedOptimizer(self.optimizer, named_parameters=model.named_parameters(),
                                                 compression=compression, overlap_step=overlap_step)
        sh.broadcast_parameters(model.state_dict(), root_rank=0)
        family = compression.partition(":")[0]
        self.wire_precision = {"none": "fp32", "int8": "int8", "powersgd": "lowrank"}.get(family, "fp16")

    def settle(self, x, y) -> Optional[dict]:
        # The tuner is on by default and explores for up to 50 steps (shoal.core.autotune). Timing those
        # steps would measure the search, not the setting a run spends its life in; and interleaved
        # rounds would feed it step times that include the other modes. So it settles here, alone.
        # Every rank takes the same decisions, so every rank leaves the loop at the same step. The
        # weights (and the optimizer's state) are put back afterwards, so that this mode stays on the
        # same trajectory as the others and the final losses can still be compared.
        import copy  # noqa: PLC0415

        weights = copy.deepcopy(self.model.state_dict())
        opt_state = copy.deepcopy(self.optimizer.state_dict())
        steps = 0
        summary = self.optimizer.autotune_summary
        while summary is not None and summary["state"] == "tuning" and steps < 200:
            self.step(x, y)
            steps += 1
            summary = self.optimizer.autotune_summary
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(opt_state)
        if summary is None:
            return {"state": "off"}
        return {"state": summary["state"], "choice": summary["choice"], "settled_at": summary["settled_at"],
                "settle_steps": steps,
                "trials": [{k: t[k] for k in ("setting", "score_ms", "median_ms", "samples")}
                           for t in summary.get("trials", [])]}


#: ``--commit-every``: steps between commits of the ``shoal_elastic`` mode (set once by ``main``).
COMMIT_EVERY = 50


class ShoalElastic(Shoal):
    """Shoal's optimizer with an elastic state committed every ``COMMIT_EVERY`` steps: the steady-state cost
    of elastic training (the commit's copy of the model and optimizer state, and its check for joiners)."""

    def __init__(self, model, lr: float):
        super().__init__(model, lr)
        import shoal.torch as sh  # noqa: PLC0415

        self.state = sh.elastic.TorchState(model, self.optimizer)
        self.steps = 0
        self.commit_ms: list[float] = []

    def step(self, x, y):
        loss = super().step(x, y)
        self.steps += 1
        if self.steps % COMMIT_EVERY == 0:
            t0 = time.perf_counter()
            self.state.commit()
            self.commit_ms.append((time.perf_counter() - t0) * 1e3)
        return loss

    def extra(self) -> dict:
        return {"commit_every": COMMIT_EVERY, "commits": len(self.commit_ms),
                "commit_ms_median": statistics.median(self.commit_ms) if self.commit_ms else None}


class Horovod(Mode):
    def __init__(self, model, lr: float):
        import torch.distributed as dist  # noqa: PLC0415
        try:
            import horovod.torch as hvd  # noqa: PLC0415
        except Exception as exc:  # noqa: BLE001 (a broken build raises more than ImportError)
            raise Unavailable(f"import horovod.torch failed ({type(exc).__name__})") from None
        hvd.init()
        if hvd.size() != dist.get_world_size():
            raise Unavailable(f"horovod sees {hvd.size()} ranks, not {dist.get_world_size()} "
                              "(launch with horovodrun)")
        super().__init__(model, lr)
        self.optimizer = hvd.DistributedOptimizer(self.optimizer, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)


class Wire(Mode):
    """Not training: one flat allreduce of the gradient bytes (``fraction`` of them)."""

    def __init__(self, model, lr: float, fraction: float = 1.0):
        import torch  # noqa: PLC0415

        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.flat = torch.ones(max(1, int(numel * fraction)), device=next(model.parameters()).device)
        self.wire_precision = {1.0: "fp32", 0.5: "fp16"}.get(fraction, "int8")

    def step(self, x, y):
        import torch.distributed as dist  # noqa: PLC0415

        dist.all_reduce(self.flat)
        return None


#: name -> (factory(model, lr) -> Mode, one-line description). Adding a mode is one line here.
MODES: dict[str, tuple[Callable[..., Mode], str]] = {
    "shoal": (lambda m, lr: Shoal(m, lr), "shoal.torch.DistributedOptimizer"),
    "shoal_overlap": (lambda m, lr: Shoal(m, lr, overlap_step=True), "... stepping bucket by bucket"),
    "shoal_elastic": (lambda m, lr: ShoalElastic(m, lr), "... with an elastic state committed every N steps"),
    "shoal_fp16": (lambda m, lr: Shoal(m, lr, compression="fp16"), "... with Compression.fp16"),
    "shoal_int8": (lambda m, lr: Shoal(m, lr, compression="int8"), "... with Compression.int8"),
    "shoal_powersgd": (lambda m, lr: Shoal(m, lr, compression=powersgd_name()), "... with Compression.powersgd"),
    "ddp": (lambda m, lr: DDP(m, lr), "torch DDP, defaults"),
    "ddp_fp16": (lambda m, lr: DDP(m, lr, hook="fp16"), "DDP + fp16_compress_hook"),
    "ddp_powersgd": (lambda m, lr: DDP(m, lr, hook="powersgd"), "DDP + torch's powerSGD_hook"),
    "ddp_shoal_powersgd": (lambda m, lr: DDP(m, lr, hook="shoal_powersgd"), "DDP + shoal's comm_hook, PowerSGD"),
    "naive": (lambda m, lr: Naive(m, lr), "one allreduce per gradient"),
    "nocomm": (lambda m, lr: NoComm(m, lr), "no communication (compute floor)"),
    "horovod": (lambda m, lr: Horovod(m, lr), "horovod.torch.DistributedOptimizer"),
    "wire": (lambda m, lr: Wire(m, lr), "flat allreduce of the gradient bytes"),
    "wire_16": (lambda m, lr: Wire(m, lr, fraction=0.5), "flat allreduce of half the bytes"),
    "wire_8": (lambda m, lr: Wire(m, lr, fraction=0.25), "flat allreduce of a quarter of the bytes"),
}


# ------------------------------------------------------------------------------------ statistics

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(steps_s: list[float]) -> dict:
    ms = [t * 1e3 for t in steps_s]
    return {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "p10_ms": percentile(ms, 10),
            "p90_ms": percentile(ms, 90),
            "steps_ms": [round(t, 2) for t in ms]}


# ------------------------------------------------------------------------------------ the worker

def hardware(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}
    if device == "cuda":
        import torch  # noqa: PLC0415

        info["gpu"] = torch.cuda.get_device_name()
    return info


def _repo_relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return path


def init_world(timeout_s: float, device: str = "cpu"):
    import datetime as dt  # noqa: PLC0415

    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    from shoal.core.env import get_env  # noqa: PLC0415

    timeout = dt.timedelta(seconds=timeout_s)
    backend = "nccl" if device == "cuda" else "gloo"
    if get_env("SHOAL_ELASTIC"):  # shoal run --min-np: the membership decides the ranks, shoal.init() asks it
        import shoal.torch as sh  # noqa: PLC0415

        sh.init()
    elif get_env("RANK") is not None:
        if device == "cuda":  # one GPU per rank of a node
            torch.cuda.set_device(int(get_env("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend, timeout=timeout)  # env:// from the launcher
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def agree(ok: bool) -> bool:
    """True only when every rank says True (so that no rank runs a mode the others skipped)."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    # NCCL reduces device tensors only.
    flag = torch.tensor([1 if ok else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def bench_model(name: str, args, rank: int, world: int, progress) -> dict:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from models import MODELS, build_model, synthetic_batch  # noqa: PLC0415

    spec = MODELS[name]
    batch = args.batch_size or spec.batch_size
    dev = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    # CUDA runs asynchronously: a step's time is the time until its kernels have finished.
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    probe = build_model(name, args.seed)
    params = [p for p in probe.parameters() if p.requires_grad]
    info = {"description": spec.description, "batch_size": batch,
            "params": sum(p.numel() for p in params), "tensors": len(params),
            "grad_bytes": sum(p.numel() * p.element_size() for p in params), "modes": {}}
    del probe
    # Each rank its own data, so that averaging changes the gradients (and the loss shows it).
    x, y = (t.to(dev) for t in synthetic_batch(name, batch, seed=args.seed + 1 + rank))
    modes: dict[str, Mode] = {}
    for mode in args.modes:
        reason = None
        try:
            modes[mode] = MODES[mode][0](build_model(name, args.seed).to(dev), args.lr)
            # One untimed step right away (every mode takes it, so all stay on the same trajectory):
            # a mode whose engine refuses the configuration (say, a compression not implemented
            # yet) fails here, on every rank alike, and is reported instead of ending the run.
            modes[mode].step(x, y)
            tuned = modes[mode].settle(x, y)
            if tuned is not None:
                info.setdefault("autotune", {})[mode] = tuned
        except Unavailable as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 (reported in the table and the JSON)
            reason = f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if not agree(reason is None):
            modes.pop(mode, None)
            info["modes"][mode] = {"status": "unavailable", "reason": reason or "failed on another rank"}
    times: dict[str, list[float]] = {m: [] for m in modes}
    losses: dict[str, Optional[float]] = {}
    order = list(modes)
    for rnd in range(args.rounds):
        warmup = args.warmup if rnd == 0 else min(1, args.warmup)
        # Rotate the order each round, so that no mode always runs right after the same one.
        for mode in order[rnd % max(1, len(order)):] + order[:rnd % max(1, len(order))]:
            runner = modes[mode]
            if progress:
                progress.describe(f"{name:<10} {mode:<10} round {rnd + 1}/{args.rounds}")
            dist.barrier()
            loss = None
            for i in range(warmup + args.steps):
                t0 = time.perf_counter()
                loss = runner.step(x, y)
                if i == warmup + args.steps - 1:
                    runner.finish_round()
                sync()
                dt = time.perf_counter() - t0
                if i >= warmup:
                    times[mode].append(dt)
                if progress:
                    progress.advance()
            losses[mode] = None if loss is None else float(loss)
    # Per step, the slowest rank's time: that is what the job waits for.
    everyone: list = [None] * world
    dist.all_gather_object(everyone, times)
    for mode in modes:
        worst = [max(per_rank[mode][i] for per_rank in everyone) for i in range(len(times[mode]))]
        info["modes"][mode] = {"status": "ok", "wire_precision": modes[mode].wire_precision,
                               "loss": losses[mode], **summarize(worst), **modes[mode].extra()}
    info["modes"] = {m: info["modes"][m] for m in args.modes if m in info["modes"]}
    modes.clear()
    gc.collect()
    return info


def add_ratios(info: dict, samples_per_step: int) -> None:
    modes = info["modes"]
    base = modes.get("ddp", {}).get("median_ms")
    for name, m in modes.items():
        if m["status"] != "ok":
            continue
        m["vs_ddp"] = m["median_ms"] / base if base else None
        wire_mode = {"fp32": "wire", "fp16": "wire_16", "int8": "wire_8"}.get(m["wire_precision"])
        wire = modes.get(wire_mode, {}).get("median_ms") if wire_mode else None
        m["vs_wire"] = m["median_ms"] / wire if wire and not name.startswith("wire") else None
        m["samples_per_s"] = None if name.startswith("wire") else samples_per_step / (m["median_ms"] / 1e3)


def worker(args) -> int:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    from rich.console import Console  # noqa: PLC0415

    from shoal.core.env import env_name, explicit_knobs, get_env  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    rank, world = init_world(args.timeout_s, args.device)
    knobs = {env_name(k): get_env(env_name(k)) for k in sorted(explicit_knobs())}
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a log file: keep the table on one line per row
    link = get_env("SHOAL_CLUSTER_LINK") or ("one host, loopback" if world > 1 else "none (world of one)")
    meta = {
        "name": args.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        # SHOAL_* knobs set for the run (e.g. SHOAL_FUSION_THRESHOLD_MB=1) are part of what reproduces it.
        "command": shlex.join([f"{k}={v}" for k, v in knobs.items()]
                              + ["python", _repo_relative(sys.argv[0]), *sys.argv[1:]]),
        "shoal_env": knobs,
        "launcher": ("shoal.testing.cluster" if get_env("SHOAL_CLUSTER_LINK")
                     else "shoal run --min-np (elastic)" if get_env("SHOAL_ELASTIC")
                     else "torchrun / shoal run" if get_env("TORCHELASTIC_RUN_ID") else
                     "env://" if world > 1 else "none"),
        "hardware": hardware(args.device), "threads_per_rank": args.threads, "torch": torch.__version__,
        "python": platform.python_version(), "world_size": world, "link": link, "device": args.device,
        "settings": {**{k: getattr(args, k) for k in ("warmup", "steps", "rounds", "lr", "seed", "batch_size",
                                                      "optimizer", "commit_every")},
                     "powersgd": dict(POWERSGD)},
        # Other processes on the machine inflate every mode's compute; recorded so a reader can tell.
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
    }
    if rank == 0:
        hw = meta["hardware"]
        console.print(f"[bold]shoal synthetic benchmark[/]  {hw['cpu']}, {hw['cores']} cores, "
                      f"{args.threads} thread(s) per rank; torch {torch.__version__}; world size {world}; "
                      f"link: {link}")
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:
            console.print(f"[yellow]busy machine: load average {load:.1f} on {cores} cores; every mode's "
                          "times are inflated (ratios suffer less)[/]")
        console.print(f"models {', '.join(args.models)}; modes {', '.join(args.modes)}; "
                      f"{args.rounds} rounds x ({args.warmup} warm-up in round 1, 1 after) + {args.steps} timed steps")
    results = {}
    per_mode = args.warmup + args.steps + (args.rounds - 1) * (min(1, args.warmup) + args.steps)
    progress = _Bar(console, per_mode * len(args.modes) * len(args.models)) if rank == 0 else None
    try:
        for name in args.models:
            info = bench_model(name, args, rank, world, progress)
            add_ratios(info, info["batch_size"] * world)
            results[name] = info
            if progress:
                # Steps of unavailable modes never ran: take them off the bar.
                progress.shrink(per_mode * sum(1 for m in info["modes"].values() if m["status"] != "ok"))
    finally:
        if progress:
            progress.stop()
    if rank == 0:
        meta["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
        report = {**meta, "models": results}
        path = save(report, args)
        print_table(console, report)
        console.print(f"results: {path}")
        if args.plot:
            console.print(f"plot: {plot(report, path.with_suffix('.png'))}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


class _Bar:
    """Rank 0's progress bar (rich)."""

    def __init__(self, console, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=console)
        self._task = self._progress.add_task("starting", total=total)
        self._total = total
        self._progress.start()

    def describe(self, text: str) -> None:
        self._progress.update(self._task, description=text)

    def advance(self) -> None:
        self._progress.advance(self._task)

    def shrink(self, steps: int) -> None:
        self._total -= steps
        self._progress.update(self._task, total=self._total)

    def stop(self) -> None:
        self._progress.stop()


def save(report: dict, args) -> Path:
    from _results import save_report  # noqa: PLC0415

    return save_report(report, args.name, args.out)


def print_table(console, report: dict) -> None:
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"median step time (slowest rank), {report['world_size']} ranks, link: {report['link']}",
                  caption="ratios < 1 are faster; vs wire: against `wire`, `wire_16` for 16-bit modes, `wire_8` "
                          "for 8-bit ones")
    for col in ("model", "mode", "median ms", "p10", "p90", "vs ddp", "vs wire", "samples/s", "final loss"):
        table.add_column(col, justify="left" if col in ("model", "mode") else "right")
    missing = []
    for name, info in report["models"].items():
        label = name
        for mode, m in info["modes"].items():
            if m["status"] != "ok":
                missing.append(f"{name}/{mode}: {m['reason']}")
                continue
            fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
            table.add_row(label, f"[bold]{mode}[/]" if mode.startswith("shoal") else mode,
                          f"{m['median_ms']:.1f}", f"{m['p10_ms']:.1f}", f"{m['p90_ms']:.1f}",
                          fmt(m.get("vs_ddp"), ".2f"), fmt(m.get("vs_wire"), ".2f"),
                          fmt(m.get("samples_per_s"), ".0f"), fmt(m.get("loss"), ".5f"))
            label = ""
        table.add_section()
    console.print(table)
    for name, info in report["models"].items():
        console.print(f"  {name}: {info['description']}; batch {info['batch_size']} per rank, "
                      f"{info['grad_bytes'] / 1e6:.1f} MB of gradients")
    for name, info in report["models"].items():
        for mode, t in info.get("autotune", {}).items():
            console.print(f"  {name}/{mode}: autotune {t['state']}"
                          + (f" at step {t['settled_at']}: {t['choice']}" if t.get("choice") else ""))
    for line in missing:
        console.print(f"  [dim]not run: {line}[/]")
    # fp32 modes apply the same averaged gradients: their final losses must agree (1e-4 relative
    # leaves room for a different summation order).
    for name, info in report["models"].items():
        ref = info["modes"].get("ddp", {}).get("loss")
        for mode in ("shoal", "shoal_overlap", "naive", "horovod"):
            loss = info["modes"].get(mode, {}).get("loss")
            if ref is not None and loss is not None and abs(loss - ref) > 1e-4 * max(1.0, abs(ref)):
                console.print(f"  [red]{name}/{mode}: final loss {loss:.6f} differs from ddp's {ref:.6f}[/]")


def plot(report: dict, path: Path) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    models = list(report["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        modes = {k: v for k, v in report["models"][name]["modes"].items() if v["status"] == "ok"}
        med = [m["median_ms"] for m in modes.values()]
        err = [[m["median_ms"] - m["p10_ms"] for m in modes.values()],
               [m["p90_ms"] - m["median_ms"] for m in modes.values()]]
        colors = ["tab:blue" if k.startswith("shoal") else "tab:orange" if k.startswith("ddp")
                  else "tab:gray" if k.startswith("wire") else "tab:green" for k in modes]
        ax.bar(list(modes), med, yerr=err, color=colors, capsize=3)
        ax.set_title(name)
        ax.set_ylabel("median step time, ms (p10-p90)")
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{report['world_size']} ranks, link: {report['link']}, torch {report['torch']}")
    fig.tight_layout()
    import io  # noqa: PLC0415

    from _results import write_result  # noqa: PLC0415

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)  # written whole, never through a link at the name
    return write_result(path, buf.getvalue())


# ------------------------------------------------------------------------------------ launching

def relaunch_in_cluster(args, argv: list[str]) -> int:
    """Start this script on ``--nodes`` x ``--ranks-per-node`` ranks in an emulated cluster."""
    from shoal.testing.cluster import run_in_cluster  # noqa: PLC0415

    return run_in_cluster([sys.executable, str(Path(__file__).resolve()), *argv], nodes=args.nodes,
                          ranks_per_node=args.ranks_per_node, rate=args.link, delay_ms=args.delay_ms,
                          timeout_s=args.timeout_s)


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", "--model", nargs="+", default=["mlp_big", "many_small", "cnn"],
                    help="models to run (see benchmarks/models.py)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE",
                    help=f"modes to run: {', '.join(MODES)} (default: all)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode in round 1 (1 in later rounds)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all modes")
    ap.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default: per model)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                    help="what every mode trains with: plain SGD (default), SGD with momentum, Adam")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--powersgd-rank", type=int, default=POWERSGD["rank"],
                    help="rank of the PowerSGD modes (Shoal's and torch's hook alike)")
    ap.add_argument("--powersgd-start-step", type=int, default=POWERSGD["start_step"],
                    help="full-precision steps before PowerSGD starts (torch's start_powerSGD_iter; >= 2, "
                         "which torch's hook requires with error feedback)")
    ap.add_argument("--commit-every", type=int, default=COMMIT_EVERY,
                    help="steps between the shoal_elastic mode's commits")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--name", default=None, help="results file name (default: the link, e.g. loopback)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where models and batches live; cuda: each rank's GPU (LOCAL_RANK) over NCCL")
    ap.add_argument("--plot", action="store_true", help="also write a PNG bar chart next to the JSON")
    ap.add_argument("--link", default=None, metavar="RATE",
                    help="run in an emulated cluster, nodes joined by a RATE link (tc units, e.g. 1gbit)")
    ap.add_argument("--nodes", type=int, default=2, help="with --link: number of nodes")
    ap.add_argument("--ranks-per-node", type=int, default=1, help="with --link: ranks per node")
    ap.add_argument("--delay-ms", type=float, default=None, help="with --link: one-way delay (needs netem)")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="process-group timeout / deadline")
    args = ap.parse_args(argv)
    from models import MODELS  # noqa: PLC0415

    bad = [m for m in args.models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    if args.device == "cuda":
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch.cuda.is_available() is False. HINT: run it on a GPU machine with a "
                     "CUDA build of torch (`shoal doctor` says what this one has), or use --device cpu")
    if args.plot:
        import importlib.util  # noqa: PLC0415

        if importlib.util.find_spec("matplotlib") is None:  # fail now, not after the whole run
            ap.error("--plot needs matplotlib. HINT: pip install 'shoal[bench]' (or matplotlib)")
    if args.name is None:
        args.name = (f"{args.link}-{args.nodes}x{args.ranks_per_node}" if args.link else "loopback")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args = parse_args(argv)
    global OPTIMIZER, COMMIT_EVERY
    OPTIMIZER = args.optimizer
    COMMIT_EVERY = args.commit_every
    POWERSGD.update(rank=args.powersgd_rank, start_step=args.powersgd_start_step)
    from shoal.core.env import get_env  # noqa: PLC0415

    if args.link and get_env("RANK") is None:
        return relaunch_in_cluster(args, argv)
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
