"""The tutorials' code runs as written (the ```python blocks, in order, in one
namespace per page; ```py blocks are shown, not run)."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).parent.parent / "docs"
PAGES = ["training.md", "scale_out.md"]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES)
def test_page_code_runs(page, capsys):
    blocks = python_blocks((DOCS / page).read_text())
    assert blocks, f"no python blocks in {page}"
    namespace: dict = {"__name__": f"docs.{page}"}
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), namespace)
