"""Memory probes: how much host RAM, container (cgroup) memory and GPU memory is free right now.

Sizing reads one ``MemoryReading`` at start-up; the degradation controller reads more while the server runs.
Every source is injectable (the cgroup root, the host reader, the NVML module, the environment) so tests
script them, and ``ScriptedProbe`` replays readings for scripted memory pressure. A probe never raises:
a source it cannot read counts as absent (no cgroup limit, no GPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple, Protocol

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024**2
GiB = 1024**3

# cgroup v1 has no "max": an unlimited group reports PAGE_COUNTER_MAX pages (9223372036854771712 on
# x86-64). Anything this large cannot be a real limit.
_UNLIMITED_V1 = 1 << 60


class GpuDevice(NamedTuple):
    """One GPU this process may use. ``index`` is NVML's (PCI order), as nvidia-smi shows it."""

    index: int
    name: str
    free: int
    total: int


@dataclass(frozen=True, slots=True)
class MemoryReading:
    host_available: int  # psutil's "available": free plus what the kernel can reclaim at once
    host_total: int
    cgroup_limit: int | None = None  # None: the container (if any) sets no memory limit
    cgroup_usage: int | None = None  # the group's working set: usage minus reclaimable page cache
    gpus: tuple[GpuDevice, ...] = ()

    @property
    def host_free(self) -> int:
        """Host bytes this process may still take. A container limit below the host's free memory wins:
        the kernel OOM-kills at the cgroup limit however much the host has free."""
        if self.cgroup_limit is None:
            return self.host_available
        room = max(0, self.cgroup_limit - (self.cgroup_usage or 0))
        return min(self.host_available, room)

    @property
    def host_limit(self) -> int:
        """Total host memory this process could ever have: the smaller of RAM and the cgroup limit."""
        if self.cgroup_limit is None:
            return self.host_total
        return min(self.host_total, self.cgroup_limit)

    @property
    def gpu_free(self) -> int:
        # llama.cpp splits offloaded layers over every visible GPU, so their free memory adds up.
        return sum(gpu.free for gpu in self.gpus)

    @property
    def gpu_total(self) -> int:
        return sum(gpu.total for gpu in self.gpus)


def auto_reserve(reading: MemoryReading) -> int:
    """``--memory-reserve auto``: the smaller of 1 GiB and a tenth of the memory this process could ever
    have (RAM, or the container's limit when lower). A workstation keeps 1 GiB back; a 1 GiB container
    keeps about 100 MiB, and so still has room for a small model."""
    return min(GiB, reading.host_limit // 10)


class MemoryProbe(Protocol):
    def read(self) -> MemoryReading: ...


# --- host and cgroup -----------------------------------------------------------------------------


def psutil_host() -> tuple[int, int]:
    """(available, total) host RAM. psutil is imported here so importing this module stays cheap."""
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def _read_int(path: Path) -> int | None:
    """An integer file under /sys, or None when it is missing, unreadable or says "max"."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        log.debug("unexpected content in %s: %r", path, text[:40])
        return None


def _read_stat(path: Path, key: str) -> int:
    """One counter of a memory.stat file; 0 when absent (then nothing is treated as reclaimable)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _is_v2(root: Path) -> bool:
    return any((root / name).exists() for name in ("cgroup.controllers", "memory.max", "memory.current"))


def _own_group(proc_cgroup: Path | None, v2: bool, controller: str = "memory") -> str:
    """This process's group path from /proc/self/cgroup ("0::/path" on v2, "N:memory:/path" on v1, or
    the line of another v1 ``controller``)."""
    if proc_cgroup is None:
        return "/"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if (v2 and controllers == "") or (not v2 and controller in controllers.split(",")):
            return path or "/"
    return "/"


def _group_dirs(base: Path, group: str) -> list[Path]:
    """The group's directory and each ancestor's, innermost first, that exist under this mount.

    Inside a container with its own cgroup namespace the group is "/" and only the mount root counts;
    outside one (a systemd slice with MemoryMax=, a v1 container without a namespace) the limit may sit
    on the process's own group or on any ancestor.
    """
    parts = [p for p in group.strip("/").split("/") if p and p != ".."]
    dirs = [base.joinpath(*parts[:n]) for n in range(len(parts), 0, -1)] + [base]
    return [d for d in dirs if d.is_dir()]


def _group_memory(group: Path, v2: bool) -> tuple[int | None, int | None]:
    """(limit, working-set usage) of one group directory.

    Usage leaves out inactive page cache, as ``docker stats`` does: the kernel drops it before it
    OOM-kills, so counting it would make a container that once read a big file look full.
    """
    if v2:
        limit = _read_int(group / "memory.max")
        current = _read_int(group / "memory.current")
        inactive = _read_stat(group / "memory.stat", "inactive_file")
    else:
        limit = _read_int(group / "memory.limit_in_bytes")
        current = _read_int(group / "memory.usage_in_bytes")
        inactive = _read_stat(group / "memory.stat", "total_inactive_file")
        if limit is not None and limit >= _UNLIMITED_V1:
            limit = None
    usage = None if current is None else max(0, current - inactive)
    return limit, usage


def read_cgroup(root: Path, proc_cgroup: Path | None = None) -> tuple[int | None, int | None]:
    """(limit, usage) of the memory cgroup that leaves this process the least room: v2 when the mount
    root looks like v2, else v1 under ``root/memory``. Limit None: no group on the way sets one."""
    v2 = _is_v2(root)
    base = root if v2 else root / "memory"
    limit: int | None = None
    usage: int | None = None
    room: int | None = None
    for group in _group_dirs(base, _own_group(proc_cgroup, v2)):
        group_limit, group_usage = _group_memory(group, v2)
        if usage is None:
            usage = group_usage  # the innermost group's usage, reported even without a limit
        if group_limit is None:
            continue
        group_room = group_limit - (group_usage or 0)
        if room is None or group_room < room:
            limit, usage, room = group_limit, group_usage, group_room
    return limit, usage


# --- GPUs through NVML ---------------------------------------------------------------------------

_IMPORT = object()  # SystemProbe(nvml=...) default: import pynvml on the first read


def _import_nvml() -> Any | None:
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py not installed: a CPU-only machine
        return None
    return pynvml


def _text(value: str | bytes) -> str:
    # Old nvidia-ml-py releases return bytes, newer ones str.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _visible_handles(nvml: Any, visible: str | None) -> list[Any]:
    """NVML handles of the GPUs CUDA_VISIBLE_DEVICES lets this process see, in its order.

    Follows CUDA: unset means every device; an empty string means none; an entry is an index or a
    (prefix of a) "GPU-..."/"MIG-..." UUID; the first entry that names no device hides it and all
    entries after it.
    """
    count = nvml.nvmlDeviceGetCount()
    every = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    if visible is None:
        return every
    handles: list[Any] = []
    for entry in (part.strip() for part in visible.split(",")):
        handle = _resolve_entry(nvml, every, entry)
        if handle is None:
            break
        handles.append(handle)
    return handles


def _resolve_entry(nvml: Any, every: list[Any], entry: str) -> Any | None:
    if entry.isdigit():
        return every[int(entry)] if int(entry) < len(every) else None
    if not entry.startswith(("GPU-", "MIG-")):
        return None
    try:  # an exact UUID; NVML also resolves MIG instances this way
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    except Exception:
        pass
    matches = [h for h in every if _text(nvml.nvmlDeviceGetUUID(h)).startswith(entry)]
    return matches[0] if len(matches) == 1 else None  # CUDA takes a unique prefix only


def _device(nvml: Any, handle: Any, position: int) -> GpuDevice:
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        index = int(nvml.nvmlDeviceGetIndex(handle))
    except Exception:  # MIG handles have no index of their own
        index = position
    return GpuDevice(index, _text(nvml.nvmlDeviceGetName(handle)), int(mem.free), int(mem.total))


def read_gpus(nvml: Any, visible: str | None) -> tuple[GpuDevice, ...]:
    """The visible GPUs and their free memory, or () when NVML is absent or fails in any way."""
    if nvml is None:
        return ()
    try:
        handles = _visible_handles(nvml, visible)
        return tuple(_device(nvml, h, i) for i, h in enumerate(handles))
    except Exception as exc:  # pynvml.NVMLError, or a driver that went away: report no GPU, never raise
        log.warning("could not read GPU memory through NVML: %s", exc)
        return ()


class SystemProbe:
    """Reads the real machine. NVML is initialised once, on the first read, and kept until close()."""

    def __init__(
        self,
        cgroup_root: str | Path = "/sys/fs/cgroup",
        nvml: Any = _IMPORT,
        proc_cgroup: str | Path | None = "/proc/self/cgroup",
        host: Callable[[], tuple[int, int]] = psutil_host,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.cgroup_root = Path(cgroup_root)
        self.proc_cgroup = None if proc_cgroup is None else Path(proc_cgroup)
        self._nvml_source = nvml  # _IMPORT, a module (or fake), or None for "no GPU"
        self._nvml: Any | None = None
        self._nvml_tried = False
        self._host = host
        self._environ = os.environ if environ is None else environ
        self._lock = threading.Lock()

    def read(self) -> MemoryReading:
        available, total = self._host()
        limit, usage = read_cgroup(self.cgroup_root, self.proc_cgroup)
        with self._lock:
            nvml = self._init_nvml()
        gpus = read_gpus(nvml, self._environ.get("CUDA_VISIBLE_DEVICES"))
        return MemoryReading(available, total, limit, usage, gpus)

    def _init_nvml(self) -> Any | None:
        # One attempt only: a machine without a driver does not grow one while the server runs, and
        # a failed nvmlInit can take a while.
        if not self._nvml_tried:
            self._nvml_tried = True
            module = _import_nvml() if self._nvml_source is _IMPORT else self._nvml_source
            if module is not None:
                try:
                    module.nvmlInit()
                    self._nvml = module
                except Exception as exc:
                    log.info("no GPU: NVML could not start (%s)", exc)
        return self._nvml

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                with contextlib.suppress(Exception):  # closing must not fail shutdown
                    self._nvml.nvmlShutdown()
                self._nvml = None


class ScriptedProbe:
    """Readings from a script: one fixed reading, a list played in order (the last one repeats), or a
    callable. Assign ``.reading`` at any time, from any thread, to change what the next read returns."""

    def __init__(self, source: MemoryReading | Sequence[MemoryReading] | Callable[[], MemoryReading]) -> None:
        self._lock = threading.Lock()
        self._fixed: MemoryReading | None = None
        self._queue: list[MemoryReading] = []
        self._call: Callable[[], MemoryReading] | None = None
        self.reads = 0
        if isinstance(source, MemoryReading):
            self._fixed = source
        elif callable(source):
            self._call = source
        else:
            if not source:
                raise ValueError("ScriptedProbe needs at least one reading")
            self._queue = list(source)

    @property
    def reading(self) -> MemoryReading | None:
        return self._fixed

    @reading.setter
    def reading(self, value: MemoryReading) -> None:
        with self._lock:
            self._fixed, self._queue, self._call = value, [], None

    def read(self) -> MemoryReading:
        with self._lock:
            self.reads += 1
            if self._call is not None:
                return self._call()
            if self._queue:
                self._fixed = self._queue.pop(0) if len(self._queue) > 1 else self._queue[0]
            assert self._fixed is not None
            return self._fixed


# --- sizes as people write them ------------------------------------------------------------------

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "k": KiB, "m": MiB, "g": GiB, "t": 1024**4,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024**4,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from "1048576", "512MiB", "1.5 GiB", "2GB" or "4g". K/M/G/T alone mean KiB/MiB/GiB/TiB,
    as in ``docker run -m``; KB/MB/GB/TB are powers of 1000. Fractions of a byte round down."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size cannot be negative: {text}")
        return text
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read {text!r} as a size: write bytes, or a number with B, KB, MB, GB, TB, "
            "KiB, MiB, GiB, TiB (or K, M, G, T for the binary units), e.g. 512MiB or 1.5GiB"
        )
    return int(Decimal(match.group(1)) * _UNITS[unit])  # Decimal: "1.1GB" is exactly 1,100,000,000


def format_size(n: int | float) -> str:
    """A byte count for people: "512 B", "48 MiB", "21.3 GiB" (one decimal, none when it is .0)."""
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    unit = "B"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if round(value, 1) < 1024:
            break
        value /= 1024
        unit = name
    text = f"{value:.1f}".removesuffix(".0")
    return f"{sign}{text} {unit}"
