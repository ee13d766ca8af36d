"""``shoal doctor``: what this machine has, what Shoal will use on it, and what to install.

Owns the report: probe the machine, build one plain dict (``--json`` prints it as is), and render it
as rich tables that fit one screen. Network facts and the choices ``init`` makes come from
:mod:`shoal.core.network` (the same code ``init`` runs, so the report cannot drift from what
happens); install commands from :mod:`shoal.runner.install_hints`. Nothing here changes the machine
or the environment.

Design constraints:

1. Fast: the command must finish in under 5 s. ``import torch`` is most of it (about 2 s here);
   no other framework is imported (importing tensorflow alone takes seconds): versions come from
   ``importlib.metadata``, and every external command (``nvidia-smi``, ``ip``) has a short timeout.
2. Never fails because one probe fails: the probe's error goes into the report instead.
3. Specific to this machine: every warning names what was found and ends with a HINT.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Optional

__all__ = ["add_arguments", "main", "collect", "render"]

_DRIVER_RE = re.compile(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``shoal doctor``."""
    parser.add_argument("--json", action="store_true",
                        help="print the report as JSON (for scripts) instead of tables")
    parser.add_argument("--probe-timeout-s", type=float, default=3.0,
                        help="time limit for each external command (nvidia-smi, ip); default 3")


def main(args: argparse.Namespace) -> int:
    """Run the probes and print the report. Returns 0 (a report is never a failure)."""
    report = collect(probe_timeout_s=args.probe_timeout_s)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        render(report)
    return 0


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------

def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _probe_torch() -> dict[str, Any]:
    start = time.perf_counter()
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import_s = time.perf_counter() - start
    info: dict[str, Any] = {"import_s": round(import_s, 3), "version": torch.__version__, "cuda": torch.version.cuda,
                            "hip": getattr(torch.version, "hip", None), "nccl": None,
                            "cuda_available": False, "device_count": 0}
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
        info["device_count"] = torch.cuda.device_count() if info["cuda_available"] else 0
    except Exception as exc:  # noqa: BLE001 (a broken driver must not break the report)
        info["cuda_error"] = str(exc).splitlines()[0]
    backends = {}
    for name in ("gloo", "nccl", "mpi", "ucc"):
        check = getattr(dist, f"is_{name}_available", None)
        backends[name] = bool(dist.is_available() and check is not None and check())
    if backends["nccl"]:
        try:
            info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001
            info["nccl"] = "unknown"
    info["backends"] = backends
    return info


_SMI_QUERY = ("--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader,nounits")


def _start(argv: list[str]) -> Optional[subprocess.Popen]:
    """Start an external probe now, so that it runs while torch imports (constraint 1)."""
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        return subprocess.Popen([exe, *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True)
    except OSError:
        return None


def _finish(proc: Optional[subprocess.Popen], deadline: float) -> tuple[Optional[str], Optional[str]]:
    """(stdout, None) on success, (None, error) on failure or timeout, (None, None) if not run."""
    if proc is None:
        return None, None
    name = os.path.basename(str(proc.args[0]))
    try:
        out, err = proc.communicate(timeout=max(0.1, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, f"{name} did not answer in time"
    if proc.returncode != 0:
        first = (err or out).strip().splitlines()[:1] or [f"exit status {proc.returncode}"]
        return None, f"{name}: {first[0]}"
    return out, None


def _probe_gpus(smi_out: Optional[str], smi_error: Optional[str],
                torch_info: dict[str, Any]) -> dict[str, Any]:
    gpu: dict[str, Any] = {"driver": None, "devices": [], "source": None, "error": smi_error}
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            m = _DRIVER_RE.search(f.read())
        if m:
            gpu["driver"], gpu["source"] = m.group(1), "/proc/driver/nvidia/version"
    except OSError:
        pass
    for line in (smi_out or "").strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            gpu["devices"].append({"index": parts[0], "name": parts[1], "memory_mib": parts[3]})
            gpu["driver"], gpu["source"] = parts[2], "nvidia-smi"
    if not gpu["devices"] and torch_info.get("cuda_available"):
        import torch  # noqa: PLC0415

        for i in range(torch_info.get("device_count", 0)):
            gpu["devices"].append({"index": str(i), "name": torch.cuda.get_device_name(i),
                                   "memory_mib": None})
        gpu["source"] = gpu["source"] or "torch"
    from shoal.runner.install_hints import max_cuda_for_driver  # noqa: PLC0415

    top = max_cuda_for_driver(gpu["driver"])
    gpu["max_cuda"] = f"{top[0]}.{top[1]}" if top else None
    return gpu


def _keras_backend(keras_version: str) -> tuple[str, str]:
    from shoal.core.env import get_env  # noqa: PLC0415

    if keras_version.startswith("2."):
        return "tensorflow", "Keras 2 always runs on TensorFlow"
    chosen = get_env("KERAS_BACKEND")
    if chosen:
        return chosen, "KERAS_BACKEND"
    home = get_env("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json"), encoding="utf-8") as f:
            backend = json.load(f).get("backend")
        if backend:
            return str(backend), os.path.join(home, "keras.json")
    except (OSError, ValueError):
        pass
    return "tensorflow", "Keras 3 default"


def _probe_frontends() -> dict[str, Any]:
    keras = _dist_version("keras")
    out: dict[str, Any] = {
        "keras": keras,
        "keras_backend": None,
        "tensorflow": _dist_version("tensorflow") or _dist_version("tensorflow-cpu"),
        "jax": _dist_version("jax"),
        "jaxlib": _dist_version("jaxlib"),
        "jax_cuda_plugin": _dist_version("jax-cuda13-plugin") or _dist_version("jax-cuda12-plugin"),
    }
    if keras:
        backend, source = _keras_backend(keras)
        out["keras_backend"] = backend
        out["keras_backend_source"] = source
    return out


def _hierarchical(cfg: Any, world: Any, multi_host: bool) -> tuple[bool, str]:
    """Whether the two-level allreduce will be on, and why.

    The same rule as :func:`shoal.core.algorithms.hierarchical.use_hierarchical`, applied to the
    layout the launcher announces (that function needs the layout ``init`` builds from host names).
    """
    if cfg.hierarchical == "off":
        return False, "hierarchical=off, set by you"
    if cfg.local_size:
        per_node, how = cfg.local_size, f"local_size={cfg.local_size} emulation"
    elif not multi_host:
        per_node, how = world.size, "one host"
    elif world.local_size:
        per_node, how = world.local_size, "from the launcher"
    else:
        return cfg.hierarchical == "on", (f"hierarchical={cfg.hierarchical}: decided at init from the "
                                          "ranks' host names (the launcher does not say how many "
                                          "ranks share a node)")
    nodes, even = -(-world.size // per_node), world.size % per_node == 0
    layout = f"{nodes} node(s) x {per_node} rank(s), {how}" + ("" if even else ", uneven")
    if cfg.hierarchical == "on":
        return even, f"hierarchical=on, set by you; {layout}" + ("" if even else ": flat allreduce")
    on = nodes > 1 and even and per_node > 1
    return on, f"auto: {layout}; on when several even nodes have >1 rank each"


#: Up to which link speed (Mbit/s) each compression family was measured to make the step faster than full
#: precision (docs/compression.md, "When compression pays"): mlp_big of benchmarks/synthetic.py (105 MB of
#: gradients, 171-234 ms of compute per step on one core), 2 CPU ranks, over the emulated 1 Gbit/s link and
#: over loopback (fp32's 105 MB in 62-74 ms). fp16 paid 1.52x / 1.53x at 1 Gbit/s and lost (0.87x / 0.93x)
#: on loopback; a line through the two points crosses at 5.2 and 8.1 Gbit/s, the lower is kept. PowerSGD paid
#: 1.49x at 1 Gbit/s and was not measured on a faster link: 1000 is where a gain was seen, not where it ends.
#: int8 was 0.95x at 1 Gbit/s on the loaded machine (load 5-11): no speed where it paid, hence 0. The
#: crossovers move up with faster compute (a GPU computes the step and the compression in a fraction of
#: that) and down for models with less gradient per unit of compute.
_CROSSOVER_MBPS = {"fp16": 5000, "bf16": 5000, "powersgd": 1000, "int8": 1000}

#: What each crossover rests on, in the words the doctor prints.
_CROSSOVER_EVIDENCE = {
    "fp16": "fp16/bf16 pay below ~5 Gbit/s (1.5x at 1 Gbit/s, 0.9x on loopback)",
    "powersgd": "powersgd 2.9x (rank 4) to 4.0x (rank 1) DDP fp32 at 1 Gbit/s (faster links not measured)",
    "int8": "int8 2.1x DDP fp32 at 1 Gbit/s on idle cores, 0.95x on loaded ones (CPU-bound; faster links not "
            "measured)",
}


def _compression_advice(compression: str, link_mbps: Optional[int], hierarchical: bool) -> str:
    """When the configured compression pays on this link (a pure function of the measured crossovers)."""
    family = compression.partition(":")[0].removeprefix("mixed_")
    speed = (f"{link_mbps / 1000:g} Gbit/s" if link_mbps and link_mbps >= 1000 else
             f"{link_mbps} Mbit/s" if link_mbps else None)
    measured = ("measured on a bandwidth-heavy model with 2 CPU ranks: " + "; ".join(_CROSSOVER_EVIDENCE.values())
                + " (docs/compression.md, When compression pays)")
    mixed = " (hierarchical is on: mixed_* compresses only what crosses nodes)" if hierarchical else ""
    if speed is None:
        return f"{compression}; link speed unknown here; compression pays on slow links, {measured}{mixed}"
    if family == "none":
        gains = [n for n, mbps in _CROSSOVER_MBPS.items() if link_mbps <= mbps and n != "bf16"]
        if gains:
            return f"none on a {speed} link: {', '.join(gains)} would likely be faster here; {measured}{mixed}"
        return f"none on a {speed} link: no compression was measured faster at this speed; {measured}"
    if link_mbps > _CROSSOVER_MBPS.get(family, 0):
        return f"{compression} on a {speed} link: no gain measured at this speed; {measured}{mixed}"
    return f"{compression} on a {speed} link: pays on this link; {measured}{mixed}"


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _env_entries(plan: Any) -> dict[str, Any]:
    from shoal.core.env import get_env  # noqa: PLC0415

    out = {}
    for name, (value, reason) in plan.env.items():
        yours = get_env(name)
        out[name] = {"value": value, "reason": reason, "yours": yours,
                     "effective": yours if yours is not None else value}
    return out


def _cuda_warnings(torch_info: dict[str, Any], gpu: dict[str, Any], backends: dict[str, bool],
                   torch_cmd: str) -> tuple[list[str], list[str]]:
    from shoal.runner.install_hints import (  # noqa: PLC0415
        CUDA_LINES, MINOR_COMPAT_MIN_DRIVER, max_cuda_for_driver, parse_version)

    warnings: list[str] = []
    notes: list[str] = []
    driver = gpu.get("driver")
    built = parse_version(torch_info.get("cuda"))
    n_gpus = len(gpu.get("devices") or []) or torch_info.get("device_count", 0)
    if driver and built is None and not torch_info.get("hip"):
        warnings.append(
            f"torch {torch_info['version']} is a CPU-only build but this machine has NVIDIA driver "
            f"{driver} ({n_gpus or 'some'} GPU(s)): Shoal will train on the CPU with gloo. "
            f"HINT: {torch_cmd}")
    if built and not driver:
        notes.append(f"torch is built for CUDA {torch_info['cuda']} but no NVIDIA driver is loaded: "
                     "training runs on the CPU with gloo")
    if built and driver:
        top = max_cuda_for_driver(driver)
        d = parse_version(driver) or ()
        needed = next((line.min_driver for line in CUDA_LINES if line.cuda >= built[:2]), None)
        floor = MINOR_COMPAT_MIN_DRIVER.get(built[0])
        compat = floor is not None and d >= (parse_version(floor) or ())
        if top is None or built[:2] > top:
            if compat:
                warnings.append(
                    f"torch is built for CUDA {torch_info['cuda']} but driver {driver} fully supports "
                    f"{f'only CUDA {top[0]}.{top[1]}' if top else 'an older CUDA'}: it runs under "
                    "minor-version compatibility, but code that JIT-compiles PTX may fail. HINT: "
                    f"upgrade the driver to >= {needed or 'a newer release'}, or install the "
                    f"matching wheel: {torch_cmd}")
            else:
                warnings.append(
                    f"torch is built for CUDA {torch_info['cuda']} but driver {driver} is too old for "
                    f"any CUDA {built[0]} build: CUDA will not initialise. HINT: upgrade the driver to "
                    f">= {needed or floor}, or install the matching wheel: {torch_cmd}")
        if not torch_info.get("cuda_available"):
            warnings.append(
                f"NVIDIA driver {driver} is loaded and torch is a CUDA build, but "
                "torch.cuda.is_available() is False. HINT: check CUDA_VISIBLE_DEVICES and that "
                "`nvidia-smi` lists the GPUs inside this container.")
    if n_gpus and torch_info.get("cuda_available") and not backends.get("nccl"):
        warnings.append("GPUs are present but this torch has no NCCL: GPU collectives cannot run. "
                        f"HINT: install an official CUDA wheel: {torch_cmd}")
    return warnings, notes


def collect(probe_timeout_s: float = 3.0) -> dict[str, Any]:
    """Probe this machine and return the report as a JSON-ready dict.

    Example:
        >>> report = collect()
        >>> report["backends"]["gloo"]
        True
    """
    start = time.perf_counter()
    from shoal import __version__  # noqa: PLC0415
    from shoal.core import env as _env  # noqa: PLC0415
    from shoal.core import network  # noqa: PLC0415
    from shoal.runner import install_hints  # noqa: PLC0415
    from shoal.core.config import ShoalConfig  # noqa: PLC0415

    warnings: list[str] = []
    notes: list[str] = []
    deadline = time.perf_counter() + probe_timeout_s
    smi = _start(["nvidia-smi", *_SMI_QUERY])
    ip = _start(["ip", "-j", "addr"])
    torch_info = _probe_torch()
    backends = torch_info.pop("backends")
    deadline = max(deadline, time.perf_counter() + 0.5)  # a slow torch import eats no probe's time
    gpu = _probe_gpus(*_finish(smi, deadline), torch_info)
    frontends = _probe_frontends()

    ip_out, _ = _finish(ip, deadline)
    addresses = network.parse_ip_addr_json(ip_out) if ip_out else None
    interfaces = network.read_interfaces(addresses=addresses)
    rdma = network.read_rdma_ports()
    gpudirect = network.read_gpudirect_module()

    try:
        cfg = _env.read_config()
    except ValueError as exc:
        warnings.append(f"{exc}. HINT: fix or unset that variable; the report uses the defaults.")
        cfg = ShoalConfig()
    try:
        world = _env.detect_world(quiet=True)  # its SLURM batch warning goes into the report instead
    except ValueError as exc:  # e.g. RANK=abc: init would fail the same way
        warnings.append(f"the launcher's variables do not parse ({exc}); init will fail. HINT: check "
                        "RANK, WORLD_SIZE, LOCAL_WORLD_SIZE; the report assumes a world of one.")
        world = _env.WorldInfo(0, 1, 0, 1, None, None, None, "single")
    ntasks = (_env.get_env("SLURM_NTASKS") or "").strip()
    if world.source == _env.SLURM_BATCH_SOURCE and ntasks not in ("", "0", "1"):
        warnings.append(f"this is a SLURM batch script's own process (SLURM_NTASKS={ntasks}, no "
                        "SLURM_STEP_ID): shoal.init() here runs a world of one. HINT: start the ranks "
                        "with `srun python train.py` inside the batch script.")
    backend, backend_reason = network.expected_backend(cfg)
    plan = network.plan_for_this_host(cfg, world, interfaces=interfaces, rdma_ports=rdma,
                                      backend=backend)
    preview = None
    if not plan.multi_host:
        preview_backend = "nccl" if (torch_info["cuda_available"] and backends["nccl"]) else "gloo"
        preview = network.plan_for_this_host(cfg, world, interfaces=interfaces, rdma_ports=rdma,
                                             backend=preview_backend, multi_host=True)
    hier_on, hier_reason = _hierarchical(cfg, world, plan.multi_host)
    # The link gradients cross: the chosen interface (or, on one host, the one a multi-host run would use).
    chosen = (plan.interface or (preview.interface if preview is not None else None) or "").split(",")[0]
    link = next((i.speed_mbps for i in interfaces if i.name == chosen), None)

    installed = [name for name in ("keras", "tensorflow", "jax") if frontends.get(name)]
    hints = install_hints.recommend(gpu["driver"], installed)
    w, n = _cuda_warnings(torch_info, gpu, backends, hints[0].command)
    warnings += w
    notes += n
    warnings += plan.warnings
    notes += plan.notes
    if preview is not None:
        warnings += [f"in a multi-host run: {text}" for text in preview.warnings
                     if text not in plan.warnings]
        notes += [f"in a multi-host run: {text}" for text in preview.notes if text not in plan.notes]
    kb = frontends.get("keras_backend")
    have = {"tensorflow": frontends.get("tensorflow"), "jax": frontends.get("jax"), "torch": True}
    if kb in have and not have[kb]:
        warnings.append(f"Keras is set to the {kb} backend ({frontends.get('keras_backend_source')}) "
                        f"but {kb} is not installed. HINT: install it, or set KERAS_BACKEND=torch.")
    if frontends.get("keras") and str(frontends["keras"]).startswith("2."):
        notes.append(f"Keras {frontends['keras']} is Keras 2; shoal's Keras frontend needs Keras 3")
    active_rdma = [p for p in rdma if p.is_active]
    if active_rdma and (gpu["devices"] or torch_info["cuda_available"]) and gpudirect is None:
        notes.append("no GPUDirect RDMA module (nvidia_peermem) is loaded: NCCL stages GPU data "
                     "through host memory unless the driver offers DMA-BUF; `modprobe nvidia_peermem` "
                     "enables it")

    return {
        "shoal": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform()},
        "torch": torch_info,
        "gpu": gpu,
        "backends": backends,
        "frontends": frontends,
        "network": {
            "address_source": "ip -j addr" if addresses is not None else "ioctl + /proc/net/if_inet6",
            "interfaces": [{"name": i.name, "up": i.is_up, "loopback": i.resolves_to_loopback,
                            "container_or_virtual": i.is_container_or_virtual,
                            "addresses": list(i.addresses), "speed_mbps": i.speed_mbps, "mtu": i.mtu}
                           for i in interfaces],
            "rdma": [{"port": p.name, "state": p.state, "link_layer": p.link_layer, "rate": p.rate,
                      "gids": [{"index": g.index, "gid": g.value, "type": g.roce_type,
                                "netdev": g.netdev, "ipv4": g.ipv4} for g in p.gids]}
                     for p in rdma],
            "gpudirect_rdma_module": gpudirect,
        },
        "world": {"source": world.source, "rank": world.rank, "size": world.size,
                  "local_size": world.local_size, "master_addr": world.master_addr,
                  "master_port": world.master_port},
        "plan": {
            **plan.to_dict(),
            "env": _env_entries(plan),
            "backend_reason": backend_reason,
            "hierarchical": hier_on,
            "hierarchical_reason": hier_reason,
            "compression": cfg.compression,
            "compression_advice": _compression_advice(cfg.compression, link, hier_on),
        },
        "plan_multi_host": (None if preview is None
                            else {**preview.to_dict(), "env": _env_entries(preview)}),
        "install": [{"target": h.target, "command": h.command, "note": h.note} for h in hints],
        "warnings": warnings,
        "notes": notes,
        "elapsed_s": round(time.perf_counter() - start, 3),
        "torch_import_s": torch_info.pop("import_s"),
    }


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[dim]no[/]"


def _speed(mbps: Optional[int]) -> str:
    if not mbps:
        return "[dim]?[/]"
    return f"{mbps // 1000} Gb/s" if mbps >= 1000 else f"{mbps} Mb/s"


def _env_lines(env: dict[str, Any], interface_reason: str = "") -> str:
    from rich.markup import escape  # noqa: PLC0415

    if not env:
        return "[dim]none[/]"
    lines = []
    for name, e in env.items():
        if e["yours"] is not None and e["yours"] != e["value"]:
            lines.append(f"{name}={escape(e['yours'])} [dim](yours, kept; shoal would set "
                         f"{escape(e['value'])})[/]")
        else:
            why = "the interface above" if e["reason"] == interface_reason else e["reason"]
            lines.append(f"{name}={escape(e['value'])} [dim]({escape(why)})[/]")
    return "\n".join(lines)


def render(report: dict[str, Any], console: Any = None) -> None:
    """Print ``report`` (from :func:`collect`) as tables that fit one screen."""
    from rich import box  # noqa: PLC0415
    from rich.console import Console  # noqa: PLC0415
    from rich.markup import escape  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = console or Console()
    t, g, fe, plan = report["torch"], report["gpu"], report["frontends"], report["plan"]

    sw = Table(box=box.SIMPLE, show_header=False, pad_edge=False, title_justify="left",
               title=f"[bold]shoal doctor[/]  shoal {report['shoal']}, probed in "
                     f"{report['elapsed_s']:.1f} s")
    sw.add_column(style="bold cyan", no_wrap=True)
    sw.add_column()
    py = report["python"]
    sw.add_row("Python", f"{py['version']}  [dim]{escape(py['executable'])}[/]")
    cuda = f"CUDA {t['cuda']}" if t["cuda"] else "CPU-only build"
    sw.add_row("torch", f"{t['version']}  {cuda}  NCCL {t['nccl'] or '-'}  "
                        f"cuda available: {_yes(t['cuda_available'])}")
    driver = (f"driver {g['driver']} (CUDA <= {g['max_cuda'] or '?'})" if g["driver"]
              else "[dim]no NVIDIA driver[/]")
    kinds: dict[str, int] = {}
    for d in g["devices"]:
        mib = str(d.get("memory_mib") or "")
        label = d["name"] + (f" ({round(int(mib) / 1024)} GiB)" if mib.isdigit() else "")
        kinds[label] = kinds.get(label, 0) + 1
    devices = ", ".join(f"{n} x {label}" for label, n in kinds.items()) or "[dim]no GPU[/]"
    error = f"  [red]{escape(g['error'])}[/]" if g["error"] else ""
    sw.add_row("GPU", f"{driver}; {devices}{error}")
    sw.add_row("backends", "  ".join(f"{k} {_yes(v)}" for k, v in report["backends"].items()))
    keras = (f"keras {fe['keras']} (backend {fe['keras_backend']})" if fe["keras"]
             else "keras [dim]-[/]")
    sw.add_row("frontends", f"{keras}  tensorflow {fe['tensorflow'] or '[dim]-[/]'}  "
                            f"jax {fe['jax'] or '[dim]-[/]'}")
    console.print(sw)

    net = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="[bold]Network[/]", title_justify="left")
    for col in ("interface", "state", "addresses", "speed", "note"):
        net.add_column(col, no_wrap=col != "addresses")
    folded = []
    chosen = set((plan.get("interface") or "").split(",")) | set(
        ((report.get("plan_multi_host") or {}).get("interface") or "").split(","))
    for i in report["network"]["interfaces"]:
        if i["name"] not in chosen and (not i["up"] or i["container_or_virtual"]) and not i["addresses"]:
            folded.append(i["name"])
            continue
        note = ("loopback" if i["loopback"] else "container/virtual" if i["container_or_virtual"]
                else "chosen" if i["name"] in chosen else "")
        shown = [a for a in i["addresses"] if not a.lower().startswith("fe80:")]
        net.add_row(i["name"], "up" if i["up"] else "[dim]down[/]", ", ".join(shown) or "-",
                    _speed(i["speed_mbps"]), note)
    if folded:
        net.add_row(f"[dim]{', '.join(folded)}[/]", "[dim]down/virtual[/]", "[dim]no address[/]", "", "")
    console.print(net)

    if report["network"]["rdma"]:
        rd = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="[bold]RDMA[/]", title_justify="left")
        for col in ("port", "state", "link layer", "rate", "RoCE v2 IPv4 GID"):
            rd.add_column(col)
        for p in report["network"]["rdma"]:
            v2 = next((f"#{x['index']} {x['ipv4']}" for x in p["gids"]
                       if (x["type"] or "").lower() == "roce v2" and x["ipv4"]), "-")
            rd.add_row(p["port"], p["state"], p["link_layer"], p["rate"], v2)
        console.print(rd)
    else:
        console.print("[bold]RDMA[/]  none (/sys/class/infiniband is empty): NCCL would use TCP "
                      "sockets between hosts\n")

    at = Table(box=box.SIMPLE, show_header=False, pad_edge=False, title_justify="left",
               title="[bold]What shoal will use at init[/]")
    at.add_column(style="bold cyan", no_wrap=True)
    at.add_column()
    at.add_row("backend", f"{plan['backend']} [dim]({escape(plan['backend_reason'])})[/]")
    at.add_row("scope", escape(plan["scope"]))
    at.add_row("interface", f"{plan['interface'] or 'not forced'} "
                            f"[dim]({escape(plan['interface_reason'])})[/]")
    at.add_row("hierarchical", f"{'on' if plan['hierarchical'] else 'off'} "
                               f"[dim]({escape(plan['hierarchical_reason'])})[/]")
    at.add_row("compression", escape(plan["compression_advice"]))
    at.add_row("variables", _env_lines(plan["env"], plan["interface_reason"]))
    mh = report.get("plan_multi_host")
    if mh:
        at.add_row("if multi-host",
                   f"interface {mh['interface'] or '-'} [dim]({escape(mh['interface_reason'])})[/]\n"
                   f"transport {mh['transport']}\n"
                   + _env_lines(mh["env"], mh["interface_reason"]))
    console.print(at)

    ins = Table(box=box.SIMPLE, show_header=False, pad_edge=False, title_justify="left",
                title="[bold]Install (matching this machine)[/]")
    ins.add_column(style="bold cyan", no_wrap=True)
    ins.add_column()
    for h in report["install"]:
        ins.add_row(h["target"], f"{escape(h['command'])}\n[dim]{escape(h['note'])}[/]")
    console.print(ins)

    for text in report["warnings"]:
        console.print(f"[bold yellow]warning:[/] {escape(text)}")
    for text in report["notes"]:
        console.print(f"[dim]note: {escape(text)}[/]")
    if not report["warnings"]:
        console.print("[green]no warnings[/]")
