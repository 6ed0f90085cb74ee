"""The documents cannot drift from the code: every command they show parses.

Every `python -m MODULE ...` and `python SCRIPT.py ...` line in a shell code block (```bash,
```sh, ```shell, ```console or a block with no language) of README.md, docs/*.md,
bench/README.md and deploy/README.md goes through the real argparse parser of its program,
built as the program builds it (no work done: nothing is trained, served or measured), and an
option or subcommand that does not exist fails the test with argparse's own message, naming the
document, the line and the command. So do `cnn-train` / `cnn-export` / `cnn-serving ...` (the
console scripts) and `docker run ... cnn-serving:TAG ARGS` (the image's entrypoint is
`python -m service`).

How a line is read, as a shell would: a `\\` at the end continues it, a leading `$ ` prompt
and `# comments` are dropped, `NAME=value` prefixes become the program's environment (the
parsers read CNN_SERVING_* defaults while they are built), and the command ends at a pipe,
`&&`, `;`, `&` or a redirection. `.venv/bin/python`, `python3` and friends are all Python. The
documents' own notation for optional parts, `[--version N]` and `[--model a | --model b]`, is
checked with the part present, each alternative once. Upper-case placeholders (`N`, `FILE.png`,
`DIR`) stand for any value: they pass an option's type and choices, but never name a
subcommand. Options must be spelt in full: argparse takes a prefix (`--wait` for `--wait-s`),
but the next option that shares it makes the documented command ambiguous.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "bench" / "README.md",
    ROOT / "deploy" / "README.md",
]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
OWN = {"training", "export", "service", "bench", "tests", "protos"}  # this repository's code
CONSOLE_SCRIPTS = {"cnn-train": "training", "cnn-export": "export", "cnn-serving": "service"}
IMAGE = re.compile(r"^(?:\S+/)?cnn-serving(?::\S+)?$")  # the serving image, any registry or tag
PYTHON = re.compile(r"^python(?:\d+(?:\.\d+)?)?$")  # python, python3, python3.11
CANDIDATE = re.compile(r"\bpython[\d.]*\b|\bcnn-(?:train|export|serving)\b|\bdocker\s+run\b")
OPTIONAL = re.compile(r"\[(\s*-[^\[\]]*)\]")  # [--version N], [--model a | --model b]
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(?::[A-Z][A-Z0-9_]*)?(?:\.[A-Za-z0-9]+)?$")
CONTROL = {"|", "||", "&", "&&", ";", ";;", "(", ")"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PREFIXES = {"env", "exec", "nohup", "time", "command"}


# -- the programs and their parsers ----------------------------------------------------------

Check = Callable[[argparse.ArgumentParser, argparse.Namespace], object]


def _module(name: str) -> object:
    return importlib.import_module(name)


def _bench(name: str) -> object:
    """bench/NAME.py, imported as bench.NAME; its siblings (prepare, http_load, ...) are imported
    by their bare names, as when the script runs, so bench/ is on sys.path while it loads."""
    folder = str(ROOT / "bench")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(f"bench.{name}")
    finally:
        sys.path.remove(folder)


def _program(load: Callable[[], object]) -> Callable[[], tuple[argparse.ArgumentParser, Check]]:
    def build() -> tuple[argparse.ArgumentParser, Check]:
        module = load()
        check = getattr(module, "check_args", lambda parser, args: args)
        return module.build_parser(), check  # type: ignore[attr-defined]

    return build


# program (a module for `python -m`, a script path for `python SCRIPT`) -> its parser, and what
# the program checks after argparse (bench/serve.py's combinations of options), if anything
PROGRAMS = {
    "service": _program(lambda: _module("service.__main__")),
    "training": _program(lambda: _module("training.__main__")),
    "training.summary": _program(lambda: _module("training.summary")),
    "export": _program(lambda: _module("export.__main__")),
    "bench/serve.py": _program(lambda: _bench("serve")),
    "bench/score.py": _program(lambda: _bench("score")),
    "bench/decode_memory.py": _program(lambda: _bench("decode_memory")),
    "bench/soak.py": _program(lambda: _bench("soak")),
    "bench/ipc.py": _program(lambda: _bench("ipc")),
}


# -- reading the documents -------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    document: str  # relative to the repository
    line: int  # where the command starts
    shown: str  # the command as the document shows it (continuations joined)
    program: str  # a key of PROGRAMS, or an unknown program of ours
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict, hash=False)
    unreadable: str = ""  # why the line could not be split into words, if it could not

    def __str__(self) -> str:
        return f"{self.document}:{self.line}: {self.shown}"


def shell_blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number of the first line, lines) of each fenced shell block; fences may be
    indented (a block inside a list item), and so is then its content."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, language = opening.groups()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        if language.lower() in SHELL_LANGUAGES:
            yield i + 2, body
        i = j + 1


def logical_lines(first: int, lines: list[str]) -> Iterator[tuple[int, str]]:
    """Lines with `\\` continuations joined and a `$ ` prompt removed."""
    start = first
    parts: list[str] = []
    for number, line in enumerate(lines, first):
        if not parts:
            start = number
            line = re.sub(r"^\s*\$\s+", "", line)
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        yield start, " ".join(p.strip() for p in parts)
        parts = []
    if parts:
        yield start, " ".join(p.strip() for p in parts)


def variants(text: str) -> list[str]:
    """The line with each `[--optional part]` present; `[a | b]`: one variant per alternative."""
    groups = [[alt.strip() for alt in m.group(1).split("|")] for m in OPTIONAL.finditer(text)]
    count = max((len(g) for g in groups), default=1)
    out = []
    for k in range(count):
        picks = iter([g[min(k, len(g) - 1)] for g in groups])

        def pick(_: re.Match[str], picks: Iterator[str] = picks) -> str:
            return next(picks)

        out.append(OPTIONAL.sub(pick, text))
    return out


def tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def segments(words: list[str]) -> Iterator[list[str]]:
    """The simple commands of a line: its words split at control operators."""
    current: list[str] = []
    for word in [*words, ";"]:
        if word in CONTROL:
            yield current
            current = []
        else:
            current.append(word)


def without_redirection(words: list[str]) -> list[str]:
    """A simple command cut at its first redirection (`> file`, `2>&1`, `< in`)."""
    for k, word in enumerate(words):
        if word and set(word) <= set("<>&"):
            end = k - 1 if k and words[k - 1].isdigit() else k  # 2>&1: the 2 is the fd
            return words[:end]
    return words


def invocation(words: list[str]) -> tuple[dict[str, str], str, list[str]] | None:
    """(environment, program, arguments) of one simple command, or None if it runs none of
    the programs this test knows how to read."""
    env: dict[str, str] = {}
    words = without_redirection(words)
    while words and (ASSIGNMENT.match(words[0]) or words[0] in PREFIXES):
        if ASSIGNMENT.match(words[0]):
            name, value = words[0].split("=", 1)
            env[name] = value
        words = words[1:]
    if not words:
        return None
    head, rest = words[0], words[1:]
    if head in CONSOLE_SCRIPTS:
        return env, CONSOLE_SCRIPTS[head], rest
    if head == "docker" and rest[:1] == ["run"]:
        image = next((k for k, w in enumerate(rest) if IMAGE.match(w)), None)
        if image is None or image == len(rest) - 1:
            return None  # another image, or the image's own CMD (tests/deploy checks that)
        return env, "service", rest[image + 1 :]
    if not PYTHON.match(Path(head).name):
        return None
    while rest:
        flag = rest[0]
        if flag == "-m" and len(rest) > 1:
            return env, rest[1], rest[2:]
        if flag == "-c":
            return None
        if not flag.startswith("-"):
            return env, os.path.normpath(flag), rest[1:]
        rest = rest[2:] if flag in ("-X", "-W") else rest[1:]
    return None


def ours(program: str) -> bool:
    return re.split(r"[./]", program, maxsplit=1)[0] in OWN


def commands_in(document: str, text: str) -> list[Command]:
    found = []
    for first, block in shell_blocks(text):
        for number, line in logical_lines(first, block):
            if not CANDIDATE.search(line):
                continue
            shown = re.sub(r"\s+#.*$", "", line).strip()
            for variant in variants(line):
                found += _read(document, number, shown, variant)
    return found


def _read(document: str, number: int, shown: str, line: str) -> list[Command]:
    try:
        words = tokens(line)
    except ValueError as exc:  # unbalanced quotes: say so rather than skip the line
        return [Command(document, number, shown, "?", (), {}, str(exc))]
    found = []
    for simple in segments(words):
        call = invocation(simple)
        if call is not None and ours(call[1]):
            env, program, argv = call
            found.append(Command(document, number, shown, program, tuple(argv), env))
    return found


def documented_commands() -> list[Command]:
    found = []
    for path in DOCUMENTS:
        found += commands_in(str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"))
    return found


# -- parsing a command -----------------------------------------------------------------------


class _AnyPlaceholder(list):
    """An option's choices, plus any placeholder."""

    def __contains__(self, value: object) -> bool:
        if isinstance(value, str) and PLACEHOLDER.match(value):
            return True
        return super().__contains__(value)


def lenient(parser: argparse.ArgumentParser) -> None:
    """Let placeholders through options' types and choices (not through subcommand names), and
    take options spelt in full only."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                lenient(sub)
            continue
        if action.type is not None and callable(action.type):
            action.type = _or_placeholder(action.type)
        if action.choices is not None:
            action.choices = _AnyPlaceholder(action.choices)


def _or_placeholder(convert: Callable[[str], object]) -> Callable[[str], object]:
    def converted(text: str) -> object:
        return text if PLACEHOLDER.match(text) else convert(text)

    return converted


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Exactly the command's CNN_SERVING_* variables (none of this process's) while its parser
    is built and used."""
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith("CNN_SERVING_")]:
            del os.environ[name]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def problem(command: Command) -> str | None:
    """None when the command parses; else why not, in argparse's words."""
    if command.unreadable:
        return f"not shell words: {command.unreadable}"
    if command.program not in PROGRAMS:
        return f"no parser known for {command.program!r}: add it to PROGRAMS in {__name__}"
    err, out = io.StringIO(), io.StringIO()
    with environment(command.env):
        parser, check = PROGRAMS[command.program]()
        lenient(parser)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                check(parser, parser.parse_args(list(command.argv)))
        except SystemExit as exc:
            if exc.code in (0, None):
                return None  # --help
            return err.getvalue().strip() or f"exit status {exc.code}"
    return None


# -- the tests -------------------------------------------------------------------------------

COMMANDS = documented_commands()


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_the_documented_command_parses(command: Command) -> None:
    message = problem(command)
    assert message is None, f"{command}\n  {command.program} {list(command.argv)}\n{message}"


def test_every_program_of_the_pipeline_is_checked() -> None:
    programs = {c.program for c in COMMANDS}
    assert {"training", "training.summary", "export", "service"} <= programs
    assert {"bench/serve.py", "bench/score.py", "bench/decode_memory.py"} <= programs
    subcommands = {c.argv[0] for c in COMMANDS if c.program == "service" and c.argv}
    assert {"serve", "classify", "health", "score"} <= subcommands
    readme = {c.program for c in COMMANDS if c.document == "README.md"}
    assert {"service", "training", "export", "bench/serve.py"} <= readme


FAKE = """
Some prose with `python -m service serve --not-checked` inline: not a code block.

```bash
$ CNN_SERVING_DEVICE=cpu .venv/bin/python -m service serve --repository models \\
    --grpc-port 0 --no-such-option 3 2>&1 | tee log     # a comment
python3 -m training nosuchfamily --epochs 1 && echo done
python -m export runs/x --repository models --name fashion [--version N | --bogus-version N]
python bench/serve.py --models seed --load perf-analyzer --scenarios open-loop > out.txt
docker run --rm cnn-serving:0.1.0 health --server localhost:8001 --no-such-flag
python -m service classify --server localhost:8001 --model fashion --plot FILE.png a.png
python -m pip install nothing-of-ours
python -m service.nothing --here
```

```python
import subprocess  # python -m service serve --bogus: not a shell block
```
"""


def test_the_reader_reads_commands_as_a_shell_would() -> None:
    found = commands_in("FAKE.md", FAKE)
    serve = found[0]
    assert serve.line == 5 and serve.program == "service"
    assert serve.argv == ("serve", "--repository", "models", "--grpc-port", "0",
                          "--no-such-option", "3")  # fmt: skip
    assert serve.env == {"CNN_SERVING_DEVICE": "cpu"} and serve.shown.endswith("| tee log")
    assert [c.program for c in found] == [
        "service", "training", "export", "export", "bench/serve.py", "service", "service",
        "service.nothing",
    ]  # fmt: skip
    exports = [c.argv for c in found if c.program == "export"]
    assert exports == [
        ("runs/x", "--repository", "models", "--name", "fashion", "--version", "N"),
        ("runs/x", "--repository", "models", "--name", "fashion", "--bogus-version", "N"),
    ]
    assert next(c for c in found if c.program == "bench/serve.py").argv[-1] == "open-loop"


def said(command: Command) -> str:
    return problem(command) or ""


def test_the_checker_fails_on_options_and_subcommands_that_do_not_exist() -> None:
    found = commands_in("FAKE.md", FAKE)
    problems = {(c.program, c.argv[:1]): said(c) for c in found}
    assert "unrecognized arguments: --no-such-option" in problems["service", ("serve",)]
    assert "invalid choice: 'nosuchfamily'" in problems["training", ("nosuchfamily",)]
    versions = [said(c) for c in found if c.program == "export"]
    assert versions[0] == ""  # the placeholder N passes --version's int type
    assert "unrecognized arguments: --bogus-version" in versions[1]
    # bench/serve.py's own checks after argparse's
    assert "closed-loop scenarios only" in problems["bench/serve.py", ("--models",)]
    assert "unrecognized arguments: --no-such-flag" in problems["service", ("health",)]
    assert problems["service", ("classify",)] == ""
    short = Command("FAKE.md", 1, "", "service", ("health", "--server", "h:1", "--wait", "3"))
    assert "unrecognized arguments: --wait 3" in said(short)  # a prefix of --wait-s
    assert "no parser known for 'service.nothing'" in problems["service.nothing", ("--here",)]


def test_the_checker_reads_the_environment_the_command_sets() -> None:
    before = dict(os.environ)
    bare = Command("FAKE.md", 1, "", "export", ("runs/x", "--name", "fashion"))
    assert "--repository" in said(bare)  # required, unless CNN_SERVING_REPOSITORY says it
    with_env = Command(
        "FAKE.md", 1, "", "export", ("runs/x", "--name", "fashion"),
        {"CNN_SERVING_REPOSITORY": "models"},
    )  # fmt: skip
    assert problem(with_env) is None
    assert dict(os.environ) == before


# -- links between the documents ----------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fence = [], ""
    for number, line in enumerate(text.splitlines(), 1):
        marker = re.match(r"^\s*(`{3,}|~{3,})", line)
        if marker and (not fence or marker.group(1).startswith(fence)):
            fence = "" if fence else marker.group(1)
            continue
        if not fence:
            out.append((number, line))
    return out


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    seen: dict[str, int] = {}
    for _, line in prose(path.read_text(encoding="utf-8")):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for number, line in prose(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(root)}:{number}: ({target})"
            if not resolved.exists():
                broken.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{where}: no heading with that anchor")
    return broken


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_links_of_the_documents_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_the_readme_is_a_front_page_linking_every_document() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    linked = {target.partition("#")[0] for target in LINK.findall(readme)}
    docs = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert docs and docs <= linked, sorted(docs - linked)


def test_the_link_checker_finds_broken_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A heading: with `code`\n\n[ok](#a-heading-with-code) [gone](missing.md)\n"
        "[bad anchor](page.md#nowhere) [web](https://example.com)\n\n```bash\n[x](nothing)\n```\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "page.md:3: (missing.md): no such file",
        "page.md:4: (page.md#nowhere): no heading with that anchor",
    ]
