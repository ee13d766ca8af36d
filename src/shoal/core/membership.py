"""Elastic membership: which workers make up each generation of an elastic job, agreed in the job's store.

A generation is one world of process groups (:func:`shoal.core.runtime.enter_world`). This module decides who is
in the next one: the survivors of a failure, minus those who left, plus the workers waiting to join.

Design constraints:

1. Agreed through the job's c10d store (the launcher holds it, so it outlives every worker): arrival
   records, one counter, and ONE ``compare_set`` that closes a generation. Whoever closes first writes the
   member list; everyone else adopts exactly that list. No coordinator process, no thread, no second
   transport. torch's ``DynamicRendezvousHandler`` was not used: it is built for agents restarting every
   worker (liveness by heartbeat, 15 s by default; a TCP store server per round's rank 0, bound to every
   interface; ranks by sorted node descriptor, so a fresh joiner could become rank 0 and be the one the
   others copy their state from).
2. Fast when a rank dies, bounded when one hangs. A survivor closes the generation as soon as every worker
   it expects has arrived: the old members minus those that left (``leave/<wid>``), those it sees dead
   (pid gone, same host) and those the launcher reports gone (``gone/<id>``: their host's agent saw them
   end, or their whole host was lost; read while waiting, so a report that comes late still ends the
   wait), plus the registered joiners. A member that is alive but does not arrive (hung, or on a host
   whose liveness cannot be seen from here and not reported) is waited for ``elastic_timeout_s`` at most,
   then left out: it is evicted (the launcher stops it).
3. Survivors first. The member list puts the previous generation's members first, in their old rank
   order, then joiners in arrival order: rank 0 of a new generation is always a survivor when there is
   one, so the state everyone copies (``sync()``) comes from a worker that has it. Then the list is grouped
   by host, hosts in the order of their first member, and each host's members are ordered by the slot the
   launcher gave them there (``LOCAL_RANK``), rank 0 kept first: a host's ranks are contiguous, as
   hierarchical allreduce expects, and ``local_rank()`` equals the slot (the device a worker chose at
   start) whenever a host's slots are 0..n-1, also after a replacement took a dead worker's slot.
4. Generation 0 forms when the launcher's ``-np`` workers have arrived or ended (ranks in launcher id
   order, so they match the local ranks the launcher gave), or with ``--min-np`` of them after
   ``FIRST_GENERATION_WAIT_S`` (starting is slow on a loaded machine; ``elastic_timeout_s`` is about
   running workers).
5. Everything every member needs to decide alike travels in the closed record: each member's completed
   steps and whether it was partly through an update, so that all members take the same decision about
   restoring the last commit (:mod:`shoal.core.elastic`).

Store keys, under the job's secret (``shoal/el/``)::

    gen                  the latest closed generation (decimal)
    g<G>/arrivals        counter; g<G>/arrival/<k>: the k-th arrival's record (JSON)
    g<G>/members         the closed generation (JSON): workers in rank order, their records
    joins                counter of join requests; join/<k>: the k-th joiner's record
    admitted             joiners taken into some generation so far
    leave/<wid>          a worker that left on purpose
    ended                counter of workers that ended (the launcher's)
    gone/<id>            the launcher saw worker <id> (its launcher id) end, or lost its host; ``gone``
                         counts them, so that waiters read the keys only when it moved

What lives elsewhere: building each generation's groups (:mod:`shoal.core.runtime`), when a change of
membership happens and what the state does (:mod:`shoal.core.elastic`), starting and stopping workers
(:mod:`shoal.runner.elastic`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist

from . import env
from .config import ShoalConfig
from .errors import ShoalError

__all__ = ["Member", "enter", "agree", "worker_id", "note_leave", "pending_joins", "current_generation",
           "ElasticMembershipError", "started", "FORM_ATTEMPTS", "gone_count"]

log = logging.getLogger(__name__)

_PREFIX = "shoal/el/"
#: Polls of the store while waiting: first sleep, doubled up to the last (a few round trips per second).
_POLL_FIRST_S = 0.02
_POLL_MAX_S = 0.25
#: How many generations in a row a worker tries to form before it gives up (each failed try is bounded by
#: timeout_s: the rendezvous of the generation's groups).
FORM_ATTEMPTS = 5
#: Generation 0 waits this long for the launcher's -np workers (they start together, but importing a
#: framework takes seconds to tens of seconds on a loaded machine), or until the missing ones ended.
FIRST_GENERATION_WAIT_S = 60.0


class ElasticMembershipError(ShoalError):
    """This worker is not in the job's next generation (it arrived too late, was evicted, or the job fell
    below its minimum size)."""


@dataclass(frozen=True, slots=True)
class Member:
    """This worker's place in a closed generation.

    Attributes:
        generation: the generation's number.
        rank, size: this worker's rank and the generation's size.
        workers: every member's worker id, in rank order.
        survivors: how many of them were members of the previous generation (rank 0 is one of them when any is).
        records: every member's arrival record, in rank order (steps, dirty, host, pid).
    """

    generation: int
    rank: int
    size: int
    workers: tuple[str, ...]
    survivors: int
    records: tuple[dict, ...] = field(default_factory=tuple)


def _launcher_id() -> int:
    """The elastic launcher's id for this worker, -1 outside one."""
    wid = env.elastic_worker().worker_id
    return -1 if wid == "-" else int(wid)


def worker_id() -> str:
    """This process's identity in the job: host, pid and the launcher's id for it."""
    return f"{socket.gethostname()}:{os.getpid()}:{env.elastic_worker().worker_id}"


def _key(name: str) -> str:
    return _PREFIX + name


def _get_json(store: dist.Store, name: str) -> Any:
    return json.loads(store.get(_key(name)).decode())


def _exists(store: dist.Store, name: str) -> bool:
    return store.check([_key(name)])


def current_generation(store: dist.Store) -> int:
    """The latest closed generation, or -1 before the first."""
    return int(store.get(_key("gen")).decode()) if _exists(store, "gen") else -1


def started(store: dist.Store, gen: int) -> bool:
    """Whether a survivor already arrived in generation ``gen`` (a joiner's arrival does not count: joiners
    arrive early and wait for the running workers)."""
    return store.check([_key(f"g{gen}/survivor")])


def pending_joins(store: dist.Store) -> int:
    """Join requests not yet taken into a generation (read at commits, shoal.core.elastic)."""
    joins = int(store.add(_key("joins"), 0))
    admitted = int(store.add(_key("admitted"), 0))
    return max(0, joins - admitted)


def gone_count(store: dist.Store) -> int:
    """How many workers the launcher reported gone so far (``gone/<id>``, constraint 2)."""
    return int(store.add(_key("gone"), 0))


def note_leave(store: dist.Store, wid: str) -> None:
    """Record that worker ``wid`` leaves on purpose: the others do not wait for it (constraint 2)."""
    store.set(_key(f"leave/{wid}"), "1")


def _record(wid: str, prev: int, prev_rank: int, info: Optional[dict]) -> dict:
    return {"wid": wid, "host": socket.gethostname(), "pid": os.getpid(), "prev": prev, "prev_rank": prev_rank,
            "launcher_id": _launcher_id(), "slot": env.elastic_worker().local_slot, **(info or {})}


def _arrive(store: dist.Store, gen: int, record: dict) -> None:
    k = int(store.add(_key(f"g{gen}/arrivals"), 1))
    store.set(_key(f"g{gen}/arrival/{k}"), json.dumps(record))


def _arrivals(store: dist.Store, gen: int) -> list[dict]:
    count = int(store.add(_key(f"g{gen}/arrivals"), 0))
    keys = [_key(f"g{gen}/arrival/{k}") for k in range(1, count + 1)]
    present = [k for k in keys if store.check([k])]  # a record follows its counter by a moment
    return [json.loads(v.decode()) for v in store.multi_get(present)] if present else []


def _is_dead(host: str, pid: int) -> bool:
    """A worker on this host whose process is gone (or exiting); False when it cannot be seen from here."""
    if host != socket.gethostname():
        return False
    from .runtime import _is_dead as dead  # noqa: PLC0415 (one liveness rule)

    return dead(pid)


def _by_host(records: list[dict]) -> list[dict]:
    """``records`` grouped by host, hosts in the order of their first record, each group by launcher slot,
    the first record kept first (constraint 3).

    Example:
        >>> [r["wid"] for r in _by_host([{"wid": "a", "host": "x", "slot": 1}, {"wid": "b", "host": "y", "slot": 0},
        ...                              {"wid": "c", "host": "x", "slot": 0}])]
        ['a', 'c', 'b']
    """
    hosts: dict[str, list[dict]] = {}
    for r in records:
        hosts.setdefault(str(r.get("host", "")), []).append(r)
    out = []
    for i, group in enumerate(hosts.values()):
        head, rest = (group[:1], group[1:]) if i == 0 else ([], group)
        out += head + sorted(rest, key=lambda r: int(r.get("slot", -1)))  # stable: unknown slots keep their order
    return out


class _Gone:
    """The workers the launcher reported gone (constraint 2), read from the store only when its counter moved."""

    def __init__(self, store: dist.Store, ids: dict[str, int]):
        self.store, self.ids, self.count, self.wids = store, ids, -1, set()

    def __call__(self) -> set[str]:
        count = gone_count(self.store)
        if count != self.count:
            self.count = count
            self.wids = {w for w, i in self.ids.items() if i >= 0 and _exists(self.store, f"gone/{i}")}
        return self.wids


def _close(store: dist.Store, gen: int, workers: list[dict], survivors: int, handled_joins: int) -> dict:
    """Try to close generation ``gen`` with ``workers``; returns the closed record, ours or a faster
    closer's (constraint 1: one compare_set decides). The closer marks the join requests it considered as
    handled (a joiner left out asks again)."""
    proposal = json.dumps({"workers": [w["wid"] for w in workers], "survivors": survivors, "records": workers})
    key = _key(f"g{gen}/members")
    won = store.compare_set(key, "", proposal).decode()
    if won == proposal:
        joined = len(workers) - survivors
        if handled_joins:
            store.set(_key("admitted"), str(handled_joins))
        store.set(_key("gen"), str(gen))
        log.info("shoal: elastic generation %d closed: %d workers (%d survivors, %d joined)", gen, len(workers),
                 survivors, joined)
    return json.loads(won)


def _wait_closed(store: dist.Store, gen: int, wid: str, deadline_s: float, want: int, minimum: int,
                 expected: Optional[set[str]], order_key, handled_joins: int = 0,
                 gone: Optional[_Gone] = None) -> Member:
    """Wait until generation ``gen`` closes (closing it ourselves when every expected worker arrived, or at
    the deadline with at least ``minimum``), and return this worker's place in it. Workers that ``gone``
    reports leave ``expected`` as soon as it does (constraint 2)."""
    delay = _POLL_FIRST_S
    start = time.monotonic()
    while True:
        if _exists(store, f"g{gen}/members"):
            closed = _get_json(store, f"g{gen}/members")
            break
        if expected is not None and gone is not None:
            expected = expected - (gone() - {wid})
        arrived = _arrivals(store, gen)
        wids = {r["wid"] for r in arrived}
        late = time.monotonic() - start > deadline_s
        # Generation 0 (expected None): the launcher's workers, less those that already ended.
        complete = (expected is not None and expected <= wids) or \
            (expected is None and len(wids) + int(store.add(_key("ended"), 0)) >= want)
        if (complete or late) and len(wids) >= minimum:
            members = sorted(arrived, key=order_key)
            if expected is not None:
                members = [r for r in members if r["wid"] in expected or r["prev"] < 0]
            members = _by_host(members)
            survivors = sum(1 for r in members if r["prev"] >= 0)
            closed = _close(store, gen, members, survivors, handled_joins)
            break
        if late and time.monotonic() - start > 3 * deadline_s:
            raise ElasticMembershipError(
                f"shoal: generation {gen} of the elastic job did not form within {3 * deadline_s:.0f} s: "
                f"{len(wids)} worker(s) arrived, at least {minimum} needed. HINT: check that the other workers "
                "are alive and reach the job's store; lower --min-np.")
        time.sleep(delay)
        delay = min(2 * delay, _POLL_MAX_S)
    workers = closed["workers"]
    if wid not in workers:
        raise ElasticMembershipError(
            f"shoal: worker {wid} is not in generation {gen} of the elastic job: it arrived after the "
            f"generation closed ({len(workers)} workers), most likely because it was hung or slow for longer "
            "than elastic_timeout_s. It leaves the job. HINT: raise SHOAL_ELASTIC_TIMEOUT_S if such pauses "
            "are expected.")
    return Member(gen, workers.index(wid), len(workers), tuple(workers), int(closed["survivors"]),
                  tuple(closed.get("records", ())))


def enter(store: dist.Store, cfg: ShoalConfig) -> Member:
    """Join the job (``init()`` of an elastic worker): the first generation when the job starts
    (constraint 4), else the next one, as a joiner (the running workers take it in at their next commit).

    Raises:
        ElasticMembershipError: no generation took this worker in within the bounds.
    """
    wid = worker_id()
    current = current_generation(store)
    want = env.elastic_worker().np
    minimum = env.elastic_worker().min_np or want or 1
    record = _record(wid, -1, -1, {"steps": 0, "dirty": False})
    if current < 0 and not _exists(store, "g0/members"):
        _arrive(store, 0, record)
        try:
            return _wait_closed(store, 0, wid, max(cfg.elastic_timeout_s, FIRST_GENERATION_WAIT_S), want, minimum,
                                None, order_key=lambda r: (r["launcher_id"], r["wid"]))
        except ElasticMembershipError:
            current = current_generation(store)  # generation 0 formed without us: join the next
    gen = max(current, 0) + 1
    while True:
        # Ask to be taken in (counted by the running workers at their commits), then arrive in the next
        # generation and wait for them to close it, however long that is: constraint 2's bound is about
        # survivors waiting for each other, not about when a commit comes.
        k = int(store.add(_key("joins"), 1))
        store.set(_key(f"join/{k}"), json.dumps(record))
        _arrive(store, gen, record)
        member = _wait_for_survivors(store, gen, wid)
        if member is not None:
            return member
        gen = max(current_generation(store), gen) + 1  # closed without us: ask again for the next


def _wait_for_survivors(store: dist.Store, gen: int, wid: str) -> Optional[Member]:
    """A joiner's wait for generation ``gen`` to be closed by the running workers; None when it closed
    without this joiner (it then arrives in the next)."""
    delay = _POLL_FIRST_S
    while not _exists(store, f"g{gen}/members"):
        time.sleep(delay)
        delay = min(2 * delay, _POLL_MAX_S * 4)
    closed = _get_json(store, f"g{gen}/members")
    workers = closed["workers"]
    if wid not in workers:
        return None
    return Member(gen, workers.index(wid), len(workers), tuple(workers), int(closed["survivors"]),
                  tuple(closed.get("records", ())))


def agree(store: dist.Store, previous: Member, info: dict, cfg: ShoalConfig) -> Member:
    """A survivor's side of the next generation (constraints 1-3, 5): arrive, wait for the others it
    expects, close or adopt the closed list.

    Args:
        store: the job's store.
        previous: this worker's place in the generation that just ended.
        info: what every member must know of this one (``steps``, ``dirty``).
        cfg: the runtime config (``elastic_timeout_s``).

    Raises:
        ElasticMembershipError: this worker is not in the next generation, or too few workers are left.
    """
    wid = worker_id()
    gen = previous.generation + 1
    store.set(_key(f"g{gen}/survivor"), wid)  # the others' long waits see it (shoal.core.stall)
    _arrive(store, gen, _record(wid, previous.generation, previous.rank, info))
    leaving = {w for w in previous.workers if _exists(store, f"leave/{w}")}
    old = {r["wid"]: r for r in previous.records} if previous.records else {}
    dead = {w for w, r in old.items() if _is_dead(r.get("host", ""), int(r.get("pid", -1)))}
    ids = {w: int(r.get("launcher_id", -1)) for w, r in old.items()}
    joins = int(store.add(_key("joins"), 0))
    admitted = int(store.add(_key("admitted"), 0))
    joiners = set()
    for k in range(admitted + 1, joins + 1):  # the joiners that asked and were not taken in yet
        if store.check([_key(f"join/{k}")]):
            record = json.loads(store.get(_key(f"join/{k}")).decode())
            joiners.add(record["wid"])
            ids[record["wid"]] = int(record.get("launcher_id", -1))
    gone = _Gone(store, ids)
    expected = ((set(previous.workers) | joiners) - leaving - dead - gone()) | {wid}
    minimum = env.elastic_worker().min_np or 1
    position = {w: i for i, w in enumerate(previous.workers)}

    def order(r: dict) -> tuple:
        # Constraint 3: survivors in their old rank order, then joiners in arrival order.
        return (0, position.get(r["wid"], len(position)), "") if r["prev"] >= 0 else (1, 0, r["wid"])

    member = _wait_closed(store, gen, wid, cfg.elastic_timeout_s, len(expected), minimum, expected, order,
                          handled_joins=joins, gone=gone)
    if member.size < minimum:
        raise ElasticMembershipError(
            f"shoal: generation {gen} of the elastic job has {member.size} workers, below the minimum of "
            f"{minimum} (--min-np). HINT: start more workers, or lower --min-np.")
    return member
