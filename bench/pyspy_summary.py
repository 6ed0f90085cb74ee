"""Top functions of a py-spy profile by self and inclusive time, as a Markdown table.

    .venv/bin/py-spy record --pid PID --duration 15 --format raw -o build/profile.txt
    .venv/bin/python bench/pyspy_summary.py build/profile.txt --top 15

Reads py-spy's raw (collapsed) stacks, one "frame;frame;...;leaf COUNT" a line, each frame
"function (file:line)". Functions are keyed by name and file (lines merged). Self: samples with
the function as the leaf; inclusive: samples with it anywhere in the stack (once per stack).
Percentages are of every sample (each thread that was not idle counts once per tick); with
--root TEXT, of the samples whose stack contains TEXT (e.g. "<module>" for the main thread).
--hide-above PCT leaves out of the inclusive table the spine (functions on nearly every stack).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def function(frame: str) -> str:
    """'name (file:line)' -> 'name (file)'."""
    match = _FRAME.match(frame)
    return f"{match[1]} ({match[2]})" if match else frame


def summarize(
    text: str, root: str | None = None
) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """(total samples, self samples by function, inclusive samples by function)."""
    total, own, inclusive = 0, collections.Counter[str](), collections.Counter[str]()
    for line in text.splitlines():
        if not (match := _LINE.match(line.strip())):
            continue
        frames, count = match[1].split(";"), int(match[2])
        if root and not any(root in f for f in frames):
            continue
        total += count
        own[function(frames[-1])] += count
        for name in {function(f) for f in frames}:
            inclusive[name] += count
    return total, own, inclusive


def table(text: str, top: int, root: str | None = None, hide_above: float = 101.0) -> str:
    total, own, inclusive = summarize(text, root)
    shown = collections.Counter(
        {k: v for k, v in inclusive.items() if 100 * v / max(total, 1) < hide_above}
    )
    scope = f"samples whose stack contains {root!r}" if root else "all samples"
    lines = [f"{total} samples ({scope})", ""]
    for title, key in (("self", own), ("inclusive", shown)):
        lines += [f"Top {top} by {title} time:", "", "| # | function (file) | self % | incl. % |"]
        lines.append("|---|---|---|---|")
        for rank, (name, _) in enumerate(key.most_common(top), 1):
            pct = [100 * d.get(name, 0) / max(total, 1) for d in (own, inclusive)]
            lines.append(f"| {rank} | `{name}` | {pct[0]:.1f} | {pct[1]:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile", type=Path, help="py-spy record --format raw output")
    p.add_argument("--top", type=int, default=15, help="functions per table (default: 15)")
    p.add_argument("--root", help="only stacks with a frame containing this text")
    p.add_argument(
        "--hide-above",
        type=float,
        default=101.0,
        metavar="PCT",
        help="inclusive table: leave out functions at or above PCT %% (default: none)",
    )
    args = p.parse_args(argv)
    print(table(args.profile.read_text(), args.top, args.root, args.hide_above))
    return 0


if __name__ == "__main__":
    sys.exit(main())
