"""Griffe extensions for the docs build.

`EquinoxModuleInit`: signatures for Equinox modules. `eqx.Module` subclasses become
dataclasses through a metaclass, which griffe's static analysis does not see (its
dataclass support keys on the `@dataclass` decorator), so mkdocstrings would render
`UnrolledSystem` and friends without a signature. For every class that derives from
`equinox.Module` and defines no `__init__`, this adds one whose parameters are the
annotated fields, in definition order (parents first), with their defaults, as the
generated dataclass `__init__` has.

`FieldComments`: state fields are documented optax-style, by a comment on the field's
line (`count: jax.Array  # shape=(), int32: updates so far`). This turns such a comment
into the field's docstring so that the API reference shows it.
"""

import ast
from typing import Any

import griffe

_EQX_MODULE = {
    "equinox.Module",
    "equinox._module.Module",
    "equinox._module._module.Module",
    # Flax linen modules are dataclasses too (optax_pes.linen.DEQ).
    "flax.linen.Module",
    "flax.linen.module.Module",
    "nn.Module",
}
_FIELD_CALLS = {"field", "eqx.field", "equinox.field", "dataclasses.field"}


class EquinoxModuleInit(griffe.Extension):
    """Add the dataclass `__init__` of `eqx.Module` subclasses."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._visit(pkg, set())

    def _visit(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        for member in list(obj.members.values()):
            if member.is_alias:
                continue
            if member.is_module or member.is_class:
                self._visit(member, seen)
            if member.is_class and "__init__" not in member.members:
                chain = _module_chain(member)
                if chain:
                    _add_init(member, chain)


def _module_chain(cls: griffe.Class) -> list[griffe.Class]:
    """`cls` and its Module ancestors, base first; empty if not an eqx.Module."""
    for base in cls.bases:
        path = getattr(base, "canonical_path", str(base))
        if path in _EQX_MODULE:
            return [cls]
    try:
        resolved = cls.resolved_bases
    except Exception:  # noqa: BLE001 - unresolvable bases: not ours to document
        return []
    for base in resolved:
        if base.is_class:
            parents = _module_chain(base)
            if parents:
                return [*parents, cls]
    return []


def _field_default(value: Any) -> str | None:
    """The default of a field declaration, as source text, or None for none."""
    if value is None:
        return None
    text = str(value)
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        return text
    if isinstance(node, ast.Call) and ast.unparse(node.func) in _FIELD_CALLS:
        for keyword in node.keywords:
            if keyword.arg == "default":
                return ast.unparse(keyword.value)
            if keyword.arg == "default_factory":
                return f"{ast.unparse(keyword.value)}()"
        return None
    return text


def _add_init(cls: griffe.Class, chain: list[griffe.Class]) -> None:
    fields: dict[str, griffe.Parameter] = {}
    for klass in chain:
        for member in klass.members.values():
            if member.is_alias or not member.is_attribute or member.annotation is None:
                continue
            if "ClassVar" in str(member.annotation) or member.name.startswith("__"):
                continue
            if "instance-attribute" not in member.labels:  # griffe strips ClassVar
                continue
            fields[member.name] = griffe.Parameter(
                member.name,
                annotation=member.annotation,
                kind=griffe.ParameterKind.positional_or_keyword,
                default=_field_default(member.value),
            )
    init = griffe.Function(
        "__init__",
        parent=cls,
        parameters=griffe.Parameters(
            griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword),
            *fields.values(),
        ),
        returns="None",
    )
    cls.set_member("__init__", init)


_NOT_DOCS = ("noqa", "type:", "pragma", "fmt:", "ruff:")


class FieldComments(griffe.Extension):
    """Use the trailing comment of an undocumented class attribute as its docstring."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        parent = attr.parent
        if attr.docstring is not None or parent is None or not parent.is_class:
            return
        try:
            line = attr.lines[0] if attr.lines else ""
        except Exception:  # noqa: BLE001 - no source (e.g. compiled): nothing to read
            return
        code, sep, comment = line.partition("  #")
        comment = comment.strip()
        if not sep or not comment or comment.startswith(_NOT_DOCS):
            return
        attr.docstring = griffe.Docstring(comment, parent=attr)
