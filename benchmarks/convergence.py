"""Convergence check of the compressed modes: the training loss, step by step, against full precision and
against torch's own PowerSGD hook, on a model where low rank is known to hurt.

The model is ``cnn`` of ``benchmarks/models.py`` (ResNet-18's layout at half width, BatchNorm after every
convolution: conv weights seen as ``out x in*k*k`` matrices are far from low rank, and BatchNorm rescales
whatever the approximation leaves out). The data is real: MNIST digits padded to 32 x 32 and repeated on 3
channels, each rank its own shard of every epoch's shuffle. Every mode starts from the same weights and sees
the same batches, with SGD and momentum; per step, the mean of the ranks' training losses is recorded, and
at the end the accuracy on held-out test digits.

Modes (``--modes``):

    fp32            shoal.torch.DistributedOptimizer, no compression (the reference)
    int8            ... with Compression.int8
    powersgd        ... with Compression.powersgd(rank=R, start_step=K)   (--rank, --start-step)
    ddp_powersgd    DistributedDataParallel + torch's powerSGD_hook at the same rank and start step (one
                    DDP bucket: see benchmarks/synthetic.py for why, on gloo)
    ddp             DistributedDataParallel, full precision

Launch (2 ranks, loopback)::

    shoal run -np 2 python benchmarks/convergence.py --steps 300

Results: JSON (every step's loss per mode, the test accuracy, the load average) and, when matplotlib is
installed, a PNG of the loss curves (a moving average) beside it, under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

MODES = ("fp32", "int8", "powersgd", "ddp_powersgd", "ddp")


def _data(seed: int):
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from shoal.testing.datasets import load_mnist  # noqa: PLC0415

    d = load_mnist()

    def prep(x):
        t = torch.from_numpy(x).float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1)
        return F.pad(t, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()

    return (prep(d["x_train"]), torch.from_numpy(d["y_train"]), prep(d["x_test"]),
            torch.from_numpy(d["y_test"]), np.random.default_rng(seed))


def _build(mode: str, args):
    import torch  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415
    from models import build_model  # noqa: PLC0415

    model = build_model("cnn", args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if mode.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        if mode == "ddp_powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps  # noqa: PLC0415

            ddp = DistributedDataParallel(model, bucket_cap_mb=4096)
            ddp.register_comm_hook(ps.PowerSGDState(process_group=None, matrix_approximation_rank=args.rank,
                                                    start_powerSGD_iter=args.start_step), ps.powerSGD_hook)
        else:
            ddp = DistributedDataParallel(model)
        return ddp, torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    compression = {"fp32": "none", "int8": "int8",
                   "powersgd": f"powersgd:rank={args.rank},start_step={args.start_step}"}[mode]
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=compression)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return model, opt


def run_mode(mode: str, args, data) -> dict:
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    x_train, y_train, x_test, y_test, _ = data
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = _build(mode, args)
    losses = []
    steps_per_epoch = len(x_train) // world // args.batch_size
    import numpy as np  # noqa: PLC0415

    t0 = time.perf_counter()
    for step in range(args.steps):
        epoch, i = divmod(step, steps_per_epoch)
        order = np.random.default_rng(args.seed + epoch).permutation(len(x_train))[rank::world]
        idx = torch.from_numpy(order[i * args.batch_size:(i + 1) * args.batch_size].copy())
        model.train()
        opt.zero_grad()
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    elapsed = time.perf_counter() - t0
    model.eval()
    correct = torch.zeros(1)
    n = args.test_images
    with torch.no_grad():
        mine = range(rank * n // world, (rank + 1) * n // world)
        for lo in range(mine.start, mine.stop, 500):
            hi = min(lo + 500, mine.stop)
            correct += (model(x_test[lo:hi]).argmax(1) == y_test[lo:hi]).sum()
    dist.all_reduce(correct)
    return {"losses": losses, "test_accuracy": float(correct) / n * 100, "seconds": elapsed}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--rank", type=int, default=2, help="PowerSGD rank (shoal's and torch's hook alike)")
    ap.add_argument("--start-step", type=int, default=10, help="full-precision steps first (>= 2 for torch's hook)")
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="convergence-cnn")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    hvd.init()
    data = _data(args.seed)
    load_start = [round(v, 2) for v in os.getloadavg()]
    results = {}
    for mode in args.modes:
        results[mode] = run_mode(mode, args, data)
        if hvd.rank() == 0:
            r = results[mode]
            print(f"{mode:<14} final loss (mean of last 20) {sum(r['losses'][-20:]) / 20:.4f}  "
                  f"test accuracy {r['test_accuracy']:.2f}%  {r['seconds']:.0f} s", flush=True)
    if hvd.rank() == 0:
        from _results import save_report, write_result  # noqa: PLC0415

        report = {"name": args.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": "python benchmarks/convergence.py " + " ".join(argv or sys.argv[1:]),
                  "world_size": dist.get_world_size(), "torch": torch.__version__,
                  "python": platform.python_version(), "model": "cnn (benchmarks/models.py), MNIST 32x32x3",
                  "settings": vars(args), "load_avg_start": load_start,
                  "load_avg_end": [round(v, 2) for v in os.getloadavg()], "modes": results}
        path = save_report(report, args.name)
        print(f"results: {path}")
        try:
            import matplotlib  # noqa: PLC0415
        except ImportError:
            print("no matplotlib: no plot (pip install matplotlib)")
        else:
            import io  # noqa: PLC0415

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # noqa: PLC0415

            fig, ax = plt.subplots(figsize=(7, 4))
            w = 20
            for mode, r in results.items():
                xs = r["losses"]
                avg = [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]
                ax.plot(range(1, len(xs) + 1), avg, label=f"{mode} ({r['test_accuracy']:.1f}%)")
            ax.set_xlabel("step")
            ax.set_ylabel(f"training loss (moving average of {w})")
            ax.set_yscale("log")
            ax.set_title(f"cnn on MNIST, {dist.get_world_size()} ranks; PowerSGD rank {args.rank}, "
                         f"start {args.start_step}")
            ax.legend()
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=120)
            print(f"plot: {write_result(path.with_suffix('.png'), buf.getvalue())}")
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
