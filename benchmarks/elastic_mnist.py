"""Elastic training under faults, through the real ``shoal run --min-np/--max-np``: 4 workers (2 emulated
nodes x 2, ``SHOAL_LOCAL_SIZE=2``, gloo on loopback) train the MNIST CNN of ``examples/pytorch_mnist.py``
under ``hvd.elastic.run`` with an ``ElasticSampler``, and one fault is injected at a random step.

Scenarios (one job each, in one run, same seed and data):

* ``none``: uninterrupted, the reference;
* ``kill``: one worker SIGKILLs itself (a lost rank);
* ``node``: both workers of emulated node 1 SIGKILL themselves at the same step (a lost host);
* ``hang``: one worker SIGSTOPs itself (alive, not progressing): evicted after ``SHOAL_TIMEOUT_S``;
* ``term``: one worker gets SIGTERM (a preemption notice): it leaves at the next commit.

The launcher starts a replacement for every worker lost (target: 4), which joins at a commit and is
caught up from rank 0. Per scenario: the test accuracy at the end and its difference to ``none``
(acceptance: within 0.3 points), the samples trained (batch x world size summed over the steps: every
epoch's samples once, plus the batches redone after a restore and the padding of uneven dealings), the seconds from the fault to the first step the survivors complete in the new
world (acceptance: within 5 s, except ``hang``, which waits ``SHOAL_TIMEOUT_S`` by design), the recovery's
phases as the survivors measured them (``hvd.elastic.recovery_times()``: leave, agree, rebuild, restore,
sync, first step), whether the state was kept or restored, and whether every worker, the replacements
included, ends with bitwise the same weights.

Run (about 6 minutes on 2 cores)::

    .venv/bin/python benchmarks/elastic_mnist.py
    .venv/bin/python benchmarks/elastic_mnist.py --scenarios none kill --epochs 1 --seed 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time

EVENT = re.compile(r"EVENT (\{.*\})")
SCENARIOS = ("none", "kill", "node", "hang", "term")


# ------------------------------------------------------------------------------------------------ worker
def worker(args) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import shoal.torch as hvd
    from shoal.testing.datasets import load_mnist

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from pytorch_mnist import Net

    torch.set_num_threads(1)
    hvd.init()
    wid = int(os.environ.get("SHOAL_ELASTIC_ID", "0"))
    data = load_mnist()
    x_train = torch.from_numpy(data["x_train"]).float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1)
    y_train = torch.from_numpy(data["y_train"])
    x_test = torch.from_numpy(data["x_test"]).float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1)
    y_test = torch.from_numpy(data["y_test"])
    dataset = torch.utils.data.TensorDataset(x_train, y_train)

    torch.manual_seed(args.seed)
    model = Net()
    base_lr = args.lr
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=base_lr * hvd.size(), momentum=0.9),
                                         named_parameters=model.named_parameters())
    sampler = hvd.elastic.ElasticSampler(dataset, shuffle=True, seed=args.seed)
    state = hvd.elastic.TorchState(model, optimizer, sampler=sampler, epoch=0, steps=0, samples=0)

    def say(**kw):
        print("EVENT " + json.dumps({"wid": wid, "rank": hvd.rank(), "size": hvd.size(),
                                     "gen": hvd.elastic.generation(), "t": time.time(), **kw}), flush=True)

    def on_reset():
        for group in optimizer.param_groups:  # Horovod's examples: the learning rate follows the world size
            group["lr"] = base_lr * hvd.size()

    state.register_reset_callbacks([on_reset])
    victims = {int(v) for v in args.victims.split(",")} if args.victims else set()
    fault_signal = {"kill": signal.SIGKILL, "node": signal.SIGKILL, "hang": signal.SIGSTOP,
                    "term": signal.SIGTERM}.get(args.scenario)

    @hvd.elastic.run
    def train(state):
        say(what="start", epoch=state.epoch, steps=state.steps, times=hvd.elastic.recovery_times())
        first = True
        while state.epoch < args.epochs:
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=state.sampler)
            for batch_idx, (x, y) in enumerate(loader):
                if fault_signal is not None and wid in victims and state.steps == args.at:
                    say(what="fault", signal=args.scenario)
                    os.kill(os.getpid(), fault_signal)
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                state.sampler.record_batch(batch_idx, args.batch_size)
                state.steps += 1
                state.samples += len(x) * hvd.size()
                if state.steps % args.commit_every == 0:
                    state.commit()
                if first:
                    say(what="first", steps=state.steps)
                    first = False
            state.epoch += 1
            state.sampler.set_epoch(state.epoch)
            state.commit()

    say(what="begin")
    train(state)
    model.eval()
    with torch.no_grad():
        correct = sum((model(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum().item()
                      for i in range(0, len(x_test), 1000))
    weights = torch.cat([p.detach().flatten() for p in model.state_dict().values()]).numpy()
    say(what="done", steps=state.steps, samples=state.samples, accuracy=100.0 * correct / len(x_test),
        weights=hashlib.sha256(np.ascontiguousarray(weights).tobytes()).hexdigest()[:16])
    hvd.shutdown()
    return 0


# ------------------------------------------------------------------------------------------------ driver
def run_scenario(args, scenario: str, at: int) -> dict:
    victims = {"none": "", "kill": "1", "node": "2,3", "hang": "1", "term": "1"}[scenario]
    env = {**os.environ, "SHOAL_LOCAL_SIZE": "2", "OMP_NUM_THREADS": "1", "SHOAL_TIMEOUT_S": str(args.timeout_s),
           "SHOAL_ELASTIC_TIMEOUT_S": "3"}
    cmd = [sys.executable, "-m", "shoal.runner.cli", "run", "-np", "4", "--min-np", "2", "--max-np", "4",
           sys.executable, os.path.abspath(__file__), "--worker", "--scenario", scenario, "--at", str(at),
           "--victims", victims, "--epochs", str(args.epochs), "--seed", str(args.seed),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--commit-every", str(args.commit_every)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.job_timeout_s)
    wall = time.time() - t0
    events = [json.loads(m.group(1)) for m in EVENT.finditer(proc.stdout)]
    done = [e for e in events if e["what"] == "done"]
    faults = [e for e in events if e["what"] == "fault"]
    row: dict = {"scenario": scenario, "at_step": at if scenario != "none" else None, "exit_code": proc.returncode,
                 "wall_s": round(wall, 1), "workers_done": len(done),
                 "replacements_done": sum(1 for e in done if e["wid"] >= 4),
                 "same_weights": len({e["weights"] for e in done}) == 1 and len(done) > 0}
    if done:
        zero = min(done, key=lambda e: e["rank"])
        row.update(accuracy=zero["accuracy"], samples=zero["samples"], steps=zero["steps"], final_size=zero["size"])
    if faults:
        t_fault = min(e["t"] for e in faults)
        gen = max(e["gen"] for e in faults)
        survivors = {e["wid"] for e in faults} ^ {e["wid"] for e in events if e["what"] == "begin" and e["wid"] < 4}
        starts = [e for e in events if e["what"] == "start" and e["gen"] > gen and e["wid"] in survivors]
        firsts = [e for e in events if e["what"] == "first" and e["gen"] > gen and e["wid"] in survivors]
        if starts:
            start = min(starts, key=lambda e: e["t"])
            times = dict(start["times"])
            row["kept_state"] = times.pop("kept", None)
            failed_at = times.pop("failed_at", None)
            row["recovery_s"] = {k: round(v, 3) for k, v in times.items()}
            if failed_at is not None:
                row["recovery_s"]["detect"] = round(failed_at - t_fault, 3)
            mine = [e for e in firsts if e["wid"] == start["wid"] and e["gen"] == start["gen"]]
            if mine:
                row["recovery_s"]["first_step"] = round(mine[0]["t"] - start["t"], 3)
        if firsts:
            row["fault_to_new_world_step_s"] = round(min(e["t"] for e in firsts) - t_fault, 2)
    if proc.returncode != 0 or not done:
        row["stderr_tail"] = proc.stderr[-3000:]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--lr", type=float, default=0.01, help="per worker; times the world size")
    p.add_argument("--commit-every", type=int, default=10, help="steps between commits")
    p.add_argument("--seed", type=int, default=42, help="data order, initial weights and the fault's step")
    p.add_argument("--timeout-s", type=float, default=10.0, help="SHOAL_TIMEOUT_S: how long a hung rank has")
    p.add_argument("--job-timeout-s", type=float, default=900.0)
    p.add_argument("--json", help="also write the report here")
    # worker role
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scenario", default="none", help=argparse.SUPPRESS)
    p.add_argument("--at", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--victims", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import random

    steps_per_epoch = 60000 // (4 * args.batch_size)
    rng = random.Random(args.seed)
    rows = []
    for scenario in args.scenarios:
        # A random step in the middle half of the run (drawn, not placed: it may fall on a commit or not).
        total = args.epochs * steps_per_epoch
        at = rng.randrange(total // 4, 3 * total // 4)
        row = run_scenario(args, scenario, at)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = next((r for r in rows if r["scenario"] == "none" and "accuracy" in r), None)
    if ref is not None:
        for r in rows:
            if "accuracy" in r:
                r["accuracy_minus_none"] = round(r["accuracy"] - ref["accuracy"], 2)
    report = {"benchmark": "elastic_mnist", "argv": sys.argv[1:], "uptime": os.popen("uptime").read().strip(),
              "cores": os.cpu_count(), "python": platform.python_version(), "rows": rows,
              "settings": {"workers": 4, "emulated_nodes": 2, "epochs": args.epochs, "batch_size": args.batch_size,
                           "commit_every": args.commit_every, "timeout_s": args.timeout_s,
                           "steps_per_epoch_at_4": steps_per_epoch}}
    import torch

    report["torch"] = torch.__version__
    print(f"{'scenario':<9}{'exit':>5}{'acc %':>8}{'vs none':>9}{'samples':>9}{'to step s':>10}{'kept':>6}"
          f"{'same w':>8}{'wall s':>8}")
    for r in rows:
        print(f"{r['scenario']:<9}{r['exit_code']:>5}{r.get('accuracy', float('nan')):>8.2f}"
              f"{r.get('accuracy_minus_none', float('nan')):>9.2f}{r.get('samples', 0):>9}"
              f"{r.get('fault_to_new_world_step_s', float('nan')):>10.2f}{str(r.get('kept_state', '-')):>6}"
              f"{str(r['same_weights']):>8}{r['wall_s']:>8.1f}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _results import save_report, write_result

    path = save_report(report, "elastic-mnist")
    if args.json:
        write_result(__import__("pathlib").Path(args.json), json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
