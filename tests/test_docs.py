"""The API pages (docs/api/*.md) stay true: every Python example runs as written, every `metalab train` line
loads its config with its overrides, every module is documented on a page, and every page is in the nav.

A ```python block runs in a fresh namespace from the repository root. A comment line right above its fence
changes that: ``<!-- docs-test: skip -->`` (never run), ``<!-- docs-test: slow -->`` (only with -m slow),
``<!-- docs-test: omniglot -->`` (slow, and skipped without the Omniglot data). Building the pages themselves
(``mkdocs build --strict``) is `make docs`, a step of .ci/run.
"""

from __future__ import annotations

import re
import shlex
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, omniglot_available

from metalab.experiment import load_run_config

DOCS = REPO / "docs"
PAGES = sorted((DOCS / "api").glob("*.md"))
MARKERS = ("skip", "slow", "omniglot")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
MARK = re.compile(r"<!--\s*docs-test:\s*(\w+)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    mark: str | None

    @property
    def where(self) -> str:
        page = self.page.relative_to(REPO) if self.page.is_relative_to(REPO) else self.page
        return f"{page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, each with the line of its fence and the docs-test mark above it."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        if mark is not None and mark.group(1) not in MARKERS:
            raise ValueError(f"{page}: unknown docs-test mark {mark.group(1)!r} (one of {MARKERS})")
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(page, line, m.group(1), m.group(2), mark.group(1) if mark else None))
    return out


def python_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if b.lang == "python"]


def example_params() -> list:
    params = []
    for b in python_blocks():
        marks = []
        if b.mark == "skip":
            marks.append(pytest.mark.skip(reason="marked docs-test: skip"))
        if b.mark in ("slow", "omniglot"):
            marks.append(pytest.mark.slow)
        else:
            marks.append(
                pytest.mark.timeout(60)
            )  # an example of the default run takes seconds: else mark it slow
        params.append(pytest.param(b, id=b.where, marks=marks))
    return params


@pytest.mark.parametrize("block", example_params())
def test_python_example_runs(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.mark == "omniglot" and not omniglot_available():
        pytest.skip("Omniglot is not installed under METALAB_DATA")
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("METALAB_PROGRESS", "off")
    run_block(block)


def run_block(block: Block) -> None:
    """Execute ``block`` in a fresh namespace; a traceback names the page and its own line numbers."""
    code = compile("\n" * block.line + block.code, str(block.page), "exec")
    exec(code, {"__name__": "__docs__"})


def train_lines() -> list[tuple[str, str]]:
    """``(where, command)`` of every ``metalab train CONFIG ...`` line in the shell blocks of the API pages."""
    out = []
    for page in [DOCS / "index.md", *PAGES]:
        for b in blocks(page):
            if b.lang not in ("bash", "sh", "shell", "console"):
                continue
            for i, line in enumerate(b.code.splitlines()):
                command = line.split("#", 1)[0].strip()
                if command.startswith("metalab train ") and "--resume" not in command:
                    out.append((f"{b.page.relative_to(REPO)}:{b.line + 1 + i}", command))
    return out


@pytest.mark.parametrize(("where", "command"), train_lines(), ids=[w for w, _ in train_lines()])
def test_train_command_config_loads(where: str, command: str) -> None:
    """The config exists and takes the line's overrides (a renamed key or a bad value fails here)."""
    args = shlex.split(command)[2:]
    config, overrides = args[0], []
    rest = iter(args[1:])
    for arg in rest:
        assert arg == "--set", f"{where}: only --set options are checked here, got {arg!r}"
        overrides.append(next(rest))
    load_run_config(REPO / config, overrides)


def test_every_family_page_has_a_runnable_example() -> None:
    assert PAGES, "no API pages under docs/api"
    for page in PAGES:
        fast = [b for b in blocks(page) if b.lang == "python" and b.mark is None]
        assert fast, f"{page.relative_to(REPO)} has no Python example that the default test run executes"


def documented_modules() -> set[str]:
    found = set()
    for page in PAGES:
        found |= set(re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.MULTILINE))
    return found


def test_every_module_is_documented() -> None:
    package = REPO / "metalab"
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in package.rglob("*.py")
        if p.name != "__main__.py"
    }
    modules.discard("metalab")
    missing = sorted(modules - documented_modules())
    assert not missing, f"modules without a ::: block on a docs/api page: {missing}"
    unknown = sorted(documented_modules() - modules)
    assert not unknown, f"::: blocks for modules that do not exist: {unknown}"


def test_every_page_is_in_the_nav() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    for page in PAGES:
        assert f" {page.relative_to(DOCS).as_posix()}" in nav, f"{page} is not in mkdocs.yml's nav"
    for target in re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.MULTILINE):
        assert (DOCS / target).is_file(), f"mkdocs.yml's nav names a missing page {target}"


def test_marks_are_read(tmp_path: Path) -> None:
    """The parser sees fences, their lines and marks (so a skipped example is skipped on purpose only)."""
    page = tmp_path / "page.md"
    page.write_text("# t\n\n<!-- docs-test: slow -->\n```python\nx = 1\n```\n\n```bash\nls\n```\n")
    got = blocks(page)
    assert [(b.lang, b.line, b.mark, b.code) for b in got] == [
        ("python", 4, "slow", "x = 1\n"),
        ("bash", 8, None, "ls\n"),
    ]
    page.write_text("<!-- docs-test: sometimes -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="unknown docs-test mark"):
        blocks(page)


def test_a_failing_example_fails(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nimport metalab\n\nassert metalab.__version__ == 'nope'\n```\n")
    (block,) = blocks(page)
    with pytest.raises(AssertionError) as info:
        run_block(block)
    frames = [f for f in traceback.extract_tb(info.value.__traceback__) if f.filename == str(page)]
    assert [f.lineno for f in frames] == [6]  # the page's own line
