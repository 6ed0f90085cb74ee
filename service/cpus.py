"""How many CPUs this process may really use: what every pool sized "one per core" is sized by.

`os.cpu_count()` counts the machine's cores; inside a container that is the node's (64 on a
64-core node), whatever the pod's CPU limit. The limit is the cgroup's CPU quota: cgroup v2's
`cpu.max` ("QUOTA PERIOD", or "max PERIOD" for none), cgroup v1's `cpu.cfs_quota_us` (-1 for
none) over `cpu.cfs_period_us`, on the process's own cgroup or any ancestor. The answer is the
smallest of the affinity mask (`taskset`, cpusets) and every quota, rounded up, at least 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def available_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """CPUs this process may run on at once: min(affinity, cgroup quota rounded up), >= 1.
    `root` is where the cgroup file systems are mounted, `self_cgroup` the process's
    /proc/self/cgroup (both arguments for tests; a missing file means no limit from it)."""
    cpus = _affinity()
    quota = cgroup_cpu_quota(root, self_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # not Linux


def cgroup_cpu_quota(root: Path, self_cgroup: Path) -> float | None:
    """The tightest CPU quota (in CPUs, e.g. 1.5) of this process's cgroups, v2 or v1; None
    when none is set or none can be read."""
    quotas = [q for d in _cpu_folders(root, self_cgroup) if (q := _quota(d)) is not None]
    return min(quotas, default=None)


def _cpu_folders(root: Path, self_cgroup: Path) -> list[Path]:
    """The cgroup folders whose CPU quota applies to this process: its own and its ancestors',
    in the v2 hierarchy (mounted at `root`) and in v1's cpu controller (at root/cpu,... )."""
    try:
        lines = self_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = ["0::/"]
    folders: list[Path] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if not controllers:  # v2: "0::/path"
            folders += _ancestors(root, path)
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            mount = root / controllers
            folders += _ancestors(mount if mount.is_dir() else root / "cpu", path)
    return folders


def _ancestors(mount: Path, path: str) -> list[Path]:
    """mount/path and each folder above it up to mount itself, those that exist. Inside a
    container the path names the host's hierarchy, which the container sees as its mount."""
    parts = [p for p in path.split("/") if p and p != ".."]
    folders = [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return [folder for folder in folders if folder.is_dir()]


def _quota(folder: Path) -> float | None:
    """The CPU quota set on one cgroup folder, in CPUs; None when unlimited or unreadable."""
    try:
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text(encoding="ascii").split()[:2]
        else:
            quota = (folder / "cpu.cfs_quota_us").read_text(encoding="ascii").strip()
            period = (folder / "cpu.cfs_period_us").read_text(encoding="ascii").strip()
        if quota in ("max", "-1") or int(period) <= 0 or int(quota) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None
