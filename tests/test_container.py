"""Inside a container: threads from the CPUs it may use, a reserve scaled to its memory, and the image's
files agreeing with each other (drain vs stop grace, health check vs port, published on loopback).

cgroup and sysfs files are faked in a tmp dir, as tests/test_memory.py does for memory. No Docker here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from parallama.memory.cpus import CpuReading, default_threads, physical_cores, read_cpu_quota, read_cpus
from parallama.memory.probes import GiB, MiB, MemoryReading, auto_reserve
from parallama.server import serve
from parallama.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def topology(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    """sysfs CPU topology: logical cpu -> (package, core)."""
    for cpu, (package, core) in cores.items():
        write(root, {f"cpu{cpu}/topology/physical_package_id": f"{package}\n", f"cpu{cpu}/topology/core_id": f"{core}\n"})
    return root


# 8 logical CPUs: 4 cores with two hyperthreads each (cpu N and N+4 share core N), as Linux numbers them.
HT_HOST = {cpu: (0, cpu % 4) for cpu in range(8)}


# --- the cgroup CPU quota ----------------------------------------------------------------------------


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("max 100000\n", None),  # docker run without --cpus
    ("150000 100000\n", 1.5),  # --cpus 1.5
    ("200000 100000\n", 2.0),
    ("50000 100000\n", 0.5),
    ("lots\n", None),
    ("", None),
])
def test_cgroup_v2_cpu_max(tmp_path, cpu_max, expected):
    write(tmp_path, {"cgroup.controllers": "cpu memory", "cpu.max": cpu_max})
    assert read_cpu_quota(tmp_path, None) == expected


def test_cgroup_v2_tightest_quota_on_the_way_up_wins(tmp_path):
    # Outside a cgroup namespace (a systemd slice with CPUQuota=) the quota may sit on an ancestor.
    write(tmp_path, {"cgroup.controllers": "cpu", "cpu.max": "max 100000"})
    write(tmp_path, {"app.slice/cpu.max": "300000 100000", "app.slice/run.scope/cpu.max": "max 100000"})
    proc = write(tmp_path, {"proc_cgroup": "0::/app.slice/run.scope\n"}) / "proc_cgroup"
    assert read_cpu_quota(tmp_path, proc) == 3.0


@pytest.mark.parametrize("mount", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_cfs_quota_and_period(tmp_path, mount):
    write(tmp_path, {f"{mount}/cpu.cfs_quota_us": "250000\n", f"{mount}/cpu.cfs_period_us": "100000\n"})
    assert read_cpu_quota(tmp_path, None) == 2.5


def test_cgroup_v1_quota_minus_one_means_none(tmp_path):
    write(tmp_path, {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert read_cpu_quota(tmp_path, None) is None


def test_cgroup_v1_group_path_comes_from_the_cpu_line(tmp_path):
    # Docker on cgroup v1 without a cgroup namespace: the group's path, under each controller's mount.
    write(tmp_path, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    write(tmp_path, {"cpu/docker/abc/cpu.cfs_quota_us": "100000", "cpu/docker/abc/cpu.cfs_period_us": "100000"})
    proc = write(tmp_path, {"proc_cgroup": "4:memory:/other\n2:cpu,cpuacct:/docker/abc\n0::/\n"}) / "proc_cgroup"
    assert read_cpu_quota(tmp_path, proc) == 1.0


def test_cgroup_v1_group_missing_under_the_mount_falls_back_to_the_root(tmp_path):
    # The container sees its group's full path in /proc/self/cgroup but has that group mounted at the root.
    write(tmp_path, {"cpu/cpu.cfs_quota_us": "150000", "cpu/cpu.cfs_period_us": "100000"})
    proc = write(tmp_path, {"proc_cgroup": "1:cpu:/libpod_parent/libpod-abc\n"}) / "proc_cgroup"
    assert read_cpu_quota(tmp_path, proc) == 1.5


def test_no_cgroup_files_means_no_quota(tmp_path):
    assert read_cpu_quota(tmp_path, tmp_path / "missing") is None


# --- affinity, topology and the thread count ---------------------------------------------------------


def test_hyperthreads_of_one_core_count_once(tmp_path):
    sys_cpu = topology(tmp_path, HT_HOST)
    assert physical_cores(range(8), sys_cpu) == 4
    assert physical_cores({0, 4}, sys_cpu) == 1  # both hyperthreads of core 0
    assert physical_cores({0, 1, 2}, sys_cpu) == 3
    assert physical_cores({0, 9}, sys_cpu) is None  # cpu9 has no topology: unknown, not a guess


def test_two_packages_with_the_same_core_ids_are_different_cores(tmp_path):
    sys_cpu = topology(tmp_path, {0: (0, 0), 1: (1, 0)})
    assert physical_cores({0, 1}, sys_cpu) == 2


@pytest.mark.parametrize(("reading", "threads"), [
    (CpuReading(allowed=8, cores=4), 4),  # no limit: physical cores, not hyperthreads
    (CpuReading(allowed=8, cores=None), 8),  # topology unknown: every allowed CPU
    (CpuReading(allowed=2, cores=2), 2),  # --cpuset-cpus 0,1
    (CpuReading(allowed=8, cores=4, quota=2.0), 2),  # --cpus 2
    (CpuReading(allowed=8, cores=4, quota=1.5), 1),  # a thread more than the quota stalls them all
    (CpuReading(allowed=8, cores=4, quota=0.5), 1),  # at least one
    (CpuReading(allowed=8, cores=4, quota=16.0), 4),  # a quota above the cores changes nothing
    (CpuReading(allowed=1, cores=None, quota=None), 1),
])
def test_threads(reading, threads):
    assert reading.threads == threads


def test_read_cpus_combines_affinity_topology_and_quota(tmp_path):
    sys_cpu = topology(tmp_path / "sys", HT_HOST)
    cgroup = write(tmp_path / "cg", {"cgroup.controllers": "cpu", "cpu.max": "300000 100000"})
    reading = read_cpus(cgroup, None, sys_cpu, affinity={0, 1, 2, 4, 5, 6})  # --cpuset-cpus 0-2,4-6
    assert (reading.allowed, reading.cores, reading.quota) == (6, 3, 3.0)
    assert reading.threads == 3
    assert "6 CPUs allowed, 3 physical cores, CPU quota 3" == reading.describe()
    assert default_threads(cgroup_root=cgroup, proc_cgroup=None, sys_cpu=sys_cpu, affinity={0, 4}) == 1


def test_read_cpus_without_topology_caps_at_the_host_cores(tmp_path):
    import psutil

    host_cores = psutil.cpu_count(logical=False) or 1
    reading = read_cpus(tmp_path, None, tmp_path / "no-sysfs", affinity=range(host_cores * 2))
    assert reading.cores == host_cores and reading.threads == host_cores


def test_this_machine_gets_at_least_one_thread_and_at_most_its_cpus():
    import os

    assert 1 <= default_threads() <= (os.cpu_count() or 1)


# --- the default memory reserve ----------------------------------------------------------------------


@pytest.mark.parametrize(("total", "limit", "reserve"), [
    (64 * GiB, None, GiB),  # a workstation keeps 1 GiB back, as before
    (8 * GiB, None, 8 * GiB // 10),  # a small machine a tenth
    (64 * GiB, GiB, GiB // 10),  # a 1 GiB container on a big host: about 100 MiB
    (64 * GiB, 4 * GiB, 4 * GiB // 10),
    (2 * GiB, 32 * GiB, 2 * GiB // 10),  # a limit above the RAM counts the RAM
])
def test_auto_reserve_is_the_smaller_of_1_gib_and_a_tenth_of_the_memory_there_is(total, limit, reserve):
    assert auto_reserve(MemoryReading(total // 2, total, limit, 0 if limit else None)) == reserve


def test_memory_reserve_defaults_to_auto_and_explicit_sizes_still_work(monkeypatch):
    monkeypatch.delenv("PARALLAMA_MEMORY_RESERVE", raising=False)
    assert Settings().memory_reserve == "auto" and Settings().reserve_bytes is None
    assert Settings(memory_reserve="AUTO").reserve_bytes is None
    assert Settings(memory_reserve="2GiB").reserve_bytes == 2 * GiB
    assert Settings(memory_reserve="512MiB").reserve_bytes == 512 * MiB
    with pytest.raises(ValueError):
        Settings(memory_reserve="plenty")


def test_cli_help_says_auto_for_the_reserve():
    from parallama.server.cli import build_parser

    serve_parser = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert "default auto" in serve_parser.format_help()


@pytest.mark.model
def test_a_1_gib_container_serves_the_embedded_model(llama_model):
    """Sized the way runtime.build sizes it, with a 1 GiB cgroup limit of which the Python process
    already uses 200 MiB: the old fixed 1 GiB reserve left nothing; auto leaves room for sequences."""
    from parallama.server.runtime import size

    reading = MemoryReading(host_available=60 * GiB, host_total=64 * GiB, cgroup_limit=GiB,
                            cgroup_usage=200 * MiB)
    plan = size(Settings(), llama_model, 0, reading)
    assert plan.reserve_bytes == GiB // 10
    assert plan.parallel >= 1 and plan.kv_cells >= Settings().ctx_size
    with pytest.raises(ValueError, match="reserve"):
        size(Settings(memory_reserve="1GiB"), llama_model, 0, reading)


# --- the image's files agree with each other ---------------------------------------------------------


def dockerfile(name: str = "Dockerfile") -> str:
    return (ROOT / "docker" / name).read_text()


def image_env(text: str) -> dict[str, str]:
    env = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.MULTILINE):
        env.update(re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", block.replace("\\\n", " ")))
    return {k: v.strip('"') for k, v in env.items()}


CLOSE_MARGIN_S = serve.FLUSH_SECONDS  # after the drain: what is left ends with an error, then the exit


def test_the_image_drains_within_dockers_default_10_s_stop_grace():
    timeout = float(image_env(dockerfile())["PARALLAMA_SHUTDOWN_TIMEOUT"])
    assert timeout + CLOSE_MARGIN_S < 10  # `docker stop` sends SIGKILL after 10 s by default


def test_compose_stop_grace_covers_its_drain():
    compose = "\n".join(line.split("#", 1)[0] for line in (ROOT / "docker" / "compose.yaml").read_text().splitlines())
    grace = float(re.search(r"stop_grace_period:\s*(\d+)s", compose).group(1))
    drain = re.search(r"PARALLAMA_SHUTDOWN_TIMEOUT:\s*\"?(\d+)", compose)
    timeout = float(drain.group(1)) if drain else float(image_env(dockerfile())["PARALLAMA_SHUTDOWN_TIMEOUT"])
    assert timeout + CLOSE_MARGIN_S < grace
    # old podman-compose passes "${VAR:-}" through literally: the API key would be that string
    assert ":-" not in compose


def test_readme_docker_runs_publish_on_loopback_with_a_stop_timeout():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Docker", 1)[1].split("\n## ", 1)[0]
    runs = [line for line in section.splitlines() if line.lstrip().startswith("docker run")]
    assert runs
    for line in runs:
        assert "-p 127.0.0.1:" in line, line
    assert "--stop-timeout" in section


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_build_llama_cpp_portably_and_check_health_on_the_configured_port(name):
    text = dockerfile(name)
    assert "-DGGML_NATIVE=OFF" in text and "-DGGML_BACKEND_DL=ON" in text and "-DGGML_CPU_ALL_VARIANTS=ON" in text
    health = re.search(r"^HEALTHCHECK (?:.*\\\n)*.*", text, re.MULTILINE).group(0)
    assert "PARALLAMA_PORT" in health and "8000/" not in health
    for line in text.splitlines():
        if line.startswith("#") and "docker run" in line and " -p " in line:
            assert "-p 127.0.0.1:" in line, line
    assert "PARALLAMA_SHUTDOWN_TIMEOUT=8" in text


def test_cpu_image_base_is_pinned_and_dependencies_constrained():
    text = dockerfile()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim-bookworm", text, re.MULTILINE)
    assert "/wheels" not in text  # the venv is copied whole: no wheel layer left behind
    pins = (ROOT / "docker" / "constraints.txt").read_text()
    for name in ("llama-cpp-python", "fastapi", "uvicorn", "pydantic", "pydantic-settings", "psutil"):
        assert re.search(rf"^{name}==\S+$", pins, re.MULTILINE | re.IGNORECASE), name


def test_dockerignore_keeps_the_build_context_small():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "**/__pycache__", "tests", "bench"):
        assert entry in ignored, entry
