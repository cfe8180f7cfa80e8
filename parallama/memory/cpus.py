"""How many CPU threads this process should decode with: the cores it may really use, not the host's.

A container sees every core of its host in /proc/cpuinfo, but it may be pinned to a few of them
(``docker run --cpuset-cpus``: the CPU affinity mask) or given a share of CPU time (``--cpus``: the
cgroup's CPU quota, v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``). llama.cpp's
threads wait for each other at every step, so one thread more than the quota allows stalls them all
while the kernel throttles it. The default is therefore the physical cores among the CPUs this process
may run on (hyperthreads do not speed up llama.cpp), at most the whole CPUs the quota grants, at least 1.

Every source is injectable (the cgroup root, /proc/self/cgroup, the sysfs CPU topology, the affinity)
so tests fake them. Reading never raises: a source that cannot be read counts as "no limit".
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from parallama.memory.probes import _group_dirs, _own_group

log = logging.getLogger(__name__)

_V1_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")  # v1 mounts the cpu controller alone or with cpuacct


@dataclass(frozen=True, slots=True)
class CpuReading:
    allowed: int  # logical CPUs in this process's affinity mask
    cores: int | None = None  # physical cores among them; None: the topology could not be read
    quota: float | None = None  # CPUs' worth of time the cgroup grants per period; None: no quota

    @property
    def threads(self) -> int:
        """Physical cores this process may run on, at most the whole CPUs of the quota, at least 1."""
        n = min(self.cores or self.allowed, self.allowed)
        if self.quota is not None:
            n = min(n, math.floor(self.quota))
        return max(1, n)

    def describe(self) -> str:
        cores = "" if self.cores is None else f", {self.cores} physical cores"
        quota = "" if self.quota is None else f", CPU quota {self.quota:g}"
        return f"{self.allowed} CPUs allowed{cores}{quota}"


# --- the cgroup CPU quota ------------------------------------------------------------------------


def _v2_quota(group: Path) -> float | None:
    """``cpu.max`` is "QUOTA PERIOD" in microseconds, or "max PERIOD" for no quota."""
    try:
        fields = (group / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1], group / "cpu.max")


def _v1_quota(group: Path) -> float | None:
    """``cpu.cfs_quota_us`` is -1 for no quota; ``cpu.cfs_period_us`` the period it applies to."""
    try:
        quota = (group / "cpu.cfs_quota_us").read_text().strip()
        period = (group / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period, group / "cpu.cfs_quota_us")


def _ratio(quota: str, period: str, path: Path) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        log.debug("unexpected content in %s: %r / %r", path, quota[:40], period[:40])
        return None
    return q / p if q > 0 and p > 0 else None


def read_cpu_quota(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path | None = "/proc/self/cgroup") -> float | None:
    """The tightest CPU quota on this process's cgroup or any ancestor, in CPUs (1.5 = one and a half
    CPUs' time per period); None when no group on the way sets one. v2 when the mount root is v2,
    else v1 under ``root/cpu`` (or ``cpu,cpuacct``)."""
    root = Path(root)
    proc = None if proc_cgroup is None else Path(proc_cgroup)
    v2 = (root / "cgroup.controllers").exists() or (root / "cpu.max").exists()
    if v2:
        bases, read = [root], _v2_quota
    else:
        bases, read = [root / name for name in _V1_MOUNTS if (root / name).is_dir()][:1], _v1_quota
    quotas = [q for base in bases for group in _group_dirs(base, _own_group(proc, v2, "cpu"))
              if (q := read(group)) is not None]
    return min(quotas, default=None)


# --- affinity and topology -----------------------------------------------------------------------


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: Iterable[int], sys_cpu: str | Path = "/sys/devices/system/cpu") -> int | None:
    """Distinct physical cores among these logical CPUs, from sysfs topology (two hyperthreads of one
    core count once); None when the topology cannot be read."""
    cores = set()
    for cpu in cpus:
        topology = Path(sys_cpu) / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return None
        cores.add((package, core))
    return len(cores) or None


def _psutil_cores(allowed: int) -> int | None:
    try:
        import psutil

        return min(psutil.cpu_count(logical=False) or allowed, allowed)
    except Exception:
        return None


def read_cpus(
    cgroup_root: str | Path = "/sys/fs/cgroup",
    proc_cgroup: str | Path | None = "/proc/self/cgroup",
    sys_cpu: str | Path = "/sys/devices/system/cpu",
    affinity: Iterable[int] | None = None,
) -> CpuReading:
    cpus = set(_affinity() if affinity is None else affinity)
    allowed = max(1, len(cpus))
    cores = physical_cores(cpus, sys_cpu)
    if cores is None:
        cores = _psutil_cores(allowed)  # no sysfs topology (not Linux, a masked /sys): the host's count
    return CpuReading(allowed, cores, read_cpu_quota(cgroup_root, proc_cgroup))


def default_threads(**sources: object) -> int:
    """``--threads`` when not given: see the module's docstring. Never raises."""
    try:
        return read_cpus(**sources).threads  # type: ignore[arg-type]
    except Exception as exc:
        log.warning("could not read the CPUs this process may use (%s); using 1 thread per CPU", exc)
        return os.cpu_count() or 1
