"""Every docs page's Python code runs as written.

The ```python (or ```py) blocks of a page run in order, in one namespace per page, as
they would pasted one after another into one session; blocks nested in a list item
count too. Two markers, each on the line just above a block's fence:

- `<!-- docs-test: skip REASON -->`: the block is shown, not run. For code that cannot
  run here, and only that: a sketch whose names (`system`, `N`, `K`) stand for the
  reader's own, or code that needs several processes. The reason is required; a page
  whose blocks are all skipped is reported as a skipped test, with the reasons.
- a block of output, ```text title="Output", right after a code block (blank lines
  between them allowed) is what that block prints: the test compares, so the printed
  results a page shows are the ones its code gives.
"""

import importlib.util
import pathlib
import re
import textwrap
import types
from dataclasses import dataclass

import jax
import pytest

from .helpers import slow

DOCS = pathlib.Path(__file__).parent.parent / "docs"
SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\b\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")
OUTPUT_INFO = re.compile(r'^text\s+title="Output"$')
CODE_LANGUAGES = {"python", "py"}


@dataclass
class Block:
    language: str  # first word of the info string
    info: str
    code: str  # dedented
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    skip: str | None  # the skip marker's reason, None to run
    output: str | None = None  # the output block that follows, if any


def fenced_blocks(text: str) -> list[Block]:
    """The page's Python blocks, in order, with their markers and outputs."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        closing = re.compile(rf"^{re.escape(indent)}{fence[0]}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        body = [line[len(indent) :] for line in lines[i + 1 : end]]
        marker = SKIP.match(lines[i - 1]) if i > 0 else None
        info = opening["info"].strip()
        block = Block(
            language=info.split(" ")[0].lower(),
            info=info,
            code=textwrap.dedent("\n".join(body) + "\n"),
            line=i + 1,
            end=end + 1,
            skip=marker["reason"] if marker else None,
        )
        previous = blocks[-1] if blocks else None
        if OUTPUT_INFO.match(info):
            between = lines[previous.end : i] if previous else ["no block"]
            assert (
                previous
                and previous.language in CODE_LANGUAGES
                and not any(line.strip() for line in between)
            ), f"the output block at line {i + 1} does not follow a code block"
            previous.output = block.code
        else:
            blocks.append(block)
        i = end + 1
    return [block for block in blocks if block.language in CODE_LANGUAGES]


def pages_with_code() -> list[str]:
    return sorted(
        str(path.relative_to(DOCS))
        for path in DOCS.rglob("*.md")
        if fenced_blocks(path.read_text())
    )


# The two pages whose code trains for a while (~23 s each on 2 cores) run with the
# slow tests, which CI runs after the default suite.
SLOW_PAGES = ("training.md", "deq.md")


@pytest.mark.parametrize(
    "page",
    [slow(page) if page in SLOW_PAGES else page for page in pages_with_code()],
)
def test_page_code_runs(page, capsys):
    blocks = fenced_blocks((DOCS / page).read_text())
    runnable = [block for block in blocks if block.skip is None]
    if not runnable:  # only sketches: say so, with the pages' own reasons
        pytest.skip("; ".join(f"line {block.line}: {block.skip}" for block in blocks))
    namespace: dict = {"__name__": f"docs.{page}"}
    # A page may switch global JAX settings (bi-level enables x64): later tests and
    # the package's doctests must not inherit them.
    x64 = jax.config.jax_enable_x64
    try:
        for block in runnable:
            # Line numbers in tracebacks are the page's: pad the code to its fence.
            source = "\n" * block.line + block.code
            exec(compile(source, f"docs/{page}", "exec"), namespace)
            printed = capsys.readouterr().out
            if block.output is not None:
                assert printed == block.output, (
                    f"docs/{page}, block at line {block.line}: it prints\n"
                    f"{printed}\nbut its output block shows\n{block.output}"
                )
    finally:
        jax.config.update("jax_enable_x64", x64)


def test_markers_are_well_formed():
    """A skip marker gives a reason and stands just above a code block."""
    for path in DOCS.rglob("*.md"):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            if "docs-test" not in line:
                continue
            marker = SKIP.match(line)
            where = f"docs/{path.relative_to(DOCS)}:{number}"
            assert marker, f"{where}: write `<!-- docs-test: skip REASON -->`"
            assert marker["reason"], f"{where}: say why the block is not run"
            following = FENCE.match(lines[number]) if number < len(lines) else None
            assert following and following["info"].split(" ")[0] in CODE_LANGUAGES, (
                f"{where}: the marker must stand on the line just above a code fence"
            )


def test_parser_finds_nested_blocks_markers_and_outputs():
    text = textwrap.dedent(
        """\
        <!-- docs-test: skip a sketch -->
        ```python
        f(system, N)
        ```

        - an item:

            ```python
            x = 1
            print(x)
            ```

            ```text title="Output"
            1
            ```

        ```bash
        pip install .
        ```
        """
    )
    sketch, nested = fenced_blocks(text)
    assert sketch.skip == "a sketch" and sketch.code == "f(system, N)\n"
    assert nested.skip is None and nested.code == "x = 1\nprint(x)\n"
    assert nested.output == "1\n"


def test_maths_becomes_mathml(caplog):
    """The docs' hook renders arithmatex's formulas as MathML, and warns (which fails
    the strict build) on one it cannot read, leaving its source."""
    pytest.importorskip("math_core")
    spec = importlib.util.spec_from_file_location("mathml_hook", DOCS / "mathml.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = types.SimpleNamespace(file=types.SimpleNamespace(src_uri="page.md"))

    def render(html):
        return hook.on_page_content(html, page=page)

    # Escaped as arithmatex leaves it; a backslash before a line break is a space.
    inline = render('<span class="arithmatex">\\(a &lt; b,\\\n c\\)</span>')
    assert inline.startswith('<span class="arithmatex"><math>')
    assert "<mo>&lt;</mo>" in inline and "\\(" not in inline
    display = render('<div class="arithmatex">\\[\\sum_t \\ell_t\\]</div>')
    assert display.startswith('<div class="arithmatex"><math display="block">')
    bad = '<span class="arithmatex">\\(\\nosuchcommand\\)</span>'
    with caplog.at_level("WARNING", logger="mkdocs.hooks.mathml"):
        assert render(bad) == bad
    assert "page.md" in caplog.text and "nosuchcommand" in caplog.text
