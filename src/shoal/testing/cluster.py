"""An emulated multi-node cluster on one machine: network namespaces as nodes, ``tc`` as the wire.

``EmulatedCluster`` creates K network namespaces ("nodes") joined through a switch by veth links
shaped with ``tc``, starts G ranks in each node with the launcher variables torch.distributed and
Shoal read (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ...), runs a command and removes
everything afterwards. Tests use it small (correctness across "nodes"); benchmarks use it to put a
1 Gbit/s wire between ranks. It needs root (``ip netns add``); :func:`check_available` says why not.

Topology of a 2-node run (names carry the run's prefix, e.g. ``shoal-4242-0-``)::

      node ns "...n0"                switch ns "...sw"                  node ns "...n1"
    ranks 0..G-1 -- eth0 <==veth==> p0 --[ bridge br0 ]-- p1 <==veth==> eth0 -- ranks G..2G-1
    10.77.0.1/24   (tbf: rate)    (tbf: rate)        (tbf: rate)    (tbf: rate)   10.77.0.2/24

Design constraints:

1. The root namespace's networking is never touched. The bridge lives in its own namespace, and each
   veth pair is created inside it with its far end placed straight into the node's namespace, so no
   interface or address ever exists in the root namespace (and interface names need only be unique
   per namespace: every node's interface is ``eth0``). The subnet is private to the run's own
   namespaces, so parallel runs may reuse it.
2. Everything the run creates is named ``shoal-<pid>-<run>-...`` so that parallel runs never collide,
   and :func:`cleanup_stale` can remove what a killed run left behind (its pid is gone).
3. Removal is certain: a try/finally around set-up and run; SIGTERM and SIGHUP become ``SystemExit``
   while the cluster is open (Ctrl-C is ``KeyboardInterrupt`` already); every rank starts in its own
   session and is killed as a process group; anything still inside a namespace is killed before the
   namespace is deleted (deleting a node namespace destroys its veth pair with it).
4. The wire is a token bucket (``tbf``) on both ends of each node's link: the node's egress (its
   upload) and the switch port's egress towards it (its download), so a node has ``rate`` each way,
   full duplex, like a NIC, also with more than two nodes. Measured here with a Python TCP stream
   (``--measure``): tbf at 1gbit gives 957 Mbit/s of goodput, the exact 1 Gbit/s on the wire for
   1500-byte frames (1448 payload bytes per 1514); htb gives 950; unshaped veth 22 Gbit/s. A queue
   of 10 ms of data (``latency``) keeps the measured rate unchanged (2 ms: same; 50 ms: same) without
   long standing queues. Burst: 1 ms of data, at least 64 KiB (32 KiB..1 MiB all measured within 1%).
5. Delay needs ``netem`` (tbf cannot delay); this machine's kernel has no sch_netem, so
   ``delay_ms`` raises a clear error there instead of silently running undelayed.
6. Ranks inside a node talk over that node's own address (``GLOO_SOCKET_IFNAME=eth0``); the kernel
   routes traffic to a local address through the namespace's loopback, which is not shaped.
7. Each node gets its own UTS namespace and host name (``<prefix>n<i>``), so Shoal's host-based node
   detection sees real nodes without any override. Where ``unshare --uts`` is not allowed, the ranks
   get ``SHOAL_LOCAL_SIZE=<ranks_per_node>`` instead (same layout, by rank blocks). The node names
   resolve inside the run through ``/etc/netns/<ns>/hosts`` (``ip netns exec`` mounts it over
   ``/etc/hosts``); without it every rank's c10d warns that its peer's host name "cannot be retrieved".

What lives elsewhere: in-process multi-rank tests without a wire (:func:`shoal.testing.run_ranks`),
launching real jobs (``shoal run``).

CLI::

    python -m shoal.testing.cluster --nodes 2 --ranks-per-node 2 --rate 1gbit -- python script.py
    python -m shoal.testing.cluster --nodes 2 --rate 1gbit --measure 100   # TCP throughput, MB
    python -m shoal.testing.cluster --cleanup                               # remove stale runs
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

__all__ = [
    "run_in_cluster",
    "EmulatedCluster",
    "ClusterRun",
    "RankOutcome",
    "ClusterError",
    "check_available",
    "cleanup_stale",
    "list_namespaces",
    "parse_rate",
    "main",
]

log = logging.getLogger(__name__)

_PREFIX = "shoal-"
_NAME_RE = re.compile(r"^shoal-(\d+)-(\d+)-")
_RUN_IDS = itertools.count()
_IFNAME = "eth0"
_MASTER_PORT = 29500
_ETC_NETNS = "/etc/netns"
#: See constraint 4: queue of 10 ms, burst of 1 ms of data and at least 64 KiB.
_TBF_LATENCY = "10ms"
_MIN_BURST_BYTES = 64 * 1024
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


class ClusterError(RuntimeError):
    """The emulated cluster cannot be set up (permissions, missing kernel features, bad arguments)."""


@dataclass
class RankOutcome:
    """How one rank ended."""

    rank: int
    node: int
    local_rank: int
    #: The exit status (negative: killed by that signal), None if it never started.
    returncode: Optional[int]
    #: stdout and stderr together (empty for the ``console_rank``, which writes to the console).
    output: str = ""
    #: True when the cluster killed it (timeout, or another rank failed first).
    killed: bool = False


@dataclass
class ClusterRun:
    """The result of :meth:`EmulatedCluster.run`."""

    results: list[RankOutcome]
    timed_out: bool
    elapsed_s: float
    argv: list[str] = field(default_factory=list)

    @property
    def returncodes(self) -> list[Optional[int]]:
        return [r.returncode for r in self.results]

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(r.returncode == 0 for r in self.results)

    def describe(self, tail_lines: int = 30) -> str:
        """Every rank's status and the tail of the failed ranks' output, root cause first."""
        shown = shlex.join(self.argv)
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        head = (f"cluster run of `{shown}`: "
                + ("deadline passed" if self.timed_out else "ok" if self.ok else "failed")
                + f" after {self.elapsed_s:.1f} s")
        # Root cause first: ranks that failed on their own before the ones we killed.
        order = sorted(self.results, key=lambda r: (r.returncode == 0, r.killed, r.rank))
        parts = [head]
        for r in order:
            how = ("ok" if r.returncode == 0 else "killed by the cluster" if r.killed
                   else f"exit {r.returncode}")
            parts.append(f"  rank {r.rank} (node {r.node}, local rank {r.local_rank}): {how}")
            if r.returncode != 0 and r.output.strip() and tail_lines > 0:
                tail = r.output.rstrip().splitlines()[-tail_lines:]
                parts.extend("    | " + line for line in tail)
        return "\n".join(parts)

    def check(self) -> "ClusterRun":
        """Raise ``AssertionError`` with :meth:`describe` unless every rank exited 0."""
        if not self.ok:
            raise AssertionError(self.describe())
        return self


def parse_rate(rate: str) -> float:
    """``"1gbit"`` -> ``1e9`` bits per second (tc's units: bit, kbit, mbit, gbit, bps = bytes/s, ...).

    Raises:
        ValueError: the rate does not parse.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", rate)
    if not m or m.group(2).lower() not in _RATE_UNITS:
        raise ValueError(f"shoal.testing.cluster: cannot parse rate {rate!r}. HINT: use tc's spelling, "
                         "e.g. 1gbit, 100mbit, 10gbit.")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _cmd(["ip", *args], check=check)


def _cmd(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise ClusterError(f"shoal.testing.cluster: `{shlex.join(argv)}` failed: "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def list_namespaces(prefix: str = _PREFIX) -> list[str]:
    """Names of the network namespaces whose name starts with ``prefix``."""
    if shutil.which("ip") is None:
        return []
    out = _ip("netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


_AVAILABLE: Optional[str] = None


def check_available() -> Optional[str]:
    """None when this process may create namespaces and tbf qdiscs, else the reason it may not."""
    global _AVAILABLE
    if _AVAILABLE is not None:
        return _AVAILABLE or None
    reason = ""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        reason = "the `ip` and `tc` commands (iproute2) are not installed"
    else:
        probe = f"{_PREFIX}{os.getpid()}-{next(_RUN_IDS)}-probe"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            reason = f"`ip netns add` is not permitted here ({made.stderr.strip()}); it needs root"
        else:
            try:
                tbf = _cmd(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "tbf",
                            "rate", "1gbit", "burst", "64kb", "latency", _TBF_LATENCY], check=False)
                if tbf.returncode != 0:
                    reason = f"the kernel refuses a tbf qdisc ({tbf.stderr.strip()})"
            finally:
                _ip("netns", "del", probe, check=False)
    _AVAILABLE = reason
    return reason or None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(ns: str) -> None:
    """SIGKILL whatever still runs inside namespace ``ns``."""
    out = _ip("netns", "pids", ns, check=False).stdout
    for token in out.split():
        if token.isdigit() and int(token) != os.getpid():
            try:
                os.kill(int(token), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _delete_namespaces(names: Sequence[str]) -> list[str]:
    """Kill what runs inside and delete; returns the names that could not be deleted."""
    for ns in names:
        _kill_inside(ns)
    left = []
    for ns in names:
        shutil.rmtree(os.path.join(_ETC_NETNS, ns), ignore_errors=True)
        if _ip("netns", "del", ns, check=False).returncode != 0 and ns in list_namespaces(ns):
            left.append(ns)
    return left


def cleanup_stale() -> list[str]:
    """Delete the namespaces of cluster runs whose process is gone (killed with SIGKILL, say).

    Runs of live processes (parallel tests, another benchmark) are left alone.

    Returns:
        The names deleted.
    """
    stale = []
    for ns in list_namespaces():
        m = _NAME_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            stale.append(ns)
    left = _delete_namespaces(stale)
    try:
        for name in os.listdir(_ETC_NETNS):  # hosts files of namespaces already gone
            m = _NAME_RE.match(name)
            if m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(os.path.join(_ETC_NETNS, name), ignore_errors=True)
    except OSError:
        pass
    if stale:
        log.info("shoal.testing.cluster: removed %d stale namespaces (%s)", len(stale) - len(left),
                 ", ".join(stale))
    return [ns for ns in stale if ns not in left]


class _Interrupted(SystemExit):
    """SIGTERM/SIGHUP while a cluster is open: unwinds through the finally blocks."""


class EmulatedCluster:
    """K nodes of G ranks on one machine, joined by a shaped link; a context manager.

    Args:
        nodes: number of nodes (network namespaces), 1..250.
        ranks_per_node: ranks started in each node.
        rate: each node's link rate, each way, in tc's spelling (``"1gbit"``, ``"100mbit"``);
            ``None`` leaves the link unshaped.
        delay_ms: one-way delay added on each node's egress (node-to-node RTT = 2 x delay_ms);
            needs the kernel's netem (constraint 5).
        hostnames: give each node its own host name (UTS namespace); if False, or not allowed, ranks
            get ``SHOAL_LOCAL_SIZE`` instead.

    Raises:
        ClusterError: on entering, when namespaces or qdiscs cannot be created (the message says why).

    Example:
        >>> with EmulatedCluster(nodes=2, ranks_per_node=2, rate="1gbit") as cluster:
        ...     run = cluster.run([sys.executable, "train.py"], timeout_s=120)
        >>> run.check().returncodes
        [0, 0, 0, 0]
    """

    def __init__(self, nodes: int = 2, ranks_per_node: int = 1, rate: Optional[str] = "1gbit",
                 delay_ms: Optional[float] = None, hostnames: bool = True):
        if not 1 <= nodes <= 250:
            raise ValueError(f"shoal.testing.cluster: nodes must be in 1..250, got {nodes}")
        if ranks_per_node < 1:
            raise ValueError(f"shoal.testing.cluster: ranks_per_node must be >= 1, got {ranks_per_node}")
        if delay_ms is not None and delay_ms < 0:
            raise ValueError(f"shoal.testing.cluster: delay_ms must be >= 0, got {delay_ms}")
        self.nodes = nodes
        self.ranks_per_node = ranks_per_node
        self.rate = rate
        self.rate_bps = parse_rate(rate) if rate else None
        self.delay_ms = delay_ms or None
        self.prefix = f"{_PREFIX}{os.getpid()}-{next(_RUN_IDS)}-"
        self.switch_ns = self.prefix + "sw"
        self.node_ns = [f"{self.prefix}n{i}" for i in range(nodes)]
        self.addresses = [f"10.77.0.{i + 1}" for i in range(nodes)]
        self.interface = _IFNAME
        self.master_port = _MASTER_PORT
        self._want_hostnames = hostnames
        self.hostnames_enabled = False
        self._created: list[str] = []
        self._old_handlers: dict[int, object] = {}
        self._open = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def describe_link(self) -> str:
        """E.g. ``"2 nodes x 2 ranks, 1gbit each way (tbf), no delay"``."""
        wire = f"{self.rate} each way (tbf)" if self.rate else "unshaped"
        delay = f"{self.delay_ms:g} ms one-way delay" if self.delay_ms else "no delay"
        return f"{self.nodes} nodes x {self.ranks_per_node} ranks, {wire}, {delay}"

    # -- set-up and removal ------------------------------------------------------------------

    def __enter__(self) -> "EmulatedCluster":
        self._install_signal_handlers()
        try:
            reason = check_available()
            if reason:
                raise ClusterError(f"shoal.testing.cluster: cannot emulate nodes: {reason}. HINT: run "
                                   "as root (or with CAP_NET_ADMIN and CAP_SYS_ADMIN).")
            cleanup_stale()
            self._create()
        except BaseException:
            self.close()
            raise
        self._open = True
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def _raise(signum, _frame):
            raise _Interrupted(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, _raise)
            except (ValueError, OSError):
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(sig, handler)
        self._old_handlers.clear()

    def _add_ns(self, name: str) -> None:
        # Recorded before it exists, so that a failure half-way still removes it.
        self._created.append(name)
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _shape(self, ns: str, dev: str, delay: bool) -> None:
        if self.rate_bps is None and not (delay and self.delay_ms):
            return
        tbf = []
        if self.rate_bps is not None:
            burst = max(_MIN_BURST_BYTES, int(self.rate_bps / 8 / 1000))
            tbf = ["tbf", "rate", f"{int(self.rate_bps)}bit", "burst", str(burst), "latency", _TBF_LATENCY]
        if delay and self.delay_ms:
            # netem delays, its child tbf shapes (the order netem's own documentation gives).
            limit = ["limit", "100000"]
            made = _cmd(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
                         "delay", f"{self.delay_ms}ms", *limit], check=False)
            if made.returncode != 0:
                raise ClusterError(
                    f"shoal.testing.cluster: cannot add a delay of {self.delay_ms} ms: {made.stderr.strip()} "
                    "HINT: delay needs the kernel's netem qdisc (CONFIG_NET_SCH_NETEM, `modprobe sch_netem`); "
                    "run without delay_ms / --delay-ms on this machine.")
            if tbf:
                _cmd(["tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *tbf])
        else:
            _cmd(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf])

    def _create(self) -> None:
        sw = self.switch_ns
        self._add_ns(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for i, ns in enumerate(self.node_ns):
            self._add_ns(ns)
            port = f"p{i}"
            # Both ends are born in namespaces of ours (constraint 1).
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", self.interface, "netns", ns)
            _ip("-n", sw, "link", "set", port, "master", "br0")
            _ip("-n", sw, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", self.interface)
            _ip("-n", ns, "link", "set", self.interface, "up")
            self._shape(ns, self.interface, delay=True)
            self._shape(sw, port, delay=False)
        self._write_hosts()
        if self._want_hostnames:
            self.hostnames_enabled = shutil.which("unshare") is not None and _cmd(
                ["ip", "netns", "exec", self.node_ns[0], "unshare", "--uts", "--", "hostname",
                 self.prefix + "n0"], check=False).returncode == 0
            if not self.hostnames_enabled:
                log.info("shoal.testing.cluster: no UTS namespaces here; ranks get SHOAL_LOCAL_SIZE=%d",
                         self.ranks_per_node)
        log.debug("shoal.testing.cluster: up: %s (%s)", self.prefix, self.describe_link())

    def _write_hosts(self) -> None:
        """``/etc/hosts`` of every node: localhost and every node's name (constraint 7)."""
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        for i, addr in enumerate(self.addresses):
            # c10d listens on a dual-stack socket and looks its peers up as ::ffff:a.b.c.d.
            lines += [f"{addr} {self.prefix}n{i}", f"::ffff:{addr} {self.prefix}n{i}"]
        for ns in self.node_ns:
            try:
                os.makedirs(os.path.join(_ETC_NETNS, ns), exist_ok=True)
                with open(os.path.join(_ETC_NETNS, ns, "hosts"), "w") as f:
                    f.write("\n".join(lines) + "\n")
            except OSError as exc:  # cosmetic only: c10d then warns about host names
                log.debug("shoal.testing.cluster: no hosts file for %s: %s", ns, exc)

    def close(self) -> None:
        """Kill everything inside the namespaces and delete them. Safe to call twice."""
        self._open = False
        if self._old_handlers:
            # A second Ctrl-C or SIGTERM must not cut the removal short (it takes well under a second).
            for sig in (signal.SIGINT, *self._old_handlers):
                self._old_handlers.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, signal.SIG_IGN)
        try:
            # Nodes first: deleting a node namespace destroys its veth pair; then the switch.
            created = [ns for ns in self._created if ns != self.switch_ns] + \
                      [ns for ns in self._created if ns == self.switch_ns]
            left = _delete_namespaces(created)
            self._created = left
            if left:
                log.warning("shoal.testing.cluster: could not delete %s; `python -m shoal.testing.cluster "
                            "--cleanup` removes them once this process is gone", ", ".join(left))
        finally:
            self._restore_signal_handlers()

    # -- running ranks ---------------------------------------------------------------------------

    def rank_env(self, rank: int) -> dict[str, str]:
        """The variables rank ``rank`` is started with."""
        node, local = divmod(rank, self.ranks_per_node)
        env = {
            "RANK": str(rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(self.ranks_per_node),
            "GROUP_RANK": str(node), "NODE_RANK": str(node),
            "MASTER_ADDR": self.addresses[0], "MASTER_PORT": str(self.master_port),
            "GLOO_SOCKET_IFNAME": self.interface,
            "SHOAL_CLUSTER_LINK": self.describe_link(),
        }
        if not self.hostnames_enabled:
            env["SHOAL_LOCAL_SIZE"] = str(self.ranks_per_node)
        return env

    def rank_argv(self, rank: int, cmd_argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> list[str]:
        """The full command line that starts rank ``rank`` inside its node."""
        node = rank // self.ranks_per_node
        variables = {**self.rank_env(rank), **(env or {})}
        # `env` adds to the inherited environment; SHOAL_INIT_FILE (set inside run_ranks) would
        # otherwise win over MASTER_ADDR in the rank's launcher detection.
        argv = ["env", "-u", "SHOAL_INIT_FILE", *(f"{k}={v}" for k, v in variables.items()), *cmd_argv]
        if self.hostnames_enabled:
            argv = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"',
                    f"{self.prefix}n{node}", *argv]
        return ["ip", "netns", "exec", self.node_ns[node], *argv]

    def run(self, cmd_argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
            timeout_s: float = 300.0, grace_s: float = 5.0, echo: bool = False,
            console_rank: Optional[int] = None) -> ClusterRun:
        """Start every rank, wait for all of them, return their exit codes and output.

        Args:
            cmd_argv: the command each rank runs, e.g. ``[sys.executable, "train.py"]``.
            env: extra variables for every rank (on top of the inherited environment and the
                launcher variables of :meth:`rank_env`).
            timeout_s: deadline for the whole run; past it every rank is killed.
            grace_s: after the first rank fails, how long the others may take to exit on their own.
            echo: print every output line as it comes, prefixed with ``[rank r]``.
            console_rank: this rank writes straight to the console (a terminal keeps its colours
                and progress bars); its output is not captured.

        Returns:
            A :class:`ClusterRun`; call ``.check()`` to raise on failure.
        """
        if not self._open:
            raise ClusterError("shoal.testing.cluster: run() needs an open cluster. HINT: use "
                               "`with EmulatedCluster(...) as cluster: cluster.run(...)`.")
        n = self.world_size
        procs: list[Optional[subprocess.Popen]] = [None] * n
        outputs: list[list[str]] = [[] for _ in range(n)]
        readers: list[threading.Thread] = []
        killed = [False] * n
        start = time.monotonic()
        timed_out = False
        try:
            for r in range(n):
                capture = r != console_rank
                procs[r] = subprocess.Popen(
                    self.rank_argv(r, cmd_argv, env), start_new_session=True, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE if capture else None,
                    stderr=subprocess.STDOUT if capture else None)
                if capture:
                    t = threading.Thread(target=_read_lines, args=(procs[r].stdout, outputs[r], r, echo),
                                         daemon=True, name=f"cluster-rank{r}-reader")
                    t.start()
                    readers.append(t)
            first_failure: Optional[float] = None
            while True:
                now = time.monotonic()
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes):
                    break
                if first_failure is None and any(c not in (None, 0) for c in codes):
                    first_failure = now
                if first_failure is not None and now - first_failure > grace_s:
                    break
                if now - start > timeout_s:
                    timed_out = True
                    break
                time.sleep(0.02)
        finally:
            for r, p in enumerate(procs):
                if p is not None and p.poll() is None:
                    killed[r] = True
            _kill_groups([p for p in procs if p is not None])
            for t in readers:
                t.join(2)
        results = [RankOutcome(r, r // self.ranks_per_node, r % self.ranks_per_node,
                               p.returncode if p is not None else None, "".join(outputs[r]), killed[r])
                   for r, p in enumerate(procs)]
        return ClusterRun(results, timed_out, time.monotonic() - start, list(cmd_argv))


def _read_lines(stream, sink: list[str], rank: int, echo: bool) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        sink.append(line)
        if echo:
            sys.stdout.write(f"[rank {rank}] {line}")
            sys.stdout.flush()
    stream.close()


def _kill_groups(procs: Sequence[subprocess.Popen], term_grace_s: float = 2.0) -> None:
    """SIGTERM every live rank's process group, SIGKILL what is left after ``term_grace_s``."""
    live = [p for p in procs if p.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in live:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + term_grace_s
        while live and time.monotonic() < deadline:
            live = [p for p in live if p.poll() is None]
            time.sleep(0.02)
        if not live:
            break
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            log.warning("shoal.testing.cluster: rank pid %d did not exit after SIGKILL", p.pid)


# -- throughput probe (`--measure`): a plain TCP stream from node 1 to node 0 -------------------

def _probe(nbytes: int) -> int:
    import socket  # noqa: PLC0415

    from shoal.core.env import get_env  # noqa: PLC0415

    rank = int(get_env("RANK", "0"))
    per_node = int(get_env("LOCAL_WORLD_SIZE", "1"))
    addr, port = get_env("MASTER_ADDR"), int(get_env("MASTER_PORT", str(_MASTER_PORT))) + 1
    if rank == 0:
        with socket.socket() as srv:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((addr, port))
            srv.listen(1)
            srv.settimeout(30)
            conn, _ = srv.accept()
            buf, got, t0 = bytearray(1 << 20), 0, None
            with conn:
                while n := conn.recv_into(buf):
                    t0 = t0 or time.perf_counter()
                    got += n
            dt = time.perf_counter() - (t0 or time.perf_counter())
            print(f"received {got / 1e6:.1f} MB from node 1 in {dt * 1e3:.0f} ms: "
                  f"{got * 8 / max(dt, 1e-9) / 1e6:.0f} Mbit/s of TCP payload")
    elif rank == per_node:
        for _ in range(100):
            try:
                conn = socket.create_connection((addr, port))
                break
            except OSError:
                time.sleep(0.1)
        else:
            print("could not connect to node 0", file=sys.stderr)
            return 1
        chunk, sent = b"\0" * (1 << 20), 0
        with conn:
            while sent < nbytes:
                conn.sendall(chunk)
                sent += len(chunk)
    return 0


def run_in_cluster(cmd: Sequence[str], *, nodes: int, ranks_per_node: int, rate: Optional[str],
                   delay_ms: Optional[float] = None, timeout_s: float = 3600.0,
                   console_rank: Optional[int] = 0) -> int:
    """Run ``cmd`` on an emulated cluster and return an exit code: 0 ok, 1 a rank failed (its report is
    printed), 2 the cluster could not be built (the reason is printed). For scripts that re-launch
    themselves inside a cluster (the benchmarks' ``--link``).

    Example:
        >>> sys.exit(run_in_cluster([sys.executable, __file__, *argv], nodes=2, ranks_per_node=1, rate="1gbit"))
    """
    try:
        with EmulatedCluster(nodes=nodes, ranks_per_node=ranks_per_node, rate=rate,
                             delay_ms=delay_ms) as cluster:
            run = cluster.run(list(cmd), timeout_s=timeout_s, console_rank=console_rank)
    except ClusterError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not run.ok:
        print(run.describe(), file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m shoal.testing.cluster [options] -- cmd args``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_probe"]:
        return _probe(int(argv[1]))
    cmd: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(
        prog="python -m shoal.testing.cluster",
        description="Run a command on K emulated nodes (network namespaces) x G ranks, joined by a "
                    "tc-shaped link; everything is removed afterwards.")
    ap.add_argument("--nodes", type=int, default=2, help="number of nodes (default 2)")
    ap.add_argument("--ranks-per-node", type=int, default=1, help="ranks in each node (default 1)")
    ap.add_argument("--rate", default="1gbit", help="link rate each way, tc units; 'none' = unshaped")
    ap.add_argument("--delay-ms", type=float, default=None, help="one-way delay per node (needs netem)")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="deadline for the run")
    ap.add_argument("--measure", type=float, metavar="MB", default=None,
                    help="instead of a command: stream MB of TCP from node 1 to node 0 and print the rate")
    ap.add_argument("--cleanup", action="store_true", help="remove namespaces left by dead runs and exit")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.cleanup:
        removed = cleanup_stale()
        print(f"removed {len(removed)} stale namespaces" + (f": {', '.join(removed)}" if removed else ""))
        return 0
    if args.measure is not None:
        if args.nodes < 2:
            ap.error("--measure needs --nodes >= 2")
        cmd = [sys.executable, "-m", "shoal.testing.cluster", "_probe", str(int(args.measure * 1e6))]
    if not cmd:
        ap.error("give the command after `--`, e.g. -- python train.py")
    rate = None if args.rate.lower() in ("none", "0", "") else args.rate
    try:
        with EmulatedCluster(args.nodes, args.ranks_per_node, rate, args.delay_ms) as cluster:
            print(f"cluster: {cluster.describe_link()}; namespaces {cluster.prefix}*", file=sys.stderr)
            run = cluster.run(cmd, timeout_s=args.timeout_s, echo=True)
    except ClusterError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the cluster was removed", file=sys.stderr)
        return 130
    except _Interrupted as exc:
        print("terminated; the cluster was removed", file=sys.stderr)
        return int(exc.code)
    if run.timed_out:
        print(run.describe(), file=sys.stderr)
        return 124
    if not run.ok:
        print(run.describe(tail_lines=0), file=sys.stderr)
        code = next(c for c in run.returncodes if c != 0)
        return 128 - code if code is not None and code < 0 else code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
