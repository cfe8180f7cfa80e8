"""Memory probes: cgroup files in a tmp dir, a scripted NVML module, size strings. No machine reads."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from parallama.memory.probes import (
    GiB,
    GpuDevice,
    KiB,
    MemoryReading,
    MiB,
    ScriptedProbe,
    SystemProbe,
    format_size,
    parse_size,
    read_gpus,
)

HOST = (20 * GiB, 24 * GiB)  # (available, total) the fake host reports


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def probe(root: Path, proc: Path | None = None, nvml: object = None, env: dict[str, str] | None = None) -> SystemProbe:
    return SystemProbe(cgroup_root=root, nvml=nvml, proc_cgroup=proc, host=lambda: HOST, environ=env or {})


# --- host free and cgroups -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("available", "limit", "usage", "expected"),
    [
        (20 * GiB, None, None, 20 * GiB),  # no container limit: the host's figure
        (20 * GiB, 4 * GiB, GiB, 3 * GiB),  # a limit below the host: limit - usage
        (2 * GiB, 8 * GiB, GiB, 2 * GiB),  # the host is tighter than the limit
        (20 * GiB, 4 * GiB, None, 4 * GiB),  # usage unknown: the whole limit
        (20 * GiB, 4 * GiB, 5 * GiB, 0),  # over the limit: nothing, never negative
    ],
)
def test_host_free_is_the_tighter_of_host_and_cgroup(available, limit, usage, expected):
    reading = MemoryReading(available, 24 * GiB, limit, usage)
    assert reading.host_free == expected


def test_host_limit_and_gpu_sums():
    gpus = (GpuDevice(0, "a", 10 * GiB, 16 * GiB), GpuDevice(1, "b", 5 * GiB, 8 * GiB))
    reading = MemoryReading(20 * GiB, 24 * GiB, 6 * GiB, 0, gpus)
    assert reading.host_limit == 6 * GiB
    assert MemoryReading(20 * GiB, 24 * GiB).host_limit == 24 * GiB
    assert (reading.gpu_free, reading.gpu_total) == (15 * GiB, 24 * GiB)


def test_cgroup_v2_limit_wins_over_host_ram(tmp_path):
    write(tmp_path, {"memory.max": str(4 * GiB), "memory.current": str(GiB), "memory.stat": "anon 1\ninactive_file 0"})
    reading = probe(tmp_path).read()
    assert (reading.cgroup_limit, reading.cgroup_usage) == (4 * GiB, GiB)
    assert reading.host_available == 20 * GiB
    assert reading.host_free == 3 * GiB


def test_cgroup_v2_max_means_no_limit(tmp_path):
    write(tmp_path, {"memory.max": "max", "memory.current": str(GiB)})
    reading = probe(tmp_path).read()
    assert reading.cgroup_limit is None
    assert reading.host_free == 20 * GiB


def test_cgroup_usage_leaves_out_inactive_page_cache(tmp_path):
    stat = f"anon {GiB}\nfile {2 * GiB}\nactive_file {GiB}\ninactive_file {GiB}\n"
    write(tmp_path, {"memory.max": str(4 * GiB), "memory.current": str(3 * GiB), "memory.stat": stat})
    reading = probe(tmp_path).read()
    assert reading.cgroup_usage == 2 * GiB
    assert reading.host_free == 2 * GiB


def test_cgroup_v1_fallback(tmp_path):
    write(
        tmp_path,
        {
            "memory/memory.limit_in_bytes": str(6 * GiB),
            "memory/memory.usage_in_bytes": str(2 * GiB),
            "memory/memory.stat": f"cache {GiB}\ntotal_inactive_file {512 * MiB}",
        },
    )
    reading = probe(tmp_path).read()
    assert reading.cgroup_limit == 6 * GiB
    assert reading.cgroup_usage == 2 * GiB - 512 * MiB
    assert reading.host_free == 4 * GiB + 512 * MiB


def test_cgroup_v1_huge_value_means_no_limit(tmp_path):
    write(tmp_path, {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "100"})
    reading = probe(tmp_path).read()
    assert reading.cgroup_limit is None
    assert reading.host_free == 20 * GiB


def test_no_cgroup_files_means_no_limit(tmp_path):
    reading = probe(tmp_path).read()
    assert (reading.cgroup_limit, reading.cgroup_usage) == (None, None)
    assert reading.host_free == 20 * GiB


def test_unreadable_cgroup_values_count_as_absent(tmp_path):
    write(tmp_path, {"memory.max": "lots", "memory.current": ""})
    reading = probe(tmp_path).read()
    assert (reading.cgroup_limit, reading.cgroup_usage) == (None, None)


def test_v2_limit_on_own_group_found_through_proc_self_cgroup(tmp_path):
    # Outside a cgroup namespace (a systemd slice with MemoryMax=) the limit sits on the process's group.
    write(tmp_path, {"cgroup.controllers": "memory", "app.slice/run.scope/memory.max": str(3 * GiB)})
    write(tmp_path, {"app.slice/run.scope/memory.current": str(GiB), "app.slice/memory.max": "max"})
    proc = write(tmp_path, {"proc_cgroup": "0::/app.slice/run.scope"}) / "proc_cgroup"
    reading = probe(tmp_path, proc).read()
    assert (reading.cgroup_limit, reading.cgroup_usage) == (3 * GiB, GiB)
    assert reading.host_free == 2 * GiB


def test_tightest_ancestor_wins(tmp_path):
    write(tmp_path, {"cgroup.controllers": "memory"})
    write(tmp_path, {"parent/memory.max": str(2 * GiB), "parent/memory.current": str(GiB + 512 * MiB)})
    write(tmp_path, {"parent/child/memory.max": str(8 * GiB), "parent/child/memory.current": str(GiB)})
    proc = write(tmp_path, {"proc_cgroup": "0::/parent/child"}) / "proc_cgroup"
    reading = probe(tmp_path, proc).read()
    assert reading.cgroup_limit == 2 * GiB
    assert reading.host_free == 512 * MiB


def test_v1_group_path_comes_from_the_memory_line(tmp_path):
    group = "memory/docker/abc"
    write(tmp_path, {f"{group}/memory.limit_in_bytes": str(GiB), f"{group}/memory.usage_in_bytes": "0"})
    proc = write(tmp_path, {"proc_cgroup": "5:cpu,cpuacct:/other\n4:memory:/docker/abc\n0::/"}) / "proc_cgroup"
    assert probe(tmp_path, proc).read().cgroup_limit == GiB


def test_group_missing_under_the_mount_falls_back_to_the_root(tmp_path):
    # A container without its own cgroup namespace sees its group's path but has it mounted at the root.
    write(tmp_path, {"memory.max": str(2 * GiB), "memory.current": "0"})
    proc = write(tmp_path, {"proc_cgroup": "0::/docker/abc"}) / "proc_cgroup"
    assert probe(tmp_path, proc).read().cgroup_limit == 2 * GiB


# --- GPUs ----------------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """A scripted pynvml: the calls SystemProbe makes, over a list of (name, uuid, free, total)."""

    def __init__(self, devices, init_error: Exception | None = None, memory_error: Exception | None = None):
        self.devices = devices
        self.init_error = init_error
        self.memory_error = memory_error
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self):
        self.inits += 1
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for index, device in enumerate(self.devices):
            if device[1] == uuid:
                return index
        raise FakeNVMLError("not found")

    def nvmlDeviceGetUUID(self, handle):
        return self.devices[handle][1]

    def nvmlDeviceGetIndex(self, handle):
        return handle

    def nvmlDeviceGetName(self, handle):
        return self.devices[handle][0]

    def nvmlDeviceGetMemoryInfo(self, handle):
        if self.memory_error:
            raise self.memory_error
        _, _, free, total = self.devices[handle]
        return SimpleNamespace(free=free, total=total, used=total - free)


TWO_GPUS = [
    ("NVIDIA H100", "GPU-aaaa1111-0000", 70 * GiB, 80 * GiB),
    (b"NVIDIA L4", "GPU-bbbb2222-0000", 20 * GiB, 24 * GiB),  # old nvidia-ml-py returned bytes
]
H100 = GpuDevice(0, "NVIDIA H100", 70 * GiB, 80 * GiB)
L4 = GpuDevice(1, "NVIDIA L4", 20 * GiB, 24 * GiB)


def test_fake_nvml_with_two_devices_reads_both(tmp_path):
    nvml = FakeNvml(TWO_GPUS)
    reading = probe(tmp_path, nvml=nvml).read()
    assert reading.gpus == (H100, L4)
    assert reading.gpu_free == 90 * GiB


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("1", (L4,)),
        ("0", (H100,)),
        ("", ()),  # empty: CUDA sees no device
        ("1,0", (L4, H100)),  # CUDA's order is the variable's order
        (" 0 , 1 ", (H100, L4)),
        ("0,7,1", (H100,)),  # an index that names no device hides it and everything after it
        ("-1", ()),
        ("GPU-bbbb2222-0000", (L4,)),  # a full UUID
        ("GPU-bbbb", (L4,)),  # a unique UUID prefix
        ("GPU-", ()),  # an ambiguous prefix names no device
        ("MIG-nope", ()),
        ("nonsense", ()),
    ],
)
def test_cuda_visible_devices_filters_gpus(tmp_path, visible, expected):
    reading = probe(tmp_path, nvml=FakeNvml(TWO_GPUS), env={"CUDA_VISIBLE_DEVICES": visible}).read()
    assert reading.gpus == expected


def test_cuda_visible_devices_read_from_the_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    system = SystemProbe(cgroup_root=tmp_path, nvml=FakeNvml(TWO_GPUS), proc_cgroup=None, host=lambda: HOST)
    assert system.read().gpus == (L4,)


def test_pynvml_missing_means_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    system = SystemProbe(cgroup_root=tmp_path, proc_cgroup=None, host=lambda: HOST, environ={})
    reading = system.read()
    assert reading.gpus == ()
    assert reading.host_free == 20 * GiB


def test_nvml_init_failure_means_no_gpu_and_is_tried_once(tmp_path):
    nvml = FakeNvml(TWO_GPUS, init_error=FakeNVMLError("Driver Not Loaded"))
    system = probe(tmp_path, nvml=nvml)
    assert system.read().gpus == ()
    assert system.read().gpus == ()
    assert nvml.inits == 1


def test_nvml_failing_during_a_read_means_no_gpu(tmp_path):
    nvml = FakeNvml(TWO_GPUS, memory_error=FakeNVMLError("GPU is lost"))
    assert probe(tmp_path, nvml=nvml).read().gpus == ()


def test_real_pynvml_never_raises():
    # Whatever this machine has (no driver here: pynvml.NVMLError_LibraryNotFound), reading is safe.
    gpus = SystemProbe(host=lambda: HOST, environ={}).read().gpus
    assert isinstance(gpus, tuple)
    assert all(isinstance(gpu, GpuDevice) and 0 <= gpu.free <= gpu.total for gpu in gpus)


def test_nvml_initialised_once_and_shut_down_on_close(tmp_path):
    nvml = FakeNvml(TWO_GPUS)
    system = probe(tmp_path, nvml=nvml)
    system.read()
    system.read()
    system.close()
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_read_gpus_without_a_module():
    assert read_gpus(None, None) == ()


# --- scripted readings ---------------------------------------------------------------------------

LOW = MemoryReading(GiB, 24 * GiB)
HIGH = MemoryReading(20 * GiB, 24 * GiB)


def test_scripted_probe_fixed_reading_and_setter():
    scripted = ScriptedProbe(HIGH)
    assert scripted.read() == HIGH
    scripted.reading = LOW
    assert scripted.read() == LOW
    assert scripted.reads == 2


def test_scripted_probe_plays_a_list_then_repeats_the_last():
    scripted = ScriptedProbe([HIGH, LOW])
    assert [scripted.read() for _ in range(4)] == [HIGH, LOW, LOW, LOW]


def test_scripted_probe_calls_a_callable():
    readings = iter([LOW, HIGH])
    scripted = ScriptedProbe(lambda: next(readings))
    assert (scripted.read(), scripted.read()) == (LOW, HIGH)


def test_scripted_probe_setter_from_another_thread():
    scripted = ScriptedProbe(HIGH)
    thread = threading.Thread(target=lambda: setattr(scripted, "reading", LOW))
    thread.start()
    thread.join()
    assert scripted.read() == LOW


def test_scripted_probe_needs_a_reading():
    with pytest.raises(ValueError):
        ScriptedProbe([])


# --- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("0", 0),
        ("512B", 512),
        ("2GiB", 2 * GiB),
        ("2gib", 2 * GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("1.5 GiB", 3 * GiB // 2),
        (" 48MiB ", 48 * MiB),
        ("4KiB", 4 * KiB),
        ("1TiB", 1024**4),
        ("2GB", 2_000_000_000),
        ("1.1GB", 1_100_000_000),
        ("3kb", 3000),
        ("5MB", 5_000_000),
        ("1TB", 10**12),
        ("4g", 4 * GiB),
        ("4G", 4 * GiB),
        ("512m", 512 * MiB),
        ("8K", 8 * KiB),
        ("1T", 1024**4),
        (".5K", 512),
        ("1.5", 1),  # fractions of a byte round down
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "abc", "-1", "-1GiB", "1 XB", "1e3", "1,000", "2 GiB extra", "1..5G", -5])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_parse_size_error_says_what_is_accepted():
    with pytest.raises(ValueError) as info:
        parse_size("lots")
    assert "'lots'" in str(info.value) and "GiB" in str(info.value)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (48 * MiB, "48 MiB"),
        (int(98.25 * MiB), "98.2 MiB"),
        (int(21.3 * GiB), "21.3 GiB"),
        (2 * GiB, "2 GiB"),
        (MiB - 1, "1 MiB"),  # 1023.999 KiB rounds into the next unit, not "1024 KiB"
        (3 * 1024**4, "3 TiB"),
        (2048 * 1024**4, "2048 TiB"),
        (-2 * GiB, "-2 GiB"),
    ],
)
def test_format_size(n, expected):
    assert format_size(n) == expected


@pytest.mark.parametrize("n", [0, 1, 1000, 48 * MiB, 3 * GiB // 2, 7 * 1024**4])
def test_format_then_parse_round_trips_within_a_rounding_step(n):
    back = parse_size(format_size(n).replace(" ", ""))
    assert abs(back - n) <= max(1, n // 20)
