"""Bucket planning (``shoal.core.buckets.plan_buckets``) as pure functions: no process group."""

from __future__ import annotations

import random

import pytest
import torch

from shoal.core.buckets import ALIGN_NUMEL, BucketPlan, TensorSpec, align_numel, plan_buckets

CPU = torch.device("cpu")
F32, F16 = torch.float32, torch.float16


def _spec(i: int, numel: int, dtype=F32, device=CPU) -> TensorSpec:
    return TensorSpec(f"t{i}", (numel,), dtype, device)


def _check_invariants(specs, plans: list[BucketPlan], order=None) -> None:
    """What every plan must satisfy: each tensor once, one dtype/device per bucket, ready order kept
    inside a bucket, aligned non-overlapping offsets, buffer large enough."""
    order = list(range(len(specs) - 1, -1, -1)) if order is None else list(order)
    position = {t: p for p, t in enumerate(order)}
    ids = [t for p in plans for t in p.tensor_ids]
    assert sorted(ids) == list(range(len(specs)))
    for k, p in enumerate(plans):
        assert p.index == k
        assert len(p.tensor_ids) == len(p.offsets) > 0
        assert {specs[t].dtype for t in p.tensor_ids} == {p.dtype}
        assert {specs[t].device for t in p.tensor_ids} == {p.device}
        assert [position[t] for t in p.tensor_ids] == sorted(position[t] for t in p.tensor_ids)
        end = 0
        for t, off in zip(p.tensor_ids, p.offsets):
            assert off % ALIGN_NUMEL == 0, (p, t, off)
            assert off >= end, "views overlap"
            end = off + specs[t].numel
        assert end <= p.numel
        assert p.numel % ALIGN_NUMEL == 0
        assert p.nbytes == p.numel * torch.empty((), dtype=p.dtype).element_size()


def test_docstring_example():
    s = [_spec(i, 256) for i in range(4)]  # 1 KiB each
    plans = plan_buckets(s, bucket_nbytes=2048, first_bucket_nbytes=1024)
    assert [b.tensor_ids for b in plans] == [(3,), (2, 1), (0,)]
    _check_invariants(s, plans)


def test_empty():
    assert plan_buckets([], bucket_nbytes=1024) == []


def test_first_bucket_small_then_bucket_size():
    # 40 tensors of 400 B; first bucket closes at >= 1 KB (3 tensors), the rest at >= 4 KB (10 tensors).
    s = [_spec(i, 100) for i in range(40)]
    plans = plan_buckets(s, bucket_nbytes=4000, first_bucket_nbytes=1000)
    _check_invariants(s, plans)
    sizes = [len(p.tensor_ids) for p in plans]
    assert sizes == [3, 10, 10, 10, 7]
    assert plans[0].tensor_ids == (39, 38, 37)  # default order: reverse registration (backward order)


def test_sizes_close_at_the_threshold():
    # Random sizes: a bucket closes as soon as it reaches the limit, so without its last tensor it is
    # below the limit; every bucket but the last reaches it, unless the next tensor is itself at least
    # a bucket (it then travels alone, see below).
    rng = random.Random(0)
    s = [_spec(i, rng.randint(1, 3000)) for i in range(200)]
    limit, first = 20_000, 3_000
    plans = plan_buckets(s, bucket_nbytes=limit, first_bucket_nbytes=first)
    _check_invariants(s, plans)
    for k, p in enumerate(plans):
        cap = first if k == 0 else limit
        nbytes = [s[t].nbytes for t in p.tensor_ids]
        assert sum(nbytes[:-1]) < cap
        assert all(n < cap for n in nbytes[1:]), "an oversize tensor shares a bucket"
        if k < len(plans) - 1:
            assert sum(nbytes) >= cap or s[plans[k + 1].tensor_ids[0]].nbytes >= cap


def test_first_bucket_defaults_to_bucket_size():
    s = [_spec(i, 100) for i in range(10)]
    assert plan_buckets(s, bucket_nbytes=2000) == plan_buckets(s, bucket_nbytes=2000, first_bucket_nbytes=2000)


def test_oversize_tensor_travels_alone():
    # Constraint 2: a tensor larger than a bucket gets a bucket of its own; the small tensors before it
    # are not held back with it (they go on the wire as soon as they are ready).
    s = [_spec(0, 10), _spec(1, 10_000), _spec(2, 10), _spec(3, 10)]
    plans = plan_buckets(s, bucket_nbytes=1024, first_bucket_nbytes=512)
    _check_invariants(s, plans)
    assert [p.tensor_ids for p in plans] == [(3, 2), (1,), (0,)]
    # The same for the first bucket: the big tensor does not swallow the small first bucket.
    plans = plan_buckets(s, [2, 1, 0, 3], bucket_nbytes=100_000, first_bucket_nbytes=512)
    _check_invariants(s, plans, [2, 1, 0, 3])
    assert [p.tensor_ids for p in plans] == [(2,), (1, 0, 3)]


def test_dtype_and_device_separation():
    # Interleaved fp32/fp16 (and one meta-device tensor): one dtype/device per bucket; a tensor of
    # another dtype does not close the open bucket of the first.
    meta = torch.device("meta")
    s = [_spec(i, 100, F32 if i % 2 == 0 else F16) for i in range(8)] + [_spec(8, 100, F32, meta)]
    plans = plan_buckets(s, bucket_nbytes=1200, first_bucket_nbytes=1200)
    _check_invariants(s, plans)
    by_key = {(p.dtype, p.device): p.tensor_ids for p in plans}
    assert by_key[(F32, meta)] == (8,)
    # order is 8,7,...,0: fp32 CPU tensors 6,4,2 reach 1200 B and close; fp16 (200 B each) never does.
    assert [p.tensor_ids for p in plans if p.dtype == F32 and p.device == CPU] == [(6, 4, 2), (0,)]
    assert [p.tensor_ids for p in plans if p.dtype == F16] == [(7, 5, 3, 1)]


def test_groups():
    s = [_spec(i, 100) for i in range(6)] + [_spec(6, 100, F16)]
    order = [5, 4, 3, 2, 1, 0, 6]
    plans = plan_buckets(s, order, bucket_nbytes=1, first_bucket_nbytes=1, groups=[[0, 2, 4, 6], [1, 3, 5]])
    _check_invariants(s, plans, order)
    # Sizes are ignored (bucket_nbytes=1 would otherwise give one tensor per bucket); groups launch in
    # the order of their first ready tensor; a group splits by dtype.
    assert [p.tensor_ids for p in plans] == [(5, 3, 1), (4, 2, 0), (6,)]
    assert plan_buckets(s, order, bucket_nbytes=1, groups=[[], list(range(7))])[0].tensor_ids == (
        5, 4, 3, 2, 1, 0)
    with pytest.raises(ValueError, match="groups"):
        plan_buckets(s, bucket_nbytes=1, groups=[[0, 1, 2]])          # not every tensor
    with pytest.raises(ValueError, match="groups"):
        plan_buckets(s, bucket_nbytes=1, groups=[[0, 1, 2, 3], [3, 4, 5, 6]])  # one twice


@pytest.mark.parametrize("order", [[0, 1, 2], [0, 1, 2, 3, 3], [0, 1, 2, 4], [], [3, 2, 1, 0, 0]])
def test_order_must_be_a_permutation(order):
    s = [_spec(i, 10) for i in range(4)]
    with pytest.raises(ValueError, match="permutation"):
        plan_buckets(s, order, bucket_nbytes=100)


def test_order_is_followed():
    rng = random.Random(1)
    s = [_spec(i, rng.randint(1, 500)) for i in range(50)]
    order = list(range(50))
    rng.shuffle(order)
    plans = plan_buckets(s, order, bucket_nbytes=2000, first_bucket_nbytes=500)
    _check_invariants(s, plans, order)
    assert [t for p in plans for t in p.tensor_ids] == order  # one dtype: launch order == ready order


def test_alignment_of_offsets():
    # Odd sizes: every view starts on an ALIGN_NUMEL boundary, i.e. 64 bytes for fp32.
    s = [_spec(i, n) for i, n in enumerate([1, 17, 3, 15, 16, 33])]
    (p,) = plan_buckets(s, bucket_nbytes=1 << 20)
    assert p.tensor_ids == (5, 4, 3, 2, 1, 0)
    assert p.offsets == (0, 48, 64, 80, 96, 128)
    assert p.numel == 128 + 16
    assert all(off * 4 % 64 == 0 for off in p.offsets)
    # Views into a real buffer: aligned data pointers, disjoint, and writing one leaves the others alone.
    buf = torch.zeros(p.numel)
    views = {t: buf[off:off + s[t].numel] for t, off in zip(p.tensor_ids, p.offsets)}
    for t, v in views.items():
        assert v.data_ptr() % 64 == buf.data_ptr() % 64
        v.fill_(t + 1)
    for t, v in views.items():
        assert torch.equal(v, torch.full_like(v, t + 1))
    assert buf.count_nonzero() == sum(x.numel for x in s)


def test_deterministic():
    # Constraint 4: every rank computes the same plan from equal inputs (fresh but equal specs, dtypes
    # interleaved so that the per-dtype dict matters).
    def make():
        rng = random.Random(7)
        return [_spec(i, rng.randint(1, 400), rng.choice([F32, F16, torch.bfloat16])) for i in range(100)]
    order = list(range(100))
    random.Random(3).shuffle(order)
    a = plan_buckets(make(), order, bucket_nbytes=1500, first_bucket_nbytes=300)
    b = plan_buckets(make(), list(order), bucket_nbytes=1500, first_bucket_nbytes=300)
    assert a == b
    _check_invariants(make(), a, order)


def test_tensor_spec_sizes():
    t = TensorSpec("w", (3, 5), torch.float16, CPU)
    assert t.numel == 15 and t.nbytes == 30
    assert TensorSpec("s", (), F32, CPU).numel == 1


def test_every_view_starts_on_64_bytes_whatever_the_dtype():
    # TensorFlow aborts on DLPack buffers that are not 64-byte aligned (docs/keras.md): 16-bit views too.
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        specs = [TensorSpec(f"t{i}", (n,), dtype, torch.device("cpu")) for i, n in enumerate((3, 17, 1, 40, 5))]
        for plan in plan_buckets(specs, bucket_nbytes=1 << 20, first_bucket_nbytes=1 << 20):
            size = torch.empty((), dtype=dtype).element_size()
            assert all(off * size % 64 == 0 for off in plan.offsets), (dtype, plan.offsets)
