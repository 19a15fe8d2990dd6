"""Every example of the README and of docs/ runs as written (the runner: tests/docs_blocks.py).

The blocks of one page run in order in one fresh folder that holds the repository's
``configs/``, ``examples/`` and ``scripts/`` (so ``configs/demo.yaml`` means what it means
in a clone), the way a reader pastes them one after another: ``bash`` blocks in ``bash -e``,
``python`` blocks each in a fresh namespace. Unmarked blocks run in CI; blocks marked slow
run with ``pytest -m slow``; blocks marked skip never run here, and say why in the page.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_blocks import REPO, Block, blocks, pages

LINKED = ("configs", "examples", "scripts")


def _environment() -> dict[str, str]:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(REPO))
    # the `nctools` command of this interpreter, wherever the package was installed
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_block(block: Block, folder: Path) -> None:
    """Run one block in ``folder``; raise AssertionError naming the page and line on failure."""
    if block.lang == "bash":
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=folder,
            env=_environment(), capture_output=True, text=True, timeout=900,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{block.where}: bash block exited {done.returncode}\n{block.code}"
                f"--- stdout\n{done.stdout[-3000:]}--- stderr\n{done.stderr[-3000:]}"
            )
        return
    namespace = {"__name__": "__main__"}
    output = io.StringIO()
    previous = Path.cwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(output):
            exec(compile(block.code, block.where, "exec"), namespace)
    except Exception as error:
        raise AssertionError(
            f"{block.where}: python block raised {type(error).__name__}: {error}\n{block.code}"
            f"--- stdout\n{output.getvalue()[-3000:]}"
        ) from error
    finally:
        os.chdir(previous)


def run_page(page: Path, folder: Path, include_slow: bool) -> int:
    """Run the page's runnable blocks (slow ones too when asked) in order; return how many.

    A failing block does not stop the page: the blocks after it run too, and every failure
    is reported at the end, so one broken example never hides another.
    """
    for name in LINKED:
        (folder / name).symlink_to(REPO / name, target_is_directory=True)
    ran, failures = 0, []
    for block in blocks(page):
        wanted = block.mark == "" or (block.mark == "slow" and include_slow)
        if not (block.runnable and wanted):
            continue
        try:
            run_block(block, folder)
        except AssertionError as failure:
            failures.append(str(failure))
        ran += 1
    if failures:
        raise AssertionError(f"{len(failures)} of {ran} blocks failed\n\n" + "\n\n".join(failures))
    return ran


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


PAGES = pages()


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    run_page(page, tmp_path, include_slow=False)


SLOW_PAGES = [p for p in PAGES if any(b.mark == "slow" for b in blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", SLOW_PAGES, ids=_ids(SLOW_PAGES))
def test_page_examples_run_with_slow(page: Path, tmp_path: Path) -> None:
    run_page(page, tmp_path, include_slow=True)


def test_every_skip_and_slow_mark_gives_a_reason() -> None:
    marked = [b for p in PAGES for b in blocks(p) if b.mark]
    assert marked, "the docs mark their GPU, download and cluster examples"
    assert all(len(b.reason.split()) >= 2 for b in marked), [b.where for b in marked]


def test_a_broken_block_fails_naming_page_and_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Intro\n\n```python\nx = 1 + 1\nassert x == 2\n```\n\n"
        "<!-- docs-test: skip needs a GPU -->\n```bash\nexit 3\n```\n\n"
        "```bash\nnctools no-such-command\n```\n",
        encoding="utf-8",
    )
    found = blocks(page)
    assert [(b.line, b.lang, b.mark) for b in found] == [
        (3, "python", ""), (9, "bash", "skip"), (13, "bash", "")
    ]
    with pytest.raises(AssertionError, match=r"page.md:13: bash block exited 2"):
        run_block(found[2], tmp_path)
    run_block(found[0], tmp_path)  # the good block passes


def test_a_mark_without_a_reason_is_an_error(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: skip -->\n```bash\ntrue\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"page.md:1: a docs-test mark must read"):
        blocks(page)


# ------------------------------------------------------------------ the reliability catalogue
RELIABILITY = REPO / "docs" / "reliability.md"
CATALOGUE_FILE = "tests/test_bad_inputs.py"  # where the page's bare test names live


def _catalogue_tests() -> list[tuple[str, str, str | None]]:
    """(file, function, parameter id or None) of every test the page's tables name: the
    backquoted ``[tests/PATH.py::]test_NAME[ID]`` items of each row's last cell."""
    named = []
    for line in RELIABILITY.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        for item in re.findall(r"`([^`]*\btest_[^`]*)`", line.rstrip(" |").split("|")[-1]):
            found = re.fullmatch(r"(?:(tests/[\w/]+\.py)::)?(test_\w+)(?:\[(.*)\])?", item)
            assert found, f"docs/reliability.md names a test as {item!r}"
            path, function, param = found.groups()
            named.append((path or CATALOGUE_FILE, function, param))
    return named


def test_every_test_the_reliability_catalogue_names_exists() -> None:
    """Each test of docs/reliability.md's tables is a function of the file named (its
    parameter an id of the catalogue's cases), and every command-line and API case of the
    catalogue is in the page, whose count of command-line cases is theirs, and each
    command-line case's row quotes the error its test expects."""
    from tests import test_bad_inputs as catalogue

    named = _catalogue_tests()
    assert len(named) > 150
    functions: dict[str, set[str]] = {}
    for path, function, param in named:
        if path not in functions:
            tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
            functions[path] = {node.name for node in ast.walk(tree)
                               if isinstance(node, ast.FunctionDef)}
        assert function in functions[path], f"docs/reliability.md: no {function} in {path}"
        ids = {"test_cli_error": catalogue.CASES,
               "test_measure_value_error": catalogue.API_CASES}.get(function)
        if param is not None and path == CATALOGUE_FILE and ids is not None:
            assert param in ids, f"docs/reliability.md: {function}[{param}] is not a case"
    listed = {(function, param) for path, function, param in named if path == CATALOGUE_FILE}
    missing = [f"test_cli_error[{name}]" for name in catalogue.CASES
               if ("test_cli_error", name) not in listed]
    missing += [f"test_measure_value_error[{name}]" for name in catalogue.API_CASES
                if ("test_measure_value_error", name) not in listed]
    assert missing == [], f"docs/reliability.md lacks {missing}"
    page = RELIABILITY.read_text(encoding="utf-8")
    assert f"a catalogue of {len(catalogue.CASES)} command-line cases" in page
    for line in page.splitlines():  # each case's row quotes its error as the test expects it
        found = re.search(r"`test_cli_error\[(.*)\]`", line)
        if found:
            expected = line.split("|")[3]
            culprit = catalogue.CASES[found.group(1)].culprit.replace("{tmp}/", "")
            assert culprit in expected, f"docs/reliability.md, {found.group(1)}: {culprit!r}"
