"""Convolutions in the layout XLA:CPU runs fast inside loops.

XLA's CPU backend swaps a convolution's operands into the channels-last layout its
fast kernels want (inputs `NHWC`, kernels `HWIO`) only outside control flow: inside a
`while` loop or a `cond` branch, a convolution in any other layout runs on a generic
kernel, measured 7-8x slower on an (8, 8, 64) layer. That is every iteration of the
forward solvers on an `NCHW` layer (`eqx.nn.Conv2d`'s layout) and every iteration
of a backward solve: the VJP of a convolution w.r.t. its input is a convolution whose
kernel is in `HWOI` order, whatever the layer's layout.

`canonical_convolutions` rewrites a function's convolutions into that layout with
explicit transposes around them (the same numbers; a transpose of the kernel or of an
activation is cheap next to the convolution), so the loops run the fast kernels. It
only rewrites on the CPU; elsewhere the function is returned as it is.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex
from jax.lax import ConvDimensionNumbers, conv_general_dilated_p

# Call-like primitives whose body is inlined, so that convolutions inside (an Equinox
# `filter_jit`ted layer, `jnp` functions that are jitted) are reached.
_INLINED = ("pjit", "jit", "closed_call", "core_call")


def canonical_convolutions(fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
    """`fn` with every convolution in channels-last layout (CPU only).

    Traces `fn` on `args` (their shapes and dtypes; closed-over values, tracers
    included, become constants) and returns a function of the same arguments that
    evaluates the trace with each non-canonical convolution replaced by transposes
    and a canonical one. Without a convolution to rewrite, `fn` itself.
    """
    if jax.default_backend() != "cpu":
        return fn
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    if not _needs_rewrite(closed.jaxpr):
        return fn
    out_tree = jax.tree.structure(out_shape)

    def rewritten(*call_args: Any) -> Any:
        out = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(call_args))
        return jax.tree.unflatten(out_tree, out)

    return rewritten


def _canonical(ndim: int) -> ConvDimensionNumbers:
    """Channels-last specs: lhs/out `(batch, *spatial, feature)`, rhs
    `(*spatial, in, out)`, as `ConvDimensionNumbers` (dimension indices)."""
    spatial = tuple(range(1, ndim - 1))
    return ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1) + spatial,
        rhs_spec=(ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
        out_spec=(0, ndim - 1) + spatial,
    )


def _is_canonical(dimension_numbers: ConvDimensionNumbers, ndim: int) -> bool:
    return tuple(map(tuple, dimension_numbers)) == tuple(map(tuple, _canonical(ndim)))


def _sub_jaxpr(eqn: Any) -> Any:
    closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    return getattr(closed, "jaxpr", closed)


def _needs_rewrite(jaxpr: Any) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive is conv_general_dilated_p:
            ndim = len(eqn.invars[0].aval.shape)
            if not _is_canonical(eqn.params["dimension_numbers"], ndim):
                return True
        elif eqn.primitive.name in _INLINED and _needs_rewrite(_sub_jaxpr(eqn)):
            return True
    return False


def _convolution(lhs: jax.Array, rhs: jax.Array, **params: Any) -> jax.Array:
    """One `conv_general_dilated` in channels-last layout, same result."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    ndim = lhs.ndim
    if _is_canonical(params["dimension_numbers"], ndim):
        return conv_general_dilated_p.bind(lhs, rhs, **params)
    # Spatial dimensions keep their order, so strides, padding and dilations hold.
    lhs = lhs.transpose((lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    rhs = rhs.transpose((*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    out = conv_general_dilated_p.bind(
        lhs, rhs, **{**params, "dimension_numbers": _canonical(ndim)}
    )
    # out is (batch, *spatial, feature); put each back where out_spec wants it.
    position = [0] * ndim
    position[out_spec[0]] = 0
    position[out_spec[1]] = ndim - 1
    for k, dim in enumerate(out_spec[2:]):
        position[dim] = 1 + k
    return out.transpose(position)


def _evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """`jax.core.eval_jaxpr`, with convolutions rewritten and call bodies inlined."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive is conv_general_dilated_p:
            outvals = [_convolution(*invals, **eqn.params)]
        elif eqn.primitive.name in _INLINED and _needs_rewrite(_sub_jaxpr(eqn)):
            closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            outvals = _evaluate(
                getattr(closed, "jaxpr", closed), getattr(closed, "consts", ()), invals
            )
        else:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            out = eqn.primitive.bind(*invals, **bind_params)
            outvals = out if eqn.primitive.multiple_results else [out]
        env.update(zip(eqn.outvars, outvals, strict=True))
    return [read(v) for v in jaxpr.outvars]
