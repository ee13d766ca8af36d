"""PartialFC checkpoints hold one save, never a mix: real gloo ranks that die in the middle of a save, shards
of two saves combined by hand, damaged and missing shards, and links planted at the predictable names.

The weight at save A is the seeded initialization, which does not depend on the world size, so the parent
rebuilds it in one process (``_weight_a``) to tell which save a load returned. The normal round trip (2
ranks saving, 3 and 1 loading, optimizer state included) is in test_partial_fc.py.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from shoal.core.errors import ShoalError
from shoal.parallel import ArcFace, PartialFC, load_full_weight
from shoal.testing import RanksFailed, run_ranks

DIM, CLASSES = 8, 20
DIES = 17  # the exit code of the rank killed mid-save


def _weight_a() -> torch.Tensor:
    return PartialFC(DIM, CLASSES, ArcFace(), seed=1).weight.detach().clone()


def _die_in_save(at: str) -> None:
    """Make this process exit (no exception, no cleanup: as a killed rank) at one point of the next save.

    ``at="shard"``: right after its shard file got its final name, before the commit; ``"in-shard"``:
    its shard written, instead of giving it its final name (the other ranks' shards are in place: the mix of
    the issue); ``"index"``: instead of renaming the index into place (the commit). Each is a rename, in the
    former code and this one alike, so the fault is injected at ``os.replace`` in this rank's process only.
    """
    real = os.replace

    def replace(src, dst):
        name = os.path.basename(os.fspath(dst))
        shard = ".shard" in name and name.endswith(".pt")
        if (at == "index" and name == "partial_fc.json") or (at == "in-shard" and shard):
            os._exit(DIES)
        real(src, dst)
        if at == "shard" and shard:
            os._exit(DIES)

    os.replace = replace


def _rank_interrupted_save(directory: str, die_rank: int, at: str, previous: bool):
    """Save A (seed-1 init) when ``previous``, then save B (A + 1) during which ``die_rank`` dies."""
    pfc = PartialFC(DIM, CLASSES, ArcFace(), seed=1)
    first = pfc.save_sharded(directory) if previous else None
    with torch.no_grad():
        pfc.weight.add_(1.0)
    if dist.get_rank() == die_rank:
        _die_in_save(at)
    try:
        pfc.save_sharded(directory)
    except Exception as exc:  # noqa: BLE001 (the survivor's view of the failure, for the parent)
        return first, f"{type(exc).__name__}: {exc}"
    return first, None


def _run_interrupted(directory: str, die_rank: int, at: str, previous: bool):
    """The survivor's (save id of A, error) after ``die_rank`` died; checks how each rank ended."""
    with pytest.raises(RanksFailed) as failed:
        run_ranks(_rank_interrupted_save, world_size=2, timeout_s=40, grace_s=15,
                  args=(directory, die_rank, at, previous))
    dead, survivor = failed.value.by_rank(die_rank), failed.value.by_rank(1 - die_rank)
    assert dead.status == "died" and dead.exitcode == DIES, dead.describe()
    assert survivor.status == "ok", survivor.describe()
    return survivor.value


def _rank_load_then_save(directory: str):
    """Load (another init first: every value must come from the files), then save C = loaded + 2."""
    pfc = PartialFC(DIM, CLASSES, ArcFace(), seed=2)
    loaded = pfc.load_sharded(directory)
    weight = pfc.weight.detach().clone()
    with torch.no_grad():
        pfc.weight.add_(2.0)
    return loaded, weight, pfc.save_sharded(directory)


def _index(directory: str) -> dict:
    with open(os.path.join(directory, "partial_fc.json")) as f:
        return json.load(f)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("die_rank,at,shards_of_b", [(1, "in-shard", 1), (1, "shard", 2), (0, "index", 2)],
                         ids=["rank1-writing-its-shard", "rank1-after-its-shard", "rank0-at-the-commit"])
def test_rank_killed_mid_save_leaves_the_previous_save_whole(tmp_path, die_rank, at, shards_of_b):
    directory = os.fspath(tmp_path / "ckpt")
    first, error = _run_interrupted(directory, die_rank, at, previous=True)
    # Save B's shards are on disk beside A's (those its ranks finished); the index still names A, and A is
    # what loads, whole.
    assert torch.equal(load_full_weight(directory), _weight_a())
    names = os.listdir(directory)
    assert len([n for n in names if n.startswith("partial_fc.") and n.endswith(".pt")]) == 2 + shards_of_b, names
    assert _index(directory)["save_id"] == first
    # The survivor says where the save stands.
    assert error is not None and "ShoalError" in error, error
    assert ("may or may not have committed" if at == "index" else "Nothing was committed") in error, error
    # A fresh job on 3 ranks resumes from A, and its own save C then removes B's orphans and A's shards.
    results = run_ranks(_rank_load_then_save, world_size=3, timeout_s=40, args=(directory,))
    assert [r[0] for r in results] == [first] * 3
    assert torch.equal(torch.cat([r[1] for r in results]), _weight_a())
    third = results[0][2]
    assert sorted(os.listdir(directory)) == sorted(["partial_fc.json"] + [
        f"partial_fc.{third}.shard{r:05d}-of-00003.pt" for r in range(3)])
    assert torch.equal(load_full_weight(directory), _weight_a() + 2.0)


@pytest.mark.timeout(60)
def test_interrupted_first_save_fails_naming_the_unfinished_save(tmp_path):
    directory = os.fspath(tmp_path / "ckpt")
    _, error = _run_interrupted(directory, 1, "shard", previous=False)
    assert "Nothing was committed" in error, error
    (unfinished,) = {n.split(".")[1] for n in os.listdir(directory) if n.endswith(".pt")}
    with pytest.raises(ShoalError, match=rf"no PartialFC checkpoint index(.|\n)*save {unfinished} \(shards "
                                         r"of ranks \[0, 1\] of 2\)(.|\n)*interrupted(.|\n)*HINT: save again"):
        load_full_weight(directory)


def _rank_two_saves(first: str, second: str):
    pfc = PartialFC(DIM, CLASSES, ArcFace(), seed=1)
    a = pfc.save_sharded(first)
    with torch.no_grad():
        pfc.weight.add_(1.0)
    return a, pfc.save_sharded(second)


def _rank_try_load(directory: str):
    pfc = PartialFC(DIM, CLASSES, ArcFace(), seed=2)
    try:
        pfc.load_sharded(directory)
    except ShoalError as exc:
        return False, str(exc)
    return True, pfc.weight.detach().clone()


@pytest.mark.timeout(60)
def test_shards_of_two_saves_are_never_mixed(tmp_path):
    one, two = os.fspath(tmp_path / "one"), os.fspath(tmp_path / "two")
    (a, b), _ = run_ranks(_rank_two_saves, world_size=2, timeout_s=40, args=(one, two))
    shard1_a = os.path.join(one, f"partial_fc.{a}.shard00001-of-00002.pt")
    shard1_b = os.path.join(two, f"partial_fc.{b}.shard00001-of-00002.pt")
    # Rank 1's shard of save B copied over save A's by hand: refused, naming the file, its writer, both saves.
    shutil.copyfile(shard1_a, shard1_a + ".bak")
    shutil.copyfile(shard1_b, shard1_a)
    with pytest.raises(ShoalError, match=rf"shard 'partial_fc\.{a}\.shard00001-of-00002\.pt' \(rank 1 of 2, "
                                         rf"classes \[10, 20\)\) holds the shard that rank 1 of 2 wrote in save "
                                         rf"{b}, but the index partial_fc.json is of save {a}: shards of two saves "
                                         r"are mixed(.|\n)*HINT: copy a checkpoint as a whole"):
        load_full_weight(one)
    # On 2 loading ranks, rank 0 reads only shard 0 (save A's) and rank 1 refuses the mixed file.
    (ok0, got0), (ok1, got1) = run_ranks(_rank_try_load, world_size=2, timeout_s=40, args=(one,))
    assert ok0 and torch.equal(got0, _weight_a()[:10])
    assert not ok1 and f"holds the shard that rank 1 of 2 wrote in save {b}" in got1, got1
    # A shard of B beside A's (all of B's files copied in, index too, but not shard 0): the index decides.
    os.replace(shard1_a + ".bak", shard1_a)
    shutil.copyfile(shard1_b, os.path.join(one, os.path.basename(shard1_b)))
    assert torch.equal(load_full_weight(one), _weight_a())
    shutil.copyfile(os.path.join(two, "partial_fc.json"), os.path.join(one, "partial_fc.json"))
    with pytest.raises(ShoalError, match=rf"shard 'partial_fc\.{b}\.shard00000-of-00002\.pt' \(rank 0 of 2, "
                                         rf"classes \[0, 10\)\) of save {b} is missing; other files there: "
                                         rf"save {a} \(shards of ranks \[0, 1\] of 2\)(.|\n)*HINT: copy"):
        load_full_weight(one)
    # A shard cut short is damaged, not a different save.
    with open(shard1_b, "r+b") as f:
        f.truncate(os.path.getsize(shard1_b) // 2)
    with pytest.raises(ShoalError, match=rf"rank 1 of 2, classes \[10, 20\)\) of save {b} is damaged: \d+ bytes where the index "
                                         r"recorded \d+(.|\n)*HINT: restore"):
        load_full_weight(two)
    # Rank 0's shard renamed to rank 1's name within one save: the class range gives it away.
    shutil.copyfile(os.path.join(two, f"partial_fc.{b}.shard00000-of-00002.pt"), shard1_b)
    index = _index(two)
    index["shards"][1]["nbytes"] = os.path.getsize(shard1_b)
    with open(os.path.join(two, "partial_fc.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(ShoalError, match=r"holds classes \[0, 10\) of 20, written by rank 0, where the index "
                                         r"expects \[10, 20\)"):
        load_full_weight(two)


def _rank_save(directory: str):
    return PartialFC(DIM, CLASSES, ArcFace(), seed=1).save_sharded(directory)


@pytest.mark.timeout(60)
def test_links_planted_at_the_predictable_names_are_replaced_not_followed(tmp_path):
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    directory = tmp_path / "ckpt"
    directory.mkdir()
    # The index's name, and the temporary names the former code wrote through before renaming.
    planted = ["partial_fc.json", "partial_fc.json.tmp", "partial_fc.shard00000-of-00002.pt.tmp",
               "partial_fc.shard00001-of-00002.pt.tmp"]
    for name in planted:
        (directory / name).symlink_to(victim)
    (save_id, _) = run_ranks(_rank_save, world_size=2, timeout_s=40, args=(os.fspath(directory),))
    assert victim.read_text() == "precious"
    assert not (directory / "partial_fc.json").is_symlink() and _index(os.fspath(directory))["save_id"] == save_id
    assert torch.equal(load_full_weight(directory), _weight_a())


def test_format_1_checkpoints_still_load_with_a_warning(tmp_path):
    """What the former save_sharded wrote on one rank: no save id, fixed names. Still loads, and says that
    its shards cannot be checked to belong to one save."""
    weight = _weight_a()
    torch.save({"format": "shoal.partial_fc/1", "num_classes": CLASSES, "embedding_size": DIM, "class_start": 0,
                "class_end": CLASSES, "world_size": 1, "rank": 0, "weight": weight, "optimizer_rows": {},
                "optimizer_scalars": {}}, tmp_path / "partial_fc.shard00000-of-00001.pt")
    (tmp_path / "partial_fc.json").write_text(json.dumps({
        "format": "shoal.partial_fc/1", "num_classes": CLASSES, "embedding_size": DIM, "world_size": 1,
        "shards": [{"file": "partial_fc.shard00000-of-00001.pt", "class_start": 0, "class_end": CLASSES}]}))
    with pytest.warns(UserWarning, match="carries no save id(.|\n)*HINT: load it once and save it again"):
        assert torch.equal(load_full_weight(tmp_path), weight)
    # Saving over it in the current format removes the old shard.
    pfc = PartialFC(DIM, CLASSES, ArcFace(), seed=3)
    with pytest.warns(UserWarning):
        pfc.load_sharded(tmp_path)
    save_id = pfc.save_sharded(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(["partial_fc.json",
                                                   f"partial_fc.{save_id}.shard00000-of-00001.pt"])
    assert torch.equal(load_full_weight(tmp_path), weight)
