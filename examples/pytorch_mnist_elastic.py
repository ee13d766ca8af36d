"""Elastic training of the MNIST CNN: the job goes on when a worker dies, hangs or is preempted.

Launch (2 workers; the job keeps going with 1, and a replacement joins at the next commit)::

    shoal run -np 2 --min-np 1 --max-np 2 python examples/pytorch_mnist_elastic.py

Try it: ``kill -9`` one of the workers' pids while it trains (the ``[rank1]:`` lines), or ``kill -TERM`` it.
The survivors go on within seconds, in their processes, from where they were; the launcher starts a
replacement, which is caught up from rank 0 at the next commit. The launcher's summary lists what it
recovered from. How it works, and what each kind of failure costs: docs/elastic.md.

Horovod users: this is Horovod's elastic pattern (``hvd.elastic.run``, ``TorchState``, ``ElasticSampler``)
with ``import shoal.torch as hvd``.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import shoal.torch as hvd
from shoal.testing.datasets import load_mnist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_mnist import Net  # noqa: E402 (the same model as the plain example)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--lr", type=float, default=0.01, help="per worker; scaled by the number of workers")
    p.add_argument("--commit-every", type=int, default=20, help="batches between commits")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()

    hvd.init()
    torch.set_num_threads(1)
    data = load_mnist()
    x = torch.from_numpy(data["x_train"]).float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1)
    dataset = torch.utils.data.TensorDataset(x, torch.from_numpy(data["y_train"]))
    x_test = torch.from_numpy(data["x_test"]).float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1)
    y_test = torch.from_numpy(data["y_test"])

    torch.manual_seed(args.seed)
    model = Net()
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9),
                                         named_parameters=model.named_parameters())
    sampler = hvd.elastic.ElasticSampler(dataset, shuffle=True, seed=args.seed)
    # What survives a change of membership: the model, the optimizer, the sampler's place, the epoch.
    state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=0)

    def on_reset():  # after every change of membership: the learning rate follows the number of workers
        for group in optimizer.param_groups:
            group["lr"] = args.lr * hvd.size()
        if hvd.rank() == 0:
            print(f"generation {hvd.elastic.generation()}: {hvd.size()} worker(s); last recovery "
                  f"{ {k: round(v, 3) for k, v in hvd.elastic.recovery_times().items() if k != 'failed_at'} }",
                  flush=True)

    state.register_reset_callbacks([on_reset])

    @hvd.elastic.run
    def train(state):
        while state.epoch < args.epochs:
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=state.sampler)
            for batch_idx, (xb, yb) in enumerate(loader):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                state.sampler.record_batch(batch_idx, args.batch_size)
                if batch_idx % args.commit_every == 0:
                    state.commit()  # also where workers join and where a SIGTERMed one leaves
                if hvd.rank() == 0 and batch_idx % 100 == 0:
                    print(f"epoch {state.epoch + 1} batch {batch_idx} loss {loss.item():.4f} "
                          f"({hvd.size()} worker(s))", flush=True)
            state.epoch += 1
            state.sampler.set_epoch(state.epoch)
            state.commit()

    train(state)
    model.eval()
    with torch.no_grad():
        correct = sum((model(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum().item()
                      for i in range(0, len(x_test), 1000))
    if hvd.rank() == 0:
        print(f"test accuracy {100.0 * correct / len(x_test):.2f}% after {args.epochs} epoch(s)", flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
