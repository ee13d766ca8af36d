"""Face-recognition-style training: a data-parallel backbone and a class-sharded ArcFace classifier (PartialFC).

The data set is synthetic: every identity is a Gaussian cluster in input space, and the backbone (a small MLP)
must map samples of one identity close together on the unit sphere. The classifier weight (identities x
embedding) is split across the ranks; each rank holds 1/N of it and of its optimizer state. Accuracy is the
nearest-class accuracy on held-out samples of the same identities, searched across all shards.

Launch (2 ranks on one machine):

    shoal run -np 2 python examples/partial_fc.py
    # or, equivalently:  python -m torch.distributed.run --standalone --nproc-per-node 2 examples/partial_fc.py

Also runs as a single process: ``python examples/partial_fc.py``. About 20 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn

import shoal.torch as hvd
from shoal.parallel import ArcFace, PartialFC

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--identities", type=int, default=4000)
parser.add_argument("--input-dim", type=int, default=64)
parser.add_argument("--embedding-size", type=int, default=64)
parser.add_argument("--batch-size", type=int, default=128, help="per rank")
parser.add_argument("--steps", type=int, default=500)
parser.add_argument("--sample-rate", type=float, default=0.5)
parser.add_argument("--noise", type=float, default=1.1, help="within-identity spread (centers have std 1)")
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--eval-every", type=int, default=100)
args = parser.parse_args()

hvd.init()
rank, world = hvd.rank(), hvd.size()
torch.set_num_threads(1)  # one core per rank on a small machine; raise on a bigger one

# The identities: the same centers on every rank (same seed); each rank then draws its own samples. Seeds
# stay clear of PartialFC's weight-init seeds (0, 1, ... per block of 4096 rows at seed=0): with seed 0
# the centers would be the classifier's initial rows, scaled.
centers = torch.randn(args.identities, args.input_dim, generator=torch.Generator().manual_seed(10_000))
sampler = torch.Generator().manual_seed(20_000 + rank)


def draw(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, args.identities, (n,), generator=gen)
    return centers[labels] + args.noise * torch.randn(n, args.input_dim, generator=gen), labels


# Held-out samples of the same identities, different on each rank.
test_x, test_y = draw(1024, torch.Generator().manual_seed(30_000 + rank))

torch.manual_seed(0)
backbone = nn.Sequential(nn.Linear(args.input_dim, 256), nn.BatchNorm1d(256), nn.PReLU(),
                         nn.Linear(256, args.embedding_size), nn.BatchNorm1d(args.embedding_size))
# Every rank holds classes [class_start, class_end) of the weight; its parameters carry _shoal_no_sync.
pfc = PartialFC(args.embedding_size, args.identities, ArcFace(s=32.0, m=0.3), sample_rate=args.sample_rate)
# One optimizer for both. DistributedOptimizer averages the backbone's gradients across ranks and skips the
# classifier's (marked _shoal_no_sync): each rank owns different rows, whose gradient already covers the
# global batch.
opt = hvd.DistributedOptimizer(
    torch.optim.SGD([{"params": backbone.parameters()}, {"params": pfc.parameters()}], lr=args.lr,
                    momentum=0.9, weight_decay=5e-4),
    named_parameters=[*backbone.named_parameters(prefix="backbone"), *pfc.named_parameters(prefix="pfc")])
pfc.bind_optimizer(opt)  # with sampling: only the rows used in a step (and their momentum) are updated
hvd.broadcast_parameters(backbone.state_dict(), root_rank=0)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
if rank == 0:
    print(f"{world} rank(s); {args.identities} identities, {pfc.num_local} on rank 0 "
          f"(classes [{pfc.class_start}, {pfc.class_end})); sample_rate {args.sample_rate}")


def evaluate() -> float:
    backbone.eval()
    pfc.eval()
    with torch.no_grad():
        ids, _ = pfc.predict(backbone(test_x))
        correct = torch.tensor([float((ids == test_y).sum()), float(test_y.numel())])
    if world > 1:
        dist.all_reduce(correct)
    backbone.train()
    pfc.train()
    return float(correct[0] / correct[1])


start = time.perf_counter()
print_acc = evaluate()
if rank == 0:
    print(f"step {0:4d}  accuracy {print_acc:.3f}")
for step in range(1, args.steps + 1):
    x, y = draw(args.batch_size, sampler)
    loss = pfc(backbone(x), y)  # the global-batch loss, the same on every rank
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % args.eval_every == 0 or step == args.steps:
        acc = evaluate()
        if rank == 0:
            print(f"step {step:4d}  loss {loss.item():7.3f}  accuracy {acc:.3f}  "
                  f"({time.perf_counter() - start:.1f} s)")
hvd.shutdown()
