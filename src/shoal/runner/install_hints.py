"""Which framework builds fit this machine's NVIDIA driver: one small table, and the lookups on it.

The original product shipped one environment per CUDA version; here the user installs the wheel
line that matches the driver, and ``shoal doctor`` prints the command. The table is data, kept sane
by tests/unit/test_install_hints.py (ascending, every line has a command). Update it when torch
publishes a new CUDA line or NVIDIA a new CUDA release.

What lives elsewhere: detecting the driver and the installed frameworks (:mod:`shoal.runner.doctor`).

Sources:
    * minimum Linux x86_64 driver per CUDA release: NVIDIA CUDA Toolkit release notes, table
      "CUDA Toolkit and Corresponding Driver Versions" (GA releases);
    * minor-version compatibility floors (a CUDA 12.x build runs on any driver >= 525.60.13,
      13.x on >= 580.65.06, except features that JIT-compile PTX): NVIDIA "CUDA Compatibility"
      guide and the data-center driver support matrix;
    * torch wheel lines: download.pytorch.org/whl/<tag>, per the "Release Compatibility Matrix" of
      pytorch/pytorch RELEASE.md (stable and experimental CUDA per release): 2.10 cu126/cu128/cu130,
      2.11 cu126/cu128/cu130, 2.12 and 2.13 cu126/cu130/cu132 (cu128 dropped in 2.12, cu132 added
      as experimental; pytorch/pytorch#178665 and #182849), and the announced 2.14 matrix keeps
      cu126/cu130/cu132 with cu132 the PyPI default (pytorch/pytorch#190355);
    * CUDA 13.1 GA needs Linux driver >= 590.44.01 and 13.2 GA >= 595.45.04 (the release notes'
      driver table, as several public projects quote it; cross-checked, not read off NVIDIA's page);
    * TensorFlow: ``tensorflow[and-cuda]`` pulls CUDA 12 libraries from pip (TF >= 2.15, Linux);
    * JAX: ``jax[cuda12]`` / ``jax[cuda13]`` (JAX installation guide).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = [
    "CudaLine",
    "CUDA_LINES",
    "MINOR_COMPAT_MIN_DRIVER",
    "TORCH_INDEX_URL",
    "InstallHint",
    "parse_version",
    "max_cuda_for_driver",
    "torch_command",
    "torch_hint",
    "recommend",
]

TORCH_INDEX_URL = "https://download.pytorch.org/whl/"

Version = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CudaLine:
    """One CUDA release: the driver it needs and the torch wheel line built for it, if any."""

    #: (major, minor)
    cuda: tuple[int, int]
    #: Minimum Linux driver for full support of this release (GA), as NVIDIA spells it.
    min_driver: str
    #: torch wheel line (``cu126``), or None when torch published no wheels for this release.
    torch_tag: Optional[str] = None
    #: First and last torch (major, minor) published on that line; last None: still published
    #: by the newest torch release this table knows (2.13, the version the project pins: cu126,
    #: cu130, cu132; the announced 2.14 keeps the same three).
    torch_first: Optional[tuple[int, int]] = None
    torch_last: Optional[tuple[int, int]] = None

    @property
    def is_current(self) -> bool:
        return self.torch_tag is not None and self.torch_last is None


#: Ascending by CUDA version, and so by driver.
CUDA_LINES: tuple[CudaLine, ...] = (
    CudaLine((11, 8), "520.61.05", "cu118", (2, 0), (2, 7)),
    CudaLine((12, 0), "525.60.13"),
    CudaLine((12, 1), "530.30.02", "cu121", (2, 1), (2, 5)),
    CudaLine((12, 2), "535.54.03"),
    CudaLine((12, 3), "545.23.06"),
    CudaLine((12, 4), "550.54.14", "cu124", (2, 4), (2, 6)),
    CudaLine((12, 5), "555.42.02"),
    CudaLine((12, 6), "560.28.03", "cu126", (2, 6), None),
    CudaLine((12, 8), "570.26", "cu128", (2, 7), (2, 11)),
    CudaLine((12, 9), "575.51.03", "cu129", (2, 8), (2, 8)),
    CudaLine((13, 0), "580.65.06", "cu130", (2, 9), None),
    CudaLine((13, 1), "590.44.01"),
    CudaLine((13, 2), "595.45.04", "cu132", (2, 12), None),
)

#: Oldest driver that runs any build of a CUDA major version (minor-version compatibility).
MINOR_COMPAT_MIN_DRIVER: dict[int, str] = {
    11: "450.80.02",
    12: "525.60.13",
    13: "580.65.06",
}


@dataclass(frozen=True, slots=True)
class InstallHint:
    """One install suggestion: for what, the command, and why it fits."""

    target: str
    command: str
    note: str = ""


def parse_version(text: Optional[str]) -> Optional[Version]:
    """``"550.54.14"`` -> ``(550, 54, 14)``; ``"12.4"`` -> ``(12, 4)``; junk or None -> None."""
    if not text:
        return None
    m = re.match(r"\s*(\d+(?:\.\d+)*)", str(text))
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def _v(text: str) -> Version:
    version = parse_version(text)
    assert version is not None, text
    return version


def max_cuda_for_driver(driver: Optional[str]) -> Optional[tuple[int, int]]:
    """Newest CUDA release in the table that ``driver`` fully supports (None: too old or unknown)."""
    d = parse_version(driver)
    if d is None:
        return None
    fitting = [line.cuda for line in CUDA_LINES if _v(line.min_driver) <= d]
    return fitting[-1] if fitting else None


def _compat_major(d: Version) -> Optional[int]:
    """Newest CUDA major whose builds run on ``d`` under minor-version compatibility."""
    majors = [m for m, floor in MINOR_COMPAT_MIN_DRIVER.items() if _v(floor) <= d]
    return max(majors) if majors else None


def torch_command(tag: str) -> str:
    """The pip command for one torch wheel line (pip then takes the newest torch on that line)."""
    return f"pip install torch --index-url {TORCH_INDEX_URL}{tag}"


def _torch_range(line: CudaLine) -> str:
    first = ".".join(map(str, line.torch_first)) if line.torch_first else "?"
    last = ".".join(map(str, line.torch_last)) if line.torch_last else "current"
    return f"{line.torch_tag}: torch {first} to {last}"


def _cuda(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def torch_hint(driver: Optional[str]) -> InstallHint:
    """The torch wheel line for this driver.

    Preference: the newest still-published line the driver fully supports; else the oldest
    still-published line of a CUDA major the driver runs under minor-version compatibility; else
    the newest retired line it can run; else the CPU wheel and advice to upgrade the driver.
    """
    d = parse_version(driver)
    if d is None:
        return InstallHint("torch", torch_command("cpu"), "no NVIDIA driver found: CPU wheel")
    wheels = [line for line in CUDA_LINES if line.torch_tag]
    full = [line for line in wheels if _v(line.min_driver) <= d]
    top = max_cuda_for_driver(driver)
    supports = f"driver {driver} supports CUDA {_cuda(top)}" if top else f"driver {driver}"
    current_full = [line for line in full if line.is_current]
    if current_full:
        line = current_full[-1]
        return InstallHint("torch", torch_command(line.torch_tag or ""),
                           f"{supports}; {_torch_range(line)}")
    major = _compat_major(d)
    compat = [line for line in wheels if line.cuda[0] == major]
    current_compat = [line for line in compat if line.is_current]
    upgrade = min((_v(MINOR_COMPAT_MIN_DRIVER[line.cuda[0]]), MINOR_COMPAT_MIN_DRIVER[line.cuda[0]])
                  for line in wheels if line.is_current)[1]
    if current_compat:
        line = current_compat[0]
        alt = (f"; fully supported alternative: {torch_command(full[-1].torch_tag or '')} "
               f"({_torch_range(full[-1])})") if full else ""
        return InstallHint("torch", torch_command(line.torch_tag or ""),
                           f"{supports}; the CUDA {_cuda(line.cuda)} build runs under minor-version "
                           f"compatibility (driver >= {MINOR_COMPAT_MIN_DRIVER[line.cuda[0]]}){alt}")
    runnable = full or compat
    if runnable:
        line = runnable[-1]
        return InstallHint("torch", torch_command(line.torch_tag or ""),
                           f"{supports}; newest line it runs: {_torch_range(line)}; upgrade the "
                           f"driver to >= {upgrade} for current torch")
    return InstallHint("torch", torch_command("cpu"),
                       f"driver {driver} is older than any CUDA torch build: upgrade it to "
                       f">= {upgrade}, or use the CPU wheel")


def _tensorflow_hint(d: Optional[Version]) -> InstallHint:
    if d is not None and d >= _v(MINOR_COMPAT_MIN_DRIVER[12]):
        return InstallHint("tensorflow", 'pip install "tensorflow[and-cuda]"',
                           "CUDA 12 libraries come from pip (TF >= 2.15, Linux)")
    why = "no NVIDIA driver" if d is None else \
        f"GPU wheels need driver >= {MINOR_COMPAT_MIN_DRIVER[12]}"
    return InstallHint("tensorflow", "pip install tensorflow", f"CPU only: {why}")


def _jax_hint(d: Optional[Version]) -> InstallHint:
    if d is not None and d >= _v(MINOR_COMPAT_MIN_DRIVER[13]):
        return InstallHint("jax", 'pip install -U "jax[cuda13]"',
                           f"driver >= {MINOR_COMPAT_MIN_DRIVER[13]}")
    if d is not None and d >= _v(MINOR_COMPAT_MIN_DRIVER[12]):
        return InstallHint("jax", 'pip install -U "jax[cuda12]"',
                           f"driver >= {MINOR_COMPAT_MIN_DRIVER[12]}; CUDA 13 "
                           f"needs >= {MINOR_COMPAT_MIN_DRIVER[13]}")
    why = "no NVIDIA driver" if d is None else \
        f"GPU wheels need driver >= {MINOR_COMPAT_MIN_DRIVER[12]}"
    return InstallHint("jax", "pip install -U jax", f"CPU only: {why}")


def _shoal_hint(installed: Iterable[str]) -> InstallHint:
    have = [name for name in ("keras", "tensorflow", "jax") if name in set(installed)]
    if have:
        return InstallHint("shoal", f'pip install "shoal[{",".join(have)}]"',
                           "the extras of the frameworks installed here")
    return InstallHint("shoal", 'pip install "shoal[keras]"',
                       "or shoal[tensorflow], shoal[jax]: the extra of the framework you use")


def recommend(driver: Optional[str], installed: Iterable[str] = ()) -> list[InstallHint]:
    """Install commands for torch, TensorFlow, JAX and the shoal extras on this driver.

    Args:
        driver: the NVIDIA driver version (``"550.54.14"``), or None without a GPU.
        installed: names of the frontends installed (``keras``, ``tensorflow``, ``jax``).

    Example:
        >>> recommend("550.54.14")[0].command
        'pip install torch --index-url https://download.pytorch.org/whl/cu126'
    """
    d = parse_version(driver)
    installed = list(installed)
    return [torch_hint(driver), _tensorflow_hint(d), _jax_hint(d), _shoal_hint(installed)]
