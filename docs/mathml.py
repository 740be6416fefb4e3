"""MkDocs hook: the docs' maths as MathML, rendered when the site is built.

`pymdownx.arithmatex` (generic mode) finds the formulas of the pages and of the
docstrings (`$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`) and leaves each, delimiters
and all, in an element of class `arithmatex`. This hook converts each one with
math-core (LaTeX to MathML Core, which current browsers render natively: Chrome and Edge
109+, Firefox, Safari), so the site loads no script and needs no network for its maths:
`mkdocs serve` offline and an archived build show the same formulas as the published
site. A formula math-core cannot read (an unknown command, say) is logged as a warning,
which fails the strict build, and is left as LaTeX source.
"""

import html
import logging
import re
from typing import Any

from math_core import LatexError, LatexToMathML

log = logging.getLogger("mkdocs.hooks.mathml")

_FORMULA = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">(?P<tex>.*?)</(?P=tag)>', flags=re.S
)
_DELIMITERS = {"span": ("\\(", "\\)"), "div": ("\\[", "\\]")}
# A backslash before a line break is TeX's control space (`\ `), which math-core reads
# only in its one-line spelling; `\\` (a line break in an environment) stays as it is.
_CONTROL_SPACE = re.compile(r"\\(\\|\n)")
# The LaTeX source travels inside the MathML (<annotation>), for copying and for
# screen readers that prefer it.
_CONVERTER = LatexToMathML(annotation=True, fancy_error=False)


def _control_spaces(tex: str) -> str:
    return _CONTROL_SPACE.sub(lambda m: m[0] if m[1] == "\\" else "\\ ", tex)


def on_page_content(html_text: str, page: Any, **kwargs: Any) -> str:
    def render(match: re.Match) -> str:
        tag = match["tag"]
        opening, closing = _DELIMITERS[tag]
        tex = html.unescape(match["tex"]).strip()
        if not (tex.startswith(opening) and tex.endswith(closing)):
            return match[0]  # not arithmatex's output
        tex = _control_spaces(tex[len(opening) : -len(closing)].strip())
        try:
            mathml = _CONVERTER.convert_with_local_state(tex, displaystyle=tag == "div")
        except LatexError as error:
            where = page.file.src_uri
            log.warning("%s: cannot render the formula %r: %s", where, tex, error)
            return match[0]
        return f'<{tag} class="arithmatex">{mathml}</{tag}>'

    return _FORMULA.sub(render, html_text)
