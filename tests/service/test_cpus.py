"""service/cpus.py on fake cgroup folders (no real cgroup needed): v2, v1, nesting, none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.cpus import available_cpus, cgroup_cpu_quota

AFFINITY = len(os.sched_getaffinity(0))


def cgroups(tmp_path: Path, self_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake cgroup mount (`files`: path under it -> content) and /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content)
    (tmp_path / "self").write_text(self_cgroup)
    return root, tmp_path / "self"


@pytest.mark.parametrize(
    ("self_cgroup", "files", "quota"),
    [
        # cgroup v2 in a container (its own namespace): the pod's limit of 1.5 CPUs
        ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
        # v2 without a namespace: the tightest of the cgroup and its ancestors
        ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "max 100000\n",
                                    "kubepods/pod1/cpu.max": "400000 100000\n",
                                    "kubepods/cpu.max": "800000 100000\n"}, 4.0),
        # v1 (cpu and cpuacct mounted together); the host's path is not visible inside
        ("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
         {"cpu,cpuacct/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
         2.5),
        # v1 with the cpu controller mounted alone, limited on the job's own cgroup
        ("3:cpu:/batch/job\n", {"cpu/batch/job/cpu.cfs_quota_us": "50000\n",
                                "cpu/batch/job/cpu.cfs_period_us": "100000\n",
                                "cpu/cpu.cfs_quota_us": "-1\n",
                                "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        # no limit anywhere, in either version
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                               "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
        # unreadable or odd files are no limit, not an error
        ("0::/\n", {"cpu.max": "lots\n"}, None),
        ("0::/\n", {}, None),
    ],
)  # fmt: skip
def test_the_cgroup_quota_is_read_from_v2_and_v1(tmp_path, self_cgroup, files, quota):
    root, self_file = cgroups(tmp_path, self_cgroup, files)
    assert cgroup_cpu_quota(root, self_file) == quota


def test_available_cpus_is_the_quota_rounded_up_within_the_affinity(tmp_path):
    root, self_file = cgroups(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert available_cpus(root, self_file) == min(AFFINITY, 2)
    (root / "cpu.max").write_text("10000 100000\n")  # a tenth of a CPU: still one thread
    assert available_cpus(root, self_file) == 1
    (root / "cpu.max").write_text(f"{(AFFINITY + 8) * 100000} 100000\n")  # above the mask
    assert available_cpus(root, self_file) == AFFINITY


def test_without_proc_self_cgroup_the_mount_itself_is_read(tmp_path):
    root, _ = cgroups(tmp_path, "", {"cpu.max": "100000 100000\n"})
    assert cgroup_cpu_quota(root, tmp_path / "missing") == 1.0
    assert available_cpus(tmp_path / "no-cgroup", tmp_path / "missing") == AFFINITY
