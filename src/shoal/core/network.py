"""Network facts and choices: interfaces, RDMA ports, and the gloo/NCCL variables set at ``init``.

This module owns three things:

1. Reading what the host has: network interfaces (``/sys/class/net``; addresses by ``ioctl`` and
   ``/proc/net/if_inet6``, or ``ip -j addr`` for the report) and RDMA ports
   (``/sys/class/infiniband/<dev>/ports/<n>/{state,link_layer,rate,gids,gid_attrs}``). Every reader
   takes its root as a parameter, so tests feed it fake trees.
2. Choosing, in :func:`plan_network`, a pure function of those facts: the socket interface for gloo
   and NCCL, and NCCL's RDMA variables (HCA list, GID index, IB on/off).
3. Applying the choice: :func:`configure`, called by :func:`shoal.core.runtime.init` before the
   process group exists, through :func:`shoal.core.env.set_default_env`.

What lives elsewhere: reading ``os.environ`` (:mod:`shoal.core.env`), the human report
(:mod:`shoal.runner.doctor`), the transport itself (NCCL and gloo).

Design constraints:

1. Never break a local run. On one host (a world of one, every rank local, or a loopback
   rendezvous) nothing is forced unless the user named an interface: gloo on 127.0.0.1 and NCCL's
   P2P/shared-memory paths need no help, and a forced interface can only get in their way.
2. A user's variable always wins and is never overridden silently (``set_default_env`` logs it).
3. Cheap: ``configure`` runs at every ``init``, tests included. No subprocess ever; no sysfs read
   and no DNS lookup unless ranks may live on other hosts (measured: tests/unit/test_network.py).
4. Follow NCCL's own documentation, "Environment Variables" chapter of the NCCL user guide
   (https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html), not folklore; each choice
   below names the entry it follows. Where NCCL already decides well (GPUDirect level, which
   ports are usable) Shoal leaves it alone.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .config import ShoalConfig
from .env import WorldInfo, get_env, set_default_env

__all__ = [
    "Interface",
    "Gid",
    "RdmaPort",
    "NetworkPlan",
    "read_interfaces",
    "read_addresses",
    "read_addresses_ip_command",
    "parse_ip_addr_json",
    "read_rdma_ports",
    "read_gpudirect_module",
    "rank_interfaces",
    "expected_backend",
    "plan_network",
    "plan_for_this_host",
    "configure",
]

log = logging.getLogger(__name__)

_SYS_ROOT = "/sys"
_PROC_ROOT = "/proc"

# Names of interfaces that carry container, VM or tunnel traffic and are not the path between
# training hosts. NCCL's own default skips ``lo`` and ``docker*`` (env docs, note under
# NCCL_SOCKET_IFNAME); veth pairs and the bridges of other container runtimes are the same case.
_AVOID_PREFIXES = ("docker", "veth", "br-", "virbr", "cni", "flannel", "cali", "cilium", "vxlan",
                   "tunl", "tun", "tap", "lxc", "lxd", "podman", "kube", "weave", "ifb", "dummy",
                   "vnet")
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_ARPHRD_LOOPBACK = 772
_SIOCGIFADDR = 0x8915
# Variables with which a user steers NCCL's own RoCE GID selection (NCCL >= 2.21); when one is
# set, Shoal does not pin NCCL_IB_GID_INDEX over it.
_GID_STEERING = ("NCCL_IB_ADDR_FAMILY", "NCCL_IB_ADDR_RANGE", "NCCL_IB_ROCE_VERSION_NUM")


# --------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------

def _is_loopback_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text.split("%")[0]).is_loopback
    except ValueError:
        return False


def _is_link_local_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text.split("%")[0]).is_link_local
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Interface:
    """One network interface, as the kernel reports it."""

    name: str
    #: IPv4 and IPv6 addresses, without prefix length.
    addresses: tuple[str, ...] = ()
    #: Administratively up and not reported down by the driver.
    is_up: bool = True
    #: The kernel's loopback flag (``lo``).
    is_loopback: bool = False
    #: From ``/sys/class/net/<name>/speed``; None where the driver does not say (virtio, lo).
    speed_mbps: Optional[int] = None
    mtu: Optional[int] = None

    @property
    def resolves_to_loopback(self) -> bool:
        """True for ``lo`` and for any interface whose every address is a loopback address."""
        if self.is_loopback:
            return True
        return bool(self.addresses) and all(_is_loopback_ip(a) for a in self.addresses)

    @property
    def is_container_or_virtual(self) -> bool:
        """A container bridge, veth pair, tunnel or similar (see ``_AVOID_PREFIXES``)."""
        return self.name.startswith(_AVOID_PREFIXES)

    @property
    def routable_addresses(self) -> tuple[str, ...]:
        """Addresses other hosts could reach: not loopback, not link-local."""
        return tuple(a for a in self.addresses if not _is_loopback_ip(a) and not _is_link_local_ip(a))


@dataclass(frozen=True, slots=True)
class Gid:
    """One entry of an RDMA port's GID table."""

    index: int
    #: As sysfs prints it: eight groups of four hex digits.
    value: str
    #: ``"RoCE v2"`` or ``"IB/RoCE v1"`` (``gid_attrs/types``); None where the kernel has none.
    roce_type: Optional[str] = None
    #: The net device the GID belongs to (``gid_attrs/ndevs``, RoCE only).
    netdev: Optional[str] = None

    @property
    def address(self) -> Optional[ipaddress.IPv6Address]:
        try:
            return ipaddress.IPv6Address(self.value.strip())
        except ValueError:
            return None

    @property
    def is_valid(self) -> bool:
        """False for the all-zero entries that fill most of a GID table."""
        addr = self.address
        return addr is not None and int(addr) != 0

    @property
    def ipv4(self) -> Optional[str]:
        """The IPv4 address of an IPv4-mapped GID (``::ffff:a.b.c.d``), else None."""
        addr = self.address
        mapped = addr.ipv4_mapped if addr is not None else None
        return str(mapped) if mapped is not None else None

    @property
    def is_roce_v2(self) -> bool:
        return (self.roce_type or "").strip().lower() == "roce v2"


@dataclass(frozen=True, slots=True)
class RdmaPort:
    """One port of an RDMA device (InfiniBand HCA or RoCE NIC)."""

    device: str
    port: int
    #: ``ACTIVE``, ``DOWN``, ``INIT``, ``ARMED`` (sysfs prints ``4: ACTIVE``; the number is dropped).
    state: str
    #: ``InfiniBand`` or ``Ethernet`` (RoCE).
    link_layer: str
    #: As sysfs prints it, e.g. ``200 Gb/sec (4X HDR)``.
    rate: str = ""
    #: The valid entries of the GID table (all-zero entries are dropped).
    gids: tuple[Gid, ...] = ()

    @property
    def name(self) -> str:
        """``mlx5_0:1``, the spelling NCCL_IB_HCA uses."""
        return f"{self.device}:{self.port}"

    @property
    def is_active(self) -> bool:
        return self.state.upper() == "ACTIVE"

    @property
    def is_roce(self) -> bool:
        return self.link_layer.strip().lower() == "ethernet"

    def roce_v2_ipv4_gid(self) -> Optional[Gid]:
        """The lowest-index RoCE v2 GID that carries an IPv4 address, or None."""
        for gid in self.gids:
            if gid.is_roce_v2 and gid.ipv4 is not None:
                return gid
        return None


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:  # missing file, or EINVAL from sysfs (speed of lo, types of an empty GID)
        return None


def _read_int(path: str, base: int = 10) -> Optional[int]:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _ipv4_by_ioctl(name: str) -> Optional[str]:
    """Primary IPv4 address of ``name`` (SIOCGIFADDR): microseconds, no subprocess."""
    try:
        import fcntl  # noqa: PLC0415 (Unix only)

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        return socket.inet_ntoa(packed[20:24])
    except (OSError, ImportError):
        return None


def _ipv6_from_proc(proc_root: str) -> dict[str, list[str]]:
    """``/proc/net/if_inet6``: one line per address, ``<32 hex> <idx> <plen> <scope> <flags> <name>``."""
    out: dict[str, list[str]] = {}
    text = _read_text(os.path.join(proc_root, "net", "if_inet6")) or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or len(parts[0]) != 32:
            continue
        try:
            addr = ipaddress.IPv6Address(bytes.fromhex(parts[0])).compressed
        except ValueError:
            continue
        out.setdefault(parts[5], []).append(addr)
    return out


def read_addresses(names: Sequence[str], proc_root: str = _PROC_ROOT) -> dict[str, list[str]]:
    """Addresses per interface without a subprocess: IPv4 by ioctl, IPv6 from ``/proc/net``.

    Only the primary IPv4 address of each interface is seen (secondary aliases are not);
    :func:`read_addresses_ip_command` sees them all but costs a subprocess.
    """
    v6 = _ipv6_from_proc(proc_root)
    out: dict[str, list[str]] = {}
    for name in names:
        addrs = []
        v4 = _ipv4_by_ioctl(name)
        if v4:
            addrs.append(v4)
        addrs.extend(v6.get(name, []))
        out[name] = addrs
    return out


def parse_ip_addr_json(text: str) -> Optional[dict[str, list[str]]]:
    """Addresses per interface from the output of ``ip -j addr``; None when it does not parse."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, list):
        return None
    out: dict[str, list[str]] = {}
    for entry in data:
        name = entry.get("ifname") if isinstance(entry, dict) else None
        if name:
            out[name] = [a["local"] for a in entry.get("addr_info", []) if a.get("local")]
    return out


def read_addresses_ip_command(timeout_s: float = 2.0) -> Optional[dict[str, list[str]]]:
    """Every address of every interface from ``ip -j addr``; None when ``ip`` is missing or fails."""
    ip = shutil.which("ip")
    if ip is None:
        return None
    try:
        proc = subprocess.run([ip, "-j", "addr"], capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_ip_addr_json(proc.stdout) if proc.returncode == 0 else None


def read_interfaces(sys_root: str = _SYS_ROOT,
                    addresses: Optional[Mapping[str, Sequence[str]]] = None,
                    proc_root: str = _PROC_ROOT) -> list[Interface]:
    """Every interface under ``<sys_root>/class/net``, with its addresses.

    Args:
        sys_root: the sysfs mount (a fake tree in tests).
        addresses: name -> addresses; default :func:`read_addresses` (ioctl and ``/proc/net``).
        proc_root: the procfs mount, for IPv6 addresses when ``addresses`` is not given.

    Example:
        >>> [i.name for i in read_interfaces("tests/fixtures/sysfs/roce", addresses={})]
        ['ens1f0', 'ens1f1', 'eth0', 'lo']
    """
    net = os.path.join(sys_root, "class", "net")
    names = _listdir(net)
    if addresses is None:
        addresses = read_addresses(names, proc_root)
    out = []
    for name in names:
        d = os.path.join(net, name)
        flags = _read_int(os.path.join(d, "flags"), 16)
        operstate = (_read_text(os.path.join(d, "operstate")) or "unknown").lower()
        kind = _read_int(os.path.join(d, "type"))
        speed = _read_int(os.path.join(d, "speed"))
        admin_up = True if flags is None else bool(flags & _IFF_UP)
        out.append(Interface(
            name=name,
            addresses=tuple(addresses.get(name, ())),
            # "unknown" is what lo and many virtual drivers report while working.
            is_up=admin_up and operstate not in ("down", "lowerlayerdown", "notpresent"),
            is_loopback=bool(flags is not None and flags & _IFF_LOOPBACK) or kind == _ARPHRD_LOOPBACK,
            speed_mbps=speed if speed is not None and speed > 0 else None,
            mtu=_read_int(os.path.join(d, "mtu")),
        ))
    return out


def read_rdma_ports(sys_root: str = _SYS_ROOT) -> list[RdmaPort]:
    """Every port of every device under ``<sys_root>/class/infiniband`` (empty list: no RDMA).

    The sysfs layout is the kernel's ABI (Documentation/ABI/testing/sysfs-class-infiniband):
    ``ports/<n>/{state,link_layer,rate}``, ``ports/<n>/gids/<i>``, and for RoCE
    ``ports/<n>/gid_attrs/{types,ndevs}/<i>``.
    """
    root = os.path.join(sys_root, "class", "infiniband")
    out = []
    for dev in _listdir(root):
        ports_dir = os.path.join(root, dev, "ports")
        for port in sorted(_listdir(ports_dir), key=lambda p: int(p) if p.isdigit() else 0):
            if not port.isdigit():
                continue
            p = os.path.join(ports_dir, port)
            state = _read_text(os.path.join(p, "state")) or "UNKNOWN"
            gids = []
            gid_names = [g for g in _listdir(os.path.join(p, "gids")) if g.isdigit()]
            for g in sorted(gid_names, key=int):
                gid = Gid(int(g), _read_text(os.path.join(p, "gids", g)) or "",
                          _read_text(os.path.join(p, "gid_attrs", "types", g)),
                          _read_text(os.path.join(p, "gid_attrs", "ndevs", g)))
                if gid.is_valid:
                    gids.append(gid)
            out.append(RdmaPort(
                device=dev, port=int(port),
                state=state.split(":", 1)[-1].strip().upper(),
                link_layer=_read_text(os.path.join(p, "link_layer")) or "InfiniBand",
                rate=_read_text(os.path.join(p, "rate")) or "",
                gids=tuple(gids),
            ))
    return out


def read_gpudirect_module(sys_root: str = _SYS_ROOT) -> Optional[str]:
    """The loaded GPUDirect RDMA kernel module (``nvidia_peermem`` or the older ``nv_peer_mem``)."""
    for name in ("nvidia_peermem", "nv_peer_mem"):
        if os.path.isdir(os.path.join(sys_root, "module", name)):
            return name
    return None


def rank_interfaces(interfaces: Sequence[Interface]) -> list[Interface]:
    """Interfaces that could carry traffic between hosts, best first.

    Kept: up, not loopback, with an address other hosts can reach. Order: container and tunnel
    interfaces last (NCCL's default skips them too), then ``ib*`` first (NCCL's default "favors
    interfaces starting with ib", env docs under NCCL_SOCKET_IFNAME), then faster links, then name.
    """
    usable = [i for i in interfaces if i.is_up and not i.resolves_to_loopback and i.routable_addresses]
    return sorted(usable, key=lambda i: (i.is_container_or_virtual, not i.name.startswith("ib"),
                                         -(i.speed_mbps or 0), i.name))


# --------------------------------------------------------------------------------------------
# Choices
# --------------------------------------------------------------------------------------------

@dataclass(slots=True)
class NetworkPlan:
    """What :func:`configure` sets, and why; also what ``shoal doctor`` shows."""

    #: True when ranks may live on other hosts (then an interface is chosen).
    multi_host: bool
    #: Why the run is taken to be single- or multi-host, in words.
    scope: str
    #: The process group's backend this plan was made for.
    backend: str
    #: The socket interface(s) chosen or named by the user; None when nothing is forced.
    interface: Optional[str] = None
    interface_reason: str = ""
    #: How NCCL will move data between hosts: ``InfiniBand``, ``RoCE``, ``sockets`` or ``n/a``.
    transport: str = "n/a"
    #: Variables to set unless the user did: name -> (value, reason), in the order applied.
    env: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: Things that will likely fail or be slow, in plain words, each with a HINT.
    warnings: list[str] = field(default_factory=list)
    #: Things worth knowing that need no action.
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "multi_host": self.multi_host, "scope": self.scope, "backend": self.backend,
            "interface": self.interface, "interface_reason": self.interface_reason,
            "transport": self.transport,
            "env": {k: {"value": v, "reason": r} for k, (v, r) in self.env.items()},
            "warnings": list(self.warnings), "notes": list(self.notes),
        }


def expected_backend(cfg: ShoalConfig) -> tuple[str, str]:
    """The backend ``init`` will pick for ``cfg`` on this process, and why (same rule as init)."""
    if cfg.backend:
        return cfg.backend, "set by you (backend= / SHOAL_BACKEND / --backend)"
    import torch  # noqa: PLC0415 (keeps `import shoal.core.network` light for the report)
    import torch.distributed as dist  # noqa: PLC0415

    if not torch.cuda.is_available():
        return "gloo", "no usable CUDA device: torch.cuda.is_available() is False"
    if not dist.is_nccl_available():
        return "gloo", "this torch build has no NCCL"
    return "nccl", "a CUDA device is present and this torch has NCCL"


def _unspecified(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.strip("[]")).is_unspecified
    except ValueError:
        return False


def _decide_scope(world: WorldInfo, master_ips: Sequence[str],
                  multi_host: Optional[bool]) -> tuple[bool, str]:
    if multi_host is not None:
        return multi_host, ("assumed: ranks on several hosts" if multi_host
                            else "assumed: every rank on this host")
    if world.size <= 1:
        return False, "a world of one process"
    if world.local_size is not None and world.local_size < world.size:
        return True, (f"{world.local_size} of {world.size} ranks on this host "
                      f"(from the {world.source} launcher)")
    if world.local_size is not None:
        return False, f"all {world.size} ranks on this host (from the {world.source} launcher)"
    addr = world.master_addr or ""
    if addr == "localhost" or (master_ips and all(_is_loopback_ip(ip) for ip in master_ips)):
        return False, f"the rendezvous MASTER_ADDR={addr} is loopback, so every rank is on this host"
    return True, (f"{world.size} ranks; the {world.source} launcher does not say how many are on "
                  "this host")


def _owner(interfaces: Sequence[Interface], ip: str) -> Optional[Interface]:
    for i in interfaces:
        if ip in i.addresses:
            return i
    return None


def _choose_interface(interfaces: Sequence[Interface], master_addr: Optional[str],
                      route_source_ip: Optional[str], hostname: str,
                      hostname_ips: Sequence[str]) -> tuple[Optional[str], str]:
    """Pick the interface peers should use to reach this host; (None, why) when there is none."""
    # 1. The interface that carries the route to the rendezvous host: the one path known to work.
    if route_source_ip:
        owner = _owner(interfaces, route_source_ip)
        if owner is not None and not owner.resolves_to_loopback:
            return owner.name, (f"it holds {route_source_ip}, the address this host uses to reach "
                                f"the rendezvous host {master_addr}")
    # 2. What gloo itself would use (the address of this host's name), when that is not loopback.
    for ip in hostname_ips:
        owner = _owner(interfaces, ip)
        if owner is not None and not owner.resolves_to_loopback:
            return owner.name, f"this host's name {hostname} resolves to {ip}, which it holds"
    # 3. The best-looking interface.
    ranked = rank_interfaces(interfaces)
    if ranked:
        best = ranked[0]
        speed = f"{best.speed_mbps} Mb/s" if best.speed_mbps else "speed not reported"
        others = f"; others: {', '.join(i.name for i in ranked[1:])}" if len(ranked) > 1 else ""
        return best.name, (f"best candidate: up, {best.routable_addresses[0]}, {speed}, not loopback "
                           f"or container{others}")
    return None, "no interface is up with an address other hosts can reach"


def _check_user_ifname(var: str, value: str, by_name: Mapping[str, Interface],
                       multi_host: bool, plan: NetworkPlan) -> None:
    """Warn about a user's *_SOCKET_IFNAME that names nothing here, or loopback on several hosts."""
    text = value.strip()
    if text.startswith("^"):
        return  # an exclusion list: anything else may match
    exact = text.startswith("=")
    tokens = [t.strip() for t in text.lstrip("=").split(",") if t.strip()]
    for tok in tokens:
        matches = [i for n, i in by_name.items() if (n == tok if exact or var.startswith("GLOO")
                                                     else n.startswith(tok))]
        if not matches and by_name:
            plan.warnings.append(
                f"your {var}={value} names no interface of this host (it has "
                f"{', '.join(sorted(by_name))}); the backend will fail to start. HINT: unset it, or "
                "name an interface listed by `shoal doctor`.")
        elif multi_host and matches and all(i.resolves_to_loopback for i in matches):
            plan.warnings.append(
                f"your {var}={value} selects a loopback interface while ranks run on several hosts: "
                "peers cannot reach it. HINT: name the interface on the network between the hosts.")


def _plan_rdma(plan: NetworkPlan, ports: Sequence[RdmaPort], environ: Optional[Mapping[str, str]],
               nccl_version: Optional[tuple[int, ...]]) -> None:
    """NCCL's RDMA variables, following the NCCL env docs entry by entry."""
    user_disable = (get_env("NCCL_IB_DISABLE", environ=environ) or "").strip()
    if user_disable == "1":
        plan.transport = "sockets"
        plan.notes.append("you set NCCL_IB_DISABLE=1: NCCL moves data between hosts over TCP sockets"
                          + (" although an RDMA port is active" if any(p.is_active for p in ports)
                             else ""))
        return
    if not ports:
        plan.transport = "sockets"
        plan.notes.append("no RDMA device (/sys/class/infiniband is empty): NCCL uses TCP sockets "
                          "between hosts")
        return
    active = [p for p in ports if p.is_active]
    if not active:
        # NCCL_IB_DISABLE=1 turns off the IB/RoCE transport and NCCL falls back to IP sockets (env
        # docs). With no ACTIVE port NCCL could not use RDMA anyway; saying so keeps it from
        # probing dead devices and makes the fallback visible instead of silent.
        plan.transport = "sockets"
        plan.env["NCCL_IB_DISABLE"] = (
            "1", f"RDMA devices are present but no port is ACTIVE ({_port_states(ports)})")
        plan.warnings.append(
            f"RDMA devices found but no port is ACTIVE ({_port_states(ports)}): NCCL falls back to "
            "TCP sockets, much slower between hosts. HINT: check the cables and the subnet manager "
            "(`ibstat`, `ibv_devinfo`); Shoal uses the port again as soon as it is ACTIVE.")
        return
    ib = [p for p in active if not p.is_roce]
    roce = [p for p in active if p.is_roce]
    excluded: list[str] = [f"{p.name} ({p.state})" for p in ports if not p.is_active]
    if ib:
        # InfiniBand: NCCL picks the GID itself (index 0 / LID routing unless a routable FLID
        # exists); NCCL_IB_GID_INDEX is documented for RoCE only. Prefer IB over RoCE ports when
        # a host has both, so that every host uses the same fabric.
        ours = ib
        excluded += [f"{p.name} (RoCE; InfiniBand preferred)" for p in roce]
    else:
        usable = [p for p in roce if p.roce_v2_ipv4_gid() is not None]
        if usable:
            excluded += [f"{p.name} (no RoCE v2 IPv4 GID)" for p in roce if p not in usable]
        ours = usable or roce
    if excluded:
        # NCCL_IB_HCA: a list of device[:port]; "=" makes the match exact, so mlx5_1 does not also
        # select mlx5_10..mlx5_19 (env docs, NCCL_IB_HCA). Set only when it narrows NCCL's own
        # choice; with every port usable NCCL's default is already right.
        plan.env["NCCL_IB_HCA"] = (
            "=" + ",".join(p.name for p in ours),
            f"use only {', '.join(p.name for p in ours)}; leaves out {', '.join(excluded)}")

    # The ports NCCL will really use: the user's NCCL_IB_HCA wins over ours (set_default_env keeps
    # it), so the transport and the GID index must follow the user's ports, not the ones Shoal
    # would have picked: a GID index read off another port can name a RoCE v1 or empty entry there.
    used = ours
    user_hca = (get_env("NCCL_IB_HCA", environ=environ) or "").strip()
    if user_hca:
        used = [p for p in active if _hca_selects(user_hca, p)]
        if not used:
            plan.transport = "sockets"
            plan.warnings.append(
                f"your NCCL_IB_HCA={user_hca} selects no ACTIVE RDMA port of this host (it has "
                f"{_port_states(ports)}): NCCL finds no IB device and falls back to TCP sockets, much "
                "slower between hosts. HINT: name ACTIVE ports (`shoal doctor` lists them), e.g. "
                f"NCCL_IB_HCA='={','.join(p.name for p in ours)}', or unset it.")
            return
        plan.notes.append(f"your NCCL_IB_HCA={user_hca} selects {', '.join(p.name for p in used)}: "
                          "the transport and GID index follow your ports")
    used_ib = [p for p in used if not p.is_roce]
    used_roce = [p for p in used if p.is_roce]
    plan.transport = ("InfiniBand and RoCE" if used_ib and used_roce
                      else "InfiniBand" if used_ib else "RoCE")
    if not used_roce:
        return
    usable_used = [p for p in used_roce if p.roce_v2_ipv4_gid() is not None]
    lacking = [p for p in used_roce if p.roce_v2_ipv4_gid() is None]
    if lacking:
        netdevs = sorted({g.netdev for p in lacking for g in p.gids if g.netdev}) or ["?"]
        plan.warnings.append(
            f"RoCE port(s) {', '.join(p.name for p in lacking)} have no RoCE v2 GID with an IPv4 "
            "address, so NCCL can only use a RoCE v1 or link-local GID, which does not route "
            f"across subnets. HINT: give their interface ({', '.join(netdevs)}) an IP address, "
            "or check the RoCE mode (`show_gids`)"
            + (f"; or leave them out of your NCCL_IB_HCA={user_hca}." if user_hca else "."))
    _plan_gid_index(plan, usable_used, environ, nccl_version,
                    whose=f" (your NCCL_IB_HCA={user_hca})" if user_hca else "")


def _hca_selects(spec: str, port: RdmaPort) -> bool:
    """Whether NCCL_IB_HCA=``spec`` lets NCCL use ``port`` (env docs, NCCL_IB_HCA).

    ``spec`` is a comma list of ``device[:port]``; a bare device name matches every device whose
    name starts with it (``mlx5`` selects mlx5_0, mlx5_1, ...), a leading ``=`` makes names exact,
    a leading ``^`` turns the list into the ports *not* to use (``^=mlx5_1``).
    """
    text = spec.strip()
    exclude = text.startswith("^")
    text = text[1:] if exclude else text
    exact = text.startswith("=")
    text = text[1:] if exact else text
    hit = False
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        device, _, number = token.partition(":")
        name_ok = port.device == device if exact else port.device.startswith(device)
        port_ok = not number or (number.strip().isdigit() and int(number) == port.port)
        if name_ok and port_ok:
            hit = True
            break
    return hit != exclude


def _plan_gid_index(plan: NetworkPlan, usable: Sequence[RdmaPort],
                    environ: Optional[Mapping[str, str]],
                    nccl_version: Optional[tuple[int, ...]], whose: str = "") -> None:
    """NCCL_IB_GID_INDEX for RoCE: the RoCE v2 entry with an IPv4-mapped address.

    NCCL's docs define the variable as "the Global ID index used in RoCE mode". NCCL before 2.21
    defaults to index 0, a RoCE v1 link-local GID that does not route between subnets; since 2.21
    the default -1 auto-selects a RoCE v2 GID of family AF_INET (NCCL_IB_ROCE_VERSION_NUM=2,
    NCCL_IB_ADDR_FAMILY=AF_INET). Pinning the same entry explicitly gives that behaviour with any
    NCCL version and makes it visible in ``shoal doctor``.
    """
    if not usable:
        return
    steering = [v for v in _GID_STEERING if get_env(v, environ=environ)]
    if steering:
        plan.notes.append(f"you steer NCCL's GID choice with {', '.join(steering)}: "
                          "NCCL_IB_GID_INDEX is left to NCCL")
        return
    indices = sorted({p.roce_v2_ipv4_gid().index for p in usable})  # type: ignore[union-attr]
    if len(indices) == 1:
        gid = usable[0].roce_v2_ipv4_gid()
        assert gid is not None
        plan.env["NCCL_IB_GID_INDEX"] = (
            str(indices[0]), f"RoCE v2 GID with an IPv4 address ({gid.ipv4}) on "
                             f"{', '.join(p.name for p in usable)}{whose}; routable across subnets")
        return
    old = nccl_version is not None and tuple(nccl_version[:2]) < (2, 21)
    plan.warnings.append(
        f"the RoCE ports disagree on the index of their RoCE v2 IPv4 GID ({indices}); "
        "NCCL_IB_GID_INDEX is one value for all ports, so it is left to NCCL."
        + (" HINT: NCCL < 2.21 then uses index 0 (RoCE v1); upgrade torch (NCCL >= 2.21 picks per "
           "port) or set NCCL_IB_HCA to ports that share an index." if old else ""))


def _port_states(ports: Sequence[RdmaPort]) -> str:
    return ", ".join(f"{p.name} {p.state}" for p in ports)


def plan_network(*, world: WorldInfo, interfaces: Sequence[Interface],
                 rdma_ports: Sequence[RdmaPort] = (), backend: str = "gloo",
                 requested_interface: Optional[str] = None,
                 environ: Optional[Mapping[str, str]] = None,
                 master_ips: Sequence[str] = (), route_source_ip: Optional[str] = None,
                 hostname: str = "", hostname_ips: Sequence[str] = (),
                 multi_host: Optional[bool] = None,
                 nccl_version: Optional[tuple[int, ...]] = None) -> NetworkPlan:
    """Choose the network settings for a run from facts about this host (no I/O here).

    Args:
        world: this process's world (size, local size, rendezvous address).
        interfaces: this host's interfaces (:func:`read_interfaces`).
        rdma_ports: this host's RDMA ports (:func:`read_rdma_ports`).
        backend: the process group's backend; NCCL variables are planned only for ``nccl``.
        requested_interface: ``ShoalConfig.network_interface`` (one name or a comma list).
        environ: where the user's variables are read (default ``os.environ``, through env.py).
        master_ips: the rendezvous host's addresses (``MASTER_ADDR`` resolved).
        route_source_ip: the local address the kernel uses to reach ``master_ips[0]``.
        hostname, hostname_ips: this host's name and its addresses (what gloo binds by default).
        multi_host: force the scope (``shoal doctor`` previews a multi-host run with True).
        nccl_version: torch's NCCL version, for version-dependent advice.

    Returns:
        The plan; nothing is applied (see :func:`configure`).

    Example:
        >>> eth0 = Interface("eth0", ("10.0.0.5",), speed_mbps=100000)
        >>> w = WorldInfo(0, 16, 0, 8, "env://", "10.0.0.1", 29500, "torchrun")
        >>> plan_network(world=w, interfaces=[eth0], route_source_ip="10.0.0.5").env["GLOO_SOCKET_IFNAME"][0]
        'eth0'
    """
    multi, scope = _decide_scope(world, master_ips, multi_host)
    plan = NetworkPlan(multi_host=multi, scope=scope, backend=backend)
    by_name = {i.name: i for i in interfaces}
    addr = world.master_addr

    if addr and _unspecified(addr):
        text = (f"MASTER_ADDR={addr} is the 'any address' a server binds to, not one a peer can "
                "connect to")
        if multi:
            plan.warnings.append(text + ": ranks on other hosts cannot reach the rendezvous. HINT: set "
                                 "MASTER_ADDR to rank 0's host name or IP address.")
        else:
            plan.notes.append(text + "; it works here only because every rank is on this host")
    elif multi and addr and master_ips and all(_is_loopback_ip(ip) for ip in master_ips):
        plan.warnings.append(
            f"MASTER_ADDR={addr} resolves to loopback ({master_ips[0]}) but ranks run on several "
            "hosts: the others cannot reach the rendezvous. HINT: set MASTER_ADDR to rank 0's host "
            "name or IP address as seen from the other hosts.")

    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        value = get_env(var, environ=environ)
        if value:
            _check_user_ifname(var, value, by_name, multi, plan)

    chosen: Optional[str] = None
    if requested_interface:
        names = [n.strip() for n in requested_interface.split(",") if n.strip()]
        missing = [n for n in names if n not in by_name]
        if missing:
            plan.warnings.append(
                f"network_interface={requested_interface} names {', '.join(missing)}, which this host "
                f"does not have (it has {', '.join(sorted(by_name)) or 'none'}); gloo and NCCL will "
                "fail to start. HINT: pick one from `shoal doctor`, or unset SHOAL_NETWORK_INTERFACE.")
        if multi and any(by_name[n].resolves_to_loopback for n in names if n in by_name):
            plan.warnings.append(
                f"network_interface={requested_interface} is a loopback interface while ranks run on "
                "several hosts: peers cannot reach it. HINT: name the interface on the network "
                "between the hosts.")
        chosen = ",".join(names)
        plan.interface_reason = "named by you (network_interface / SHOAL_NETWORK_INTERFACE)"
    elif multi:
        chosen, plan.interface_reason = _choose_interface(interfaces, addr, route_source_ip,
                                                          hostname, hostname_ips)
        if chosen is None:
            plan.warnings.append(
                "no network interface is up with an address other hosts can reach, so a multi-host "
                "run cannot connect. HINT: check `ip addr`; name one with --network-interface.")
    else:
        plan.interface_reason = "one host: gloo's and NCCL's defaults work here"

    name_is_loopback = bool(hostname_ips) and all(_is_loopback_ip(ip) for ip in hostname_ips)
    if multi and chosen and name_is_loopback:
        plan.notes.append(f"this host's name {hostname} resolves to loopback ({hostname_ips[0]}); "
                          f"gloo would advertise that to its peers without GLOO_SOCKET_IFNAME={chosen}")
    if multi and chosen is None and name_is_loopback \
            and not get_env("GLOO_SOCKET_IFNAME", environ=environ):
        plan.warnings.append(
            f"this host's name {hostname} resolves to loopback ({hostname_ips[0]}), which gloo "
            "advertises to its peers by default: ranks on other hosts cannot connect. HINT: set "
            "GLOO_SOCKET_IFNAME (or --network-interface), or fix /etc/hosts.")

    if chosen:
        plan.interface = chosen
        # GLOO_SOCKET_IFNAME takes one name or a comma list (torch.distributed docs, "Common
        # environment variables"); without it gloo binds the address of the host name, which is
        # 127.0.1.1 on stock Debian/Ubuntu /etc/hosts.
        plan.env["GLOO_SOCKET_IFNAME"] = (chosen, plan.interface_reason)
        if backend == "nccl":
            # "=" selects exact names: a bare eth1 would also match eth10 (env docs,
            # NCCL_SOCKET_IFNAME). NCCL uses it for bootstrap, and for data when IB is off.
            plan.env["NCCL_SOCKET_IFNAME"] = ("=" + chosen, plan.interface_reason)

    if backend == "nccl" and multi:
        _plan_rdma(plan, rdma_ports, environ, nccl_version)
    elif backend == "nccl":
        plan.transport = "P2P/SHM"
        plan.notes.append("one host: NCCL moves data over NVLink/PCIe/shared memory; RDMA settings "
                          "are not needed")
    else:
        plan.transport = "gloo TCP" if multi else "gloo TCP (loopback)"
    return plan


def _resolve(host: Optional[str]) -> tuple[str, ...]:
    if not host:
        return ()
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return ()
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return tuple(seen)


def _route_source(ip: str) -> Optional[str]:
    """The local address the kernel would use to reach ``ip`` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


def _nccl_version() -> Optional[tuple[int, ...]]:
    """torch's NCCL version, only if torch is loaded already (never imported for a message)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        version = torch.cuda.nccl.version()
        return tuple(version) if isinstance(version, tuple) else None
    except Exception:  # noqa: BLE001 (CPU builds have no NCCL; any failure just means "unknown")
        return None


def plan_for_this_host(cfg: ShoalConfig, world: WorldInfo, *, sys_root: str = _SYS_ROOT,
                       proc_root: str = _PROC_ROOT,
                       interfaces: Optional[Sequence[Interface]] = None,
                       rdma_ports: Optional[Sequence[RdmaPort]] = None,
                       environ: Optional[Mapping[str, str]] = None,
                       backend: Optional[str] = None,
                       multi_host: Optional[bool] = None) -> NetworkPlan:
    """Gather this host's facts (only those the decision needs) and call :func:`plan_network`.

    On one host with no interface requested, nothing is read at all (constraint 3).
    """
    if backend is None:
        backend = expected_backend(cfg)[0]
    local_by_world = world.size <= 1 or (world.local_size is not None
                                         and world.local_size >= world.size)
    if multi_host is None and local_by_world and not cfg.network_interface:
        return plan_network(world=world, interfaces=interfaces or (), backend=backend,
                            environ=environ)
    master_ips = _resolve(world.master_addr)
    multi, _ = _decide_scope(world, master_ips, multi_host)
    if interfaces is None:
        interfaces = read_interfaces(sys_root, proc_root=proc_root)
    route = None
    hostname, hostname_ips = "", ()
    if multi:
        target = next((ip for ip in master_ips if not _is_loopback_ip(ip) and not _unspecified(ip)),
                      None)
        route = _route_source(target) if target else None
        owner = _owner(interfaces, route) if route else None
        if owner is None or owner.resolves_to_loopback:
            # Only when the route does not decide: a host name missing from /etc/hosts costs a DNS
            # round trip, or seconds where DNS is broken.
            hostname = socket.gethostname()
            hostname_ips = _resolve(hostname)
        if rdma_ports is None and backend == "nccl":
            rdma_ports = read_rdma_ports(sys_root)
    return plan_network(world=world, interfaces=interfaces, rdma_ports=rdma_ports or (),
                        backend=backend, requested_interface=cfg.network_interface, environ=environ,
                        master_ips=master_ips, route_source_ip=route, hostname=hostname,
                        hostname_ips=hostname_ips, multi_host=multi_host,
                        nccl_version=_nccl_version() if backend == "nccl" else None)


def configure(cfg: ShoalConfig, world: WorldInfo, **facts: Any) -> NetworkPlan:
    """Apply the network plan for this process: set each variable unless the user did.

    Called by ``shoal.init`` before the process group is created. Warnings are logged once per
    host (local rank 0). ``facts`` are passed to :func:`plan_for_this_host` (tests give fake
    roots or interface lists).

    Returns:
        The plan that was applied.
    """
    plan = plan_for_this_host(cfg, world, **facts)
    for name, (value, reason) in plan.env.items():
        set_default_env(name, value, reason)
    speak = world.local_rank in (None, 0)
    for text in plan.warnings:
        if speak:
            log.warning("shoal: %s", text)
    for text in plan.notes:
        log.debug("shoal: %s", text)
    return plan
