"""The Chrome-trace timeline on 2 real gloo ranks: valid JSON with, on every rank, a communication event for
every bucket of every step on its stream's track, bucket fills, NaN checks, optimizer steps and step markers;
the ``SHOAL_TIMELINE`` alias, ``start_timeline``/``stop_timeline``, merging, and nothing at all when off."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest
import torch

from shoal.core import timeline
from shoal.core.env import read_config
from shoal.testing import run_ranks

_STEPS = 4


def _train(opt, model, steps: int, rank: int) -> None:
    g = torch.Generator().manual_seed(7 + rank)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 64, generator=g)).pow(2).mean().backward()
        opt.step()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])


def _from_knob():
    """The knob alone (SHOAL_TIMELINE_FILENAME) starts the timeline; fixed plan, NaN check on."""
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    model = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), nan_check="warn")
    _train(opt, model, _STEPS, hvd.rank())
    return opt.engine.num_buckets, opt.engine.num_streams, timeline.stop_timeline()


def _events(path: str, rank: int) -> dict:
    with open(path) as f:
        doc = json.load(f)  # valid JSON, not only "chrome://tracing tolerates it"
    assert isinstance(doc["traceEvents"], list) and doc["otherData"]["rank"] == rank
    by_cat: dict = defaultdict(list)
    for ev in doc["traceEvents"]:
        assert ev["pid"] == rank and isinstance(ev["tid"], int) and ev["ph"] in ("X", "i", "M"), ev
        if ev["ph"] == "X":
            assert ev["dur"] >= 0 and ev["ts"] >= 0, ev
        by_cat[ev.get("cat", "meta")].append(ev)
    return by_cat


@pytest.mark.timeout(120)
def test_two_rank_timeline_has_every_bucket_on_every_rank(tmp_path):
    base = str(tmp_path / "trace.json")
    # 16 KB buckets (the first one too): the 6-layer model (16.6 KB per layer) gets 6+ buckets on 2 streams.
    env = {"SHOAL_TIMELINE_FILENAME": base, "SHOAL_AUTOTUNE": "0", "SHOAL_FUSION_THRESHOLD_MB": "0.016",
           "SHOAL_FIRST_BUCKET_MB": "0.016", "SHOAL_NUM_STREAMS": "2"}
    results = run_ranks(_from_knob, world_size=2, timeout_s=60, env=env)
    for rank, (buckets, streams, path) in enumerate(results):
        assert path == str(tmp_path / f"trace.rank{rank}.json") and buckets >= 4 and streams == 2
        cats = _events(path, rank)
        comm = {(e["args"]["step"], e["args"]["bucket"]): e for e in cats["communication"]}
        for step in range(1, _STEPS + 1):
            for b in range(buckets):
                ev = comm.get((step, b))
                assert ev is not None, f"rank {rank}: no communication event for bucket {b} of step {step}"
                assert ev["tid"] == 10 + b % streams and ev["dur"] > 0
        fills = {(e["args"]["step"], e["args"]["bucket"]) for e in cats["wait_for_gradients"]}
        assert {(s, b) for s in range(2, _STEPS + 1) for b in range(buckets)} <= fills
        checks = {(e["args"]["step"], e["args"]["bucket"]) for e in cats["nan_check"]}
        assert {(s, b) for s in range(1, _STEPS + 1) for b in range(buckets)} <= checks
        assert len([e for e in cats["optimizer"] if e["name"] == "optimizer step"]) == _STEPS
        assert [e["name"] for e in cats["step"] if e["ph"] == "i"] == [f"end of step {s}" for s in
                                                                       range(1, _STEPS + 1)]
        assert len(cats["synchronize"]) == _STEPS
        names = {e["args"]["name"] for e in cats["meta"] if e["name"] == "thread_name"}
        assert {"steps", "main", "gradients", "stream 0", "stream 1"} <= names
    merged = timeline.merge_timelines([r[2] for r in results], str(tmp_path / "merged.json"))
    with open(merged) as f:
        pids = {e["pid"] for e in json.load(f)["traceEvents"]}
    assert pids == {0, 1}


def _by_api(path: str):
    """start_timeline / stop_timeline around a tuned, fp16-compressed run."""
    import shoal.torch as hvd  # noqa: PLC0415

    torch.set_num_threads(1)
    assert timeline.active() is None
    model = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), compression=hvd.Compression.fp16)
    tl = timeline.start_timeline(path)
    with pytest.raises(RuntimeError, match="already"):
        timeline.start_timeline(path)
    _train(opt, model, 6, hvd.rank())
    written = timeline.stop_timeline()
    assert timeline.active() is None and timeline.stop_timeline() is None
    return written, tl.path


@pytest.mark.timeout(120)
def test_start_and_stop_by_api_with_compression_and_tuner(tmp_path):
    pattern = str(tmp_path / "run-{rank}.trace")
    results = run_ranks(_by_api, world_size=2, timeout_s=60, args=(pattern,))
    for rank, (written, path) in enumerate(results):
        assert written == path == str(tmp_path / f"run-{rank}.trace")
        cats = _events(path, rank)
        assert {e["args"]["algorithm"] for e in cats["communication"]} == {"fp16"}
        assert any(e["name"].startswith("sizes: try") for e in cats["autotune"])  # the tuner's trials


def _off():
    import shoal.torch as hvd  # noqa: PLC0415

    model = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters())
    _train(opt, model, 2, hvd.rank())
    return timeline.active() is None and timeline.span("optimizer", "x") is timeline.span("step", "y")


@pytest.mark.timeout(60)
def test_off_by_default_records_nothing(tmp_path):
    assert run_ranks(_off, world_size=2, timeout_s=60) == [True, True]


def test_timeline_alias_and_rank_paths():
    assert read_config({"SHOAL_TIMELINE": "/tmp/a.json"}).timeline_filename == "/tmp/a.json"
    both = {"SHOAL_TIMELINE": "/tmp/a.json", "SHOAL_TIMELINE_FILENAME": "/tmp/b.json"}
    assert read_config(both).timeline_filename == "/tmp/b.json"  # the knob's own name wins
    assert timeline.rank_path("/x/t.json", 3) == "/x/t.rank3.json"
    assert timeline.rank_path("/x/t", 0) == "/x/t.rank0.json"
    assert timeline.rank_path("/x/{rank}/t.json", 2) == "/x/2/t.json"


def test_a_file_cut_short_still_loads(tmp_path):
    tl = timeline.Timeline(str(tmp_path / "t.json"), rank=0)
    t0 = tl.now_ns()
    tl.complete("communication", "allreduce b0", t0, t0 + 1000, "stream 0", {"bucket": 0})
    tl.mark_step(1)
    tl.flush()
    tl._file.close()  # a crash: no closing bracket, no track names
    doc = timeline.load_timeline(str(tmp_path / "t.json"))
    assert [e["name"] for e in doc["traceEvents"] if e.get("cat") == "communication"] == ["allreduce b0"]
    assert os.path.getsize(tmp_path / "t.json") > 0


def test_planted_symlinks_are_replaced_and_their_targets_left_alone(tmp_path):
    """Per-rank names are predictable: in a shared directory another user can plant ``trace.rank<r>.json``
    as a link to a file of the user who records (before the fix, ``open(path, "w")`` overwrote it)."""
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    for name in ("trace.rank0.json", "trace.rank1.json", "merged.json"):
        (shared / name).symlink_to(victim)
    (shared / "trace.rank1.json").unlink()
    (shared / "trace.rank1.json").symlink_to(tmp_path / "outside" / "not-there-yet")  # dangling
    paths = []
    for rank in (0, 1):
        timeline.start_timeline(str(shared / "trace.json"), rank=rank)
        timeline.active().instant("step", "mark")
        paths.append(timeline.stop_timeline())
    merged = timeline.merge_timelines(paths, str(shared / "merged.json"))
    assert victim.read_text() == "precious"
    assert not (tmp_path / "outside" / "not-there-yet").exists()
    for rank, path in enumerate(paths):
        assert not os.path.islink(path)
        assert timeline.load_timeline(path)["otherData"]["rank"] == rank
    assert not os.path.islink(merged) and len(timeline.load_timeline(merged)["traceEvents"]) > 2
    assert sorted(os.listdir(shared)) == ["merged.json", "trace.rank0.json", "trace.rank1.json"]
