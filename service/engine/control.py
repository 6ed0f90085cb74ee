"""Model control, as pure functions the engine calls: which names a mode serves, and the
repository index (Triton's RepositoryIndex) from what is on disk and what the engine holds.

The modes are Triton's (`--model-control-mode`): `poll` serves every model in the repository
and follows it, `none` serves every model found at start and never changes, `explicit` serves
only the models named by `--load-model` and by RepositoryModelLoad, until RepositoryModelUnload.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from service.core import IndexEntry
from service.errors import ConfigError
from service.repository import VersionPolicy

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
EVERY = "*"  # --load-model '*': every model in the repository


def active(mode: str, found: Collection[str], explicit: Collection[str]) -> list[str]:
    """The model names to serve: every one found, or (explicit mode) those asked for."""
    if mode != "explicit":
        return sorted(found)
    return sorted(name for name in found if name in explicit)


def initial(names: Collection[str], found: Collection[str], repository: str) -> set[str]:
    """The models `--load-model` names (EVERY: all); ConfigError for one not in the repository."""
    if EVERY in names:
        return set(found)
    missing = sorted(set(names) - set(found))
    if missing:
        have = ", ".join(sorted(found)) or "none"
        raise ConfigError(
            f"--load-model {', '.join(missing)}: no such model folder in {repository} "
            f"(models there: {have})"
        )
    return set(names)


def index(
    on_disk: Mapping[str, list[int]],
    serving: Collection[str],
    loaded: Mapping[str, Collection[int]],
    changing: Mapping[tuple[str, int], str],
    failed: Mapping[tuple[str, int], str],
    policy: VersionPolicy,
    mode: str,
) -> list[IndexEntry]:
    """One entry per version on disk (and per loaded version gone from it), and one with
    version "" for a model without versions. `serving`: the names the mode serves; `changing`:
    versions LOADING or UNLOADING now; `failed`: versions whose load failed, and why."""
    entries = []
    for name in sorted(set(on_disk) | set(loaded)):
        versions = sorted(set(on_disk.get(name, [])) | set(loaded.get(name, ())))
        if not versions:
            entries.append(IndexEntry(name, "", UNAVAILABLE, "no version folders"))
        for version in versions:
            key = (name, version)
            if version in loaded.get(name, ()):  # serving (a reload too, until it swaps)
                entries.append(IndexEntry(name, str(version), READY))
            elif key in changing:
                entries.append(IndexEntry(name, str(version), changing[key]))
            else:
                why = _why(key, on_disk, serving, failed, policy, mode)
                entries.append(IndexEntry(name, str(version), UNAVAILABLE, why))
    return entries


def _why(
    key: tuple[str, int],
    on_disk: Mapping[str, list[int]],
    serving: Collection[str],
    failed: Mapping[tuple[str, int], str],
    policy: VersionPolicy,
    mode: str,
) -> str:
    name, version = key
    if key in failed:
        return failed[key]
    if name not in serving:
        if mode == "explicit":
            return "unloaded (load it with RepositoryModelLoad)"
        return "appeared after start (--model-control-mode none loads once)"
    if version not in policy.select(on_disk.get(name, [])):
        return f"not in --version-policy {policy}"
    if mode == "explicit":
        return "appeared after the model was loaded (load it again to serve it)"
    if mode == "none":
        return "appeared after start (--model-control-mode none loads once)"
    return "not loaded yet (the next scan loads it)"
