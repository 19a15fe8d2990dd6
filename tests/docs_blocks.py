"""Read the code blocks of the documentation and run them as a user would paste them.

A fenced block whose language is ``python`` or ``bash`` is an example; every other fence
(``console``, ``text``, ``yaml``, ``cff``) shows output or a file and is not run. A block is
marked, on the line right above its fence, by an HTML comment that the rendered page hides:

- ``<!-- docs-test: skip REASON -->``: never run here (it needs a GPU, a download, a
  cluster or a file the reader has); REASON is required.
- ``<!-- docs-test: slow REASON -->``: run only by ``pytest -m slow`` (a long run).

A ``python`` block that includes a file of ``examples/`` (``--8<-- "examples/x.py"``) is
shown, not run here: ``tests/test_examples.py`` runs every example script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_LANGUAGES = ("python", "bash")
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<lang>[\w+-]*)")
_MARK = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<kind>skip|slow)\s+(?P<reason>\S.*?)\s*-->\s*$")
_INCLUDE = "--8<--"


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page: where it starts (1-based line), its language,
    its text, and its mark (``""``, ``"skip"`` or ``"slow"``)."""

    page: Path
    line: int
    lang: str
    code: str
    mark: str = ""
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{_shown(self.page)}:{self.line}"

    @property
    def runnable(self) -> bool:
        """A python or bash example, not an included file of ``examples/``."""
        return self.lang in RUN_LANGUAGES and _INCLUDE not in self.code


def blocks(page: Path) -> list[Block]:
    """Every fenced code block of ``page`` in order, with the mark of the line above it.

    A mark with a kind other than skip/slow, or without a reason, is an error naming the
    line, so a typo never turns a skipped example into a silently run one or back.
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
        mark, reason = _mark(page, lines, i)
        found.append(Block(page, i + 1, opening["lang"].lower(), body, mark, reason))
        i = end + 1
    return found


def _mark(page: Path, lines: list[str], fence_index: int) -> tuple[str, str]:
    above = lines[fence_index - 1] if fence_index else ""
    if "docs-test" not in above:
        return "", ""
    matched = _MARK.match(above)
    if not matched:
        raise ValueError(
            f"{_shown(page)}:{fence_index}: a docs-test mark must read "
            f"'<!-- docs-test: skip|slow REASON -->', got {above.strip()!r}"
        )
    return matched["kind"], matched["reason"]


def _shown(page: Path) -> str:
    """The page's path from the repository root (a page elsewhere: its full path)."""
    return str(page.relative_to(REPO)) if page.is_relative_to(REPO) else str(page)


def pages() -> list[Path]:
    """The README and every page of docs/, in a fixed order."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
