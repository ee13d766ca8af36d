"""One bucket at a time on each stream, in launch order (reducer, constraint 4): gloo runs two operations
of one group at once, and without the order a small bucket launched after a big one landed first, leaving
the big one's share of the optimizer step for the end of the step (measured at 1 Gbit/s on mlp_big)."""

from __future__ import annotations

import torch

from shoal.testing import run_ranks


def _rank_landing_order(num_streams: int) -> dict:
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    from shoal.core.buckets import TensorSpec  # noqa: PLC0415
    from shoal.core.reducer import GradientReducer, ReducerObserver  # noqa: PLC0415

    torch.set_num_threads(1)
    lock = threading.Lock()
    landed: list[int] = []

    class Landing(ReducerObserver):
        def after_launch(self, reducer, bucket, future):
            def done(_f, b=bucket):
                with lock:
                    landed.append(b)
            future.add_done_callback(done)

    cpu = torch.device("cpu")
    # Ready in reverse order: bucket 0 = "t3" (1 MB), 1 = "big" (16 MB), then two small ones.
    specs = [TensorSpec("s0", (256,), torch.float32, cpu), TensorSpec("s1", (256,), torch.float32, cpu),
             TensorSpec("big", (4 << 20,), torch.float32, cpu), TensorSpec("t3", (1 << 18,), torch.float32, cpu)]
    red = GradientReducer(specs, fusion_threshold_mb=0.0001, first_bucket_mb=1, num_streams=num_streams,
                          observers=[Landing()])
    orders, values = [], []
    for step in range(3):
        landed.clear()
        for i in reversed(range(len(specs))):
            red.load(i, torch.full(specs[i].shape, float(step + 1 + torch.distributed.get_rank())))
        red.finish()
        deadline = time.monotonic() + 10  # a future's callbacks may run just after its waiter wakes
        while len(landed) < len(specs) and time.monotonic() < deadline:
            time.sleep(0.001)
        with lock:
            orders.append(list(landed))
        values.append([v.view(-1)[0].item() for v in red.views])
    return {"orders": orders, "values": values, "buckets": [list(p.tensor_ids) for p in red.plans]}


def _rank_both() -> list[dict]:
    return [_rank_landing_order(1), _rank_landing_order(2)]


def test_buckets_of_a_stream_land_in_launch_order():
    for one, two in run_ranks(_rank_both, world_size=2, timeout_s=60):
        assert one["buckets"] == [[3], [2], [1], [0]]
        assert one["orders"] == [[0, 1, 2, 3]] * 3  # the big bucket 1 is never overtaken by 2 or 3
        for order in two["orders"]:  # two streams: in order within each
            assert [b for b in order if b % 2 == 0] == [0, 2] and [b for b in order if b % 2 == 1] == [1, 3]
        for r in (one, two):  # the average of (step + 1) and (step + 2) on every tensor
            assert r["values"] == [[1.5] * 4, [2.5] * 4, [3.5] * 4]
