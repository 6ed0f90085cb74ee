"""Which files a scoring job scores: a stable, loop-safe walk of the input folder.

Every file whose name ends in an image extension (any case) is an `Item` and gets exactly one
row; other files are counted as skipped. Symbolic links are followed (a link to a folder is
walked once: a loop or a second link to the same folder is not entered again). The walk only
reads: nothing in the input tree is ever created, changed or removed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imaging import policy

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = policy.IMAGE_EXTENSIONS  # the names training takes for images too


@dataclass(frozen=True)
class Item:
    key: str  # the path relative to the input folder, "/"-separated: the row's `path`
    path: str  # where to read it (absolute)
    folder: str  # the name of the folder holding it ("" at the top)
    linked: bool = False  # reached through a symbolic link (its path is not its real path)


@dataclass
class Walk:
    items: list[Item] = field(default_factory=list)
    skipped: int = 0  # files not named like images
    unreadable_folders: list[str] = field(default_factory=list)  # keys; "." for the top


def walk(root: Path, recursive: bool = True) -> Walk:
    """Every file under `root` in a stable order: the real folders first (names sorted by code
    point, depth first), then folders reached only through links, in the order the links were
    met. A folder is walked once, under its real path when it has one."""
    found = Walk()
    top = os.stat(root)
    seen = {(top.st_dev, top.st_ino)}
    links: list[tuple[str, tuple[str, ...]]] = []
    _walk(str(root.resolve()), (), recursive, seen, links, found, linked=False)
    while links:  # each may hold more links
        path, parts = links.pop(0)
        try:
            stat = os.stat(path)
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            log.info("not entering %s again (a link to a folder already walked)", path)
            continue
        seen.add((stat.st_dev, stat.st_ino))
        _walk(path, parts, recursive, seen, links, found, linked=True)
    return found


def _walk(
    folder: str,
    parts: tuple[str, ...],
    recursive: bool,
    seen: set[tuple[int, int]],
    links: list[tuple[str, tuple[str, ...]]],
    found: Walk,
    linked: bool,
) -> None:
    """Depth first without recursion (a tree may be deeper than Python's stack): a stack of
    the folders being listed, each with its remaining entries."""
    stack = [(parts, _entries(folder, parts, found))]
    while stack:
        where, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
        elif _is_folder(entry):
            if not recursive:
                continue
            if entry.is_symlink():
                links.append((entry.path, (*where, entry.name)))
                continue
            stat = entry.stat()
            if (stat.st_dev, stat.st_ino) in seen:  # already walked through a link
                continue
            seen.add((stat.st_dev, stat.st_ino))
            inner = (*where, entry.name)
            stack.append((inner, _entries(entry.path, inner, found)))
        elif is_image_name(entry.name):
            key = _key((*where, entry.name))
            link = linked or entry.is_symlink()
            found.items.append(Item(key, entry.path, _key(where[-1:]), link))
        else:
            found.skipped += 1


def under(folders: list[str]) -> tuple[str, ...]:
    """Key prefixes of the files under `folders` (keys as in `Walk.unreadable_folders`), for
    `key.startswith(...)`."""
    return tuple("" if folder == "." else f"{folder}/" for folder in folders)


def is_image_name(name: str) -> bool:
    """Named like an image: an image extension in any case (".png" alone counts too)."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def changed_since(path: str, ns: int) -> bool:
    """Whether the file, or the link naming it, changed after `ns` (time.time_ns()): its
    status-change time, which every write, rename, chmod or re-link moves to "now" and which,
    unlike the modification time, no one can set back. A file that cannot be looked at counts
    as changed."""
    try:
        return max(os.lstat(path).st_ctime_ns, os.stat(path).st_ctime_ns) > ns
    except OSError:
        return True


def _entries(folder: str, parts: tuple[str, ...], found: Walk) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(folder) as scan:
            return iter(sorted(scan, key=lambda e: e.name))
    except OSError as exc:
        log.warning("cannot list %s: %s", folder, exc.strerror)
        found.unreadable_folders.append(_key(parts) or ".")
        return iter(())


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links; a broken link is a file (an error row if named .png)
    except OSError:
        return False


def _key(parts: tuple[str, ...]) -> str:
    return "/".join(_name(p) for p in parts)


def _name(name: str) -> str:
    """A file name as the table shows it: valid UTF-8 as is; a byte that is not valid UTF-8 as
    \\xNN, and so a literal backslash as \\\\ (two names can never show the same). Parquet
    strings are UTF-8, and a resumed run must find the same key."""
    if name.isascii() and "\\" not in name:
        return name
    return "".join(
        "\\\\" if c == "\\" else f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else c
        for c in name
    )


def _normal(name: str) -> str:
    return re.sub(r"[\W_]+", "", name.casefold())


def label_matcher(labels: tuple[str, ...]) -> dict[str, str]:
    """{normalised folder name: label}: a folder named like a class, ignoring case and
    punctuation ("T-shirt-top" and "t_shirt top" both name "T-shirt/top")."""
    matcher: dict[str, str] = {}
    for label in labels:
        matcher.setdefault(_normal(label), label)
    matcher.pop("", None)  # a label of punctuation alone names no folder
    return matcher


def true_label(item: Item, matcher: dict[str, str]) -> str | None:
    """The label named by the folder holding the item, if any."""
    return matcher.get(_normal(item.folder))  # never "": the top folder names no class
