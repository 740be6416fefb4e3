"""Bi-level SHINE: hypergradient cost and accuracy, and time to a tuned lambda.

Prints, measured side by side in one run (never as tests), on l2-regularised
logistic regression on scikit-learn's breast-cancer data (half for training, half
held out, standardised with the training half's statistics, as in
`tests/test_bilevel.py`), inner loss `mean log-loss(train) + 0.5 sum(exp(lam) w^2)`,
outer loss `mean log-loss(held out)`, 30 weights, float64, with a scalar lambda and
with one lambda per feature (30):

1. Hypergradient: one jitted `tx.update` of `optax_pes.shine_bilevel(...)` for each
   method at a fixed lambda and inner tolerance, from a warm state (the inner
   solution at `lam + 0.1`, as one outer step earlier in a tuning run), compile
   excluded, median over interleaved repeats (in an order that rotates every round; a
   fixed order gave the same ratios within noise). Ratios are to `implicit`
   (conjugate gradient to 1e-10, the exact reference); `jacobian_free` is the floor
   (the same inner solve, the inverse replaced by the identity), so `time - JFB time`
   is what the backward costs. Accuracy against the dense exact hypergradient
   (Newton's w*, dense Hessian solve): relative error for the scalar lambda, cosine
   (and relative error) for the per-feature one. Optional external reference: the
   same implicit hypergradient with jaxopt (`jaxopt.LBFGS`, history 30, zoom line
   search, same tolerance, differentiated through its `custom_root` with CG to
   1e-10).
2. Tuning: `optax.chain(shine_bilevel(...), optax.adam(lr))` from lambda = 0 with
   HOAG's decreasing inner tolerance `1e-3 * 0.9^k` (down to 1e-8); one jitted
   update per outer step, every method stepped in lockstep (interleaved), compile
   excluded. Reported: outer steps and wall-clock time until the held-out loss of
   the exact solution at the current lambda is within 1e-3 of the grid-search
   minimum over a scalar lambda (241 points on [-10, 2]); for the per-feature
   lambda the same target (a 30-dimensional grid is out of reach). Ratios are to
   `implicit`, median over repeats of the ratios of runs taken side by side.
   Bar: shine < 1.

3. `--highdim` (instead of 1-2): the SHINE paper's regime, more features than
   samples, generated (`make_classification(4000, 20000, n_informative=50,
   flip_y=0.05)`, half held out, float64), a scalar lambda and one per feature (at
   -3): time per hypergradient, the backward's share of an update, error and cosine
   against CG to 1e-12 at a w* solved to 1e-10 and at the method's own w*, jaxopt's
   implicit differentiation, shine_refine's error against refine_steps, and short
   tuning runs (HOAG = implicit with the decreasing inner tolerance): held-out loss
   of each iterate at a tight inner solution (evaluated after the run, untimed)
   against wall-clock, and time to a target: the scalar grid's minimum + 1e-3
   (scalar lambda), HOAG's final held-out loss (per-feature).
   `--highdim-sections tuning` runs the tuning alone.

    python benchmarks/bilevel.py            # 3 inner tolerances, ~1.5 min, 2 CPUs
    python benchmarks/bilevel.py --quick    # one tolerance, fewer repeats, < 1 min
    python benchmarks/bilevel.py --highdim  # 20,000 features, ~5-10 min, 2 CPUs
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from functools import partial

import jax

jax.config.update("jax_enable_x64", True)

import _problems  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _timing import (  # noqa: E402
    block,
    compare,
    cosine,
    median,
    ms,
    of_thunks,
    paired_ratio,
    rel_error,
    us,
)

import optax_pes  # noqa: E402

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import jaxopt
except ImportError:  # the external reference is optional
    jaxopt = None
warnings.filterwarnings("ignore", category=DeprecationWarning, module="jaxopt")

TIMED_METHODS = ("jacobian_free", "shine", "shine_opa", "shine_refine", "implicit")
HPO_METHODS = ("shine", "shine_opa", "shine_refine", "implicit")
IMPLICIT_TOL, IMPLICIT_MAX_STEPS = 1e-10, 200
JAXOPT = "jaxopt implicit"
JAXOPT_SOLVE = "jaxopt solve"  # the inner solve alone: jaxopt's floor

NOTES = """
Notes:
- `- JFB`: time over jacobian_free, which runs the same inner solve and replaces
  H^-1 by the identity: what each backward costs. `jaxopt solve` is jaxopt's inner
  solve alone (no hypergradient): compare it with jacobian_free for the cost of
  the two inner L-BFGS loops.
- With 30 weights a Hessian-vector product costs ~1 us and CG converges in <= 30 of
  them, so the implicit backward is only ~15-25 % of a hypergradient; the inner
  solve dominates, and SHINE can save at most the backward's share.
- shine_opa's pairs change the forward's L-BFGS directions (its inner steps can
  differ), and each costs a two-loop recursion, an outer gradient and an HVP.
"""

# ---------------------------------------------------------------------- problem ---


PROBLEM = _problems.logistic_regression()
inner_loss, outer_loss = PROBLEM.inner_loss, PROBLEM.outer_loss
DIM = PROBLEM.dim


def settings(names: list[str]) -> dict[str, jax.Array]:
    """The fixed lambdas of section 1 (those of the tests)."""
    all_ = {"scalar": jnp.asarray(-3.0), "per-feature": jnp.linspace(-4.0, 0.0, DIM)}
    return {k: all_[k] for k in names}


def transform(method: str, inner_tol, inner_max_steps: int):
    return optax_pes.shine_bilevel(
        inner_loss,
        outer_loss,
        inner_init=jnp.zeros(DIM),
        method=method,
        inner_tol=inner_tol,
        inner_max_steps=inner_max_steps,
        implicit_tol=IMPLICIT_TOL,
        implicit_max_steps=IMPLICIT_MAX_STEPS,
    )


def jaxopt_solver(tol, max_steps: int):
    return jaxopt.LBFGS(
        fun=inner_loss,
        tol=tol,
        maxiter=max_steps,
        history_size=30,
        implicit_diff_solve=partial(
            jaxopt.linear_solve.solve_cg, tol=IMPLICIT_TOL, maxiter=IMPLICIT_MAX_STEPS
        ),
    )


def jaxopt_hypergradient(lam, w0, tol, max_steps: int):
    """(hypergradient, (w*, L-BFGS iterations)) by jaxopt's implicit diff."""

    def value(lam):
        result = jaxopt_solver(tol, max_steps).run(w0, lam)
        return outer_loss(result.params, lam), (result.params, result.state.iter_num)

    return jax.grad(value, has_aux=True)(lam)


# ------------------------------------------------------------ 1. hypergradient ---


def hypergradient_section(args, name: str, lam, tol: float) -> dict[str, dict]:
    """Time and accuracy of one hypergradient per method at (lam, tol)."""
    exact = PROBLEM.exact_hypergradient(lam)
    warm = PROBLEM.newton_solution(lam + 0.1)
    zeros = jnp.zeros_like(lam)
    fns, info = {}, {}
    for method in TIMED_METHODS:
        tx = transform(method, tol, args.inner_max_steps)
        state = tx.init(lam)._replace(inner_params=warm)
        update = jax.jit(tx.update)
        estimate, new_state = update(zeros, state, lam)
        info[method] = dict(
            estimate=estimate,
            steps=int(new_state.inner_steps),
            converged=bool(new_state.inner_converged),
        )
        fns[method] = partial(update, zeros, state, lam)
    if args.jaxopt:
        run = jax.jit(partial(jaxopt_hypergradient, max_steps=args.inner_max_steps))
        estimate, (_, steps) = run(lam, warm, tol)
        info[JAXOPT] = dict(estimate=estimate, steps=int(steps), converged=True)
        fns[JAXOPT] = partial(run, lam, warm, tol)
        solve = jax.jit(
            lambda lam, w0, tol: jaxopt_solver(tol, args.inner_max_steps).run(w0, lam)
        )
        result = solve(lam, warm, tol)
        info[JAXOPT_SOLVE] = dict(
            estimate=None, steps=int(result.state.iter_num), converged=True
        )
        fns[JAXOPT_SOLVE] = partial(solve, lam, warm, tol)
    samples = compare(of_thunks(fns, args.calls), args.repeats)
    base, jfb = samples["implicit"], median(samples["jacobian_free"])
    print(
        f"\n== 1. hypergradient, {name} lambda, inner tol {tol:g}: one jitted update "
        f"from a warm state, median of {args.repeats} x {args.calls} calls"
    )
    print(
        f"{'':16} {'time':>11} {'- JFB':>9} {'/ implicit':>10} {'inner steps':>11} "
        f"{'rel. error':>10} {'cosine':>10}"
    )
    for method, row in info.items():
        t = median(samples[method])
        row |= dict(time=t, ratio=paired_ratio(samples[method], base))
        accuracy = f"{'':10} {'':10}"
        if row["estimate"] is not None:
            row |= dict(
                rel=rel_error(row["estimate"], exact),
                cos=cosine(row["estimate"], exact),
            )
            accuracy = f"{row['rel']:10.2e} {row['cos']:10.6f}"
        flag = "" if row["converged"] else " (hit max steps)"
        print(
            f"{method:16} {us(t, '8.0f', unit=True)} {us(t - jfb, '6.0f', unit=True)} "
            f"{row['ratio']:10.2f} {row['steps']:11d} {accuracy}{flag}"
        )
    return info


# ------------------------------------------------------------------ 2. tuning ---


def hpo_section(args, name: str, shape: tuple, target: float) -> dict[str, dict]:
    """Outer steps and wall-clock time of each method to reach `target`."""
    schedule = optax.exponential_decay(1e-3, 1, 0.9, end_value=1e-8)
    lam0 = jnp.zeros(shape)
    steppers: dict[str, Callable] = {}
    for method in HPO_METHODS:
        tx = optax.chain(
            transform(method, schedule, args.inner_max_steps), optax.adam(args.lr)
        )

        @jax.jit
        def step(carry, tx=tx):
            lam, state = carry
            updates, state = tx.update(jnp.zeros_like(lam), state, lam)
            return optax.apply_updates(lam, updates), state

        steppers[method] = (step, (lam0, tx.init(lam0)))
    if args.jaxopt:
        adam = optax.adam(args.lr)

        @jax.jit
        def jaxopt_step(carry):
            lam, w, opt_state, k = carry
            tol = schedule(k)
            grad, (w, _) = jaxopt_hypergradient(lam, w, tol, args.inner_max_steps)
            updates, opt_state = adam.update(grad, opt_state, lam)
            return optax.apply_updates(lam, updates), w, opt_state, k + 1

        carry0 = (lam0, jnp.zeros(DIM), adam.init(lam0), jnp.zeros((), jnp.int32))
        steppers[JAXOPT] = (jaxopt_step, carry0)

    def lam_of(carry):
        return carry[0]

    for step, carry in steppers.values():  # compile (and the first step) untimed
        block(step(carry))

    # Pass 1: the trajectories (deterministic) and the step that reaches the target.
    reached: dict[str, int | None] = {}
    final: dict[str, float] = {}
    times: dict[str, list[list[float]]] = {k: [] for k in steppers}
    for r in range(args.hpo_repeats):
        carries = {k: c for k, (_, c) in steppers.items()}
        elapsed = {k: [] for k in steppers}
        limit = args.outer_steps if r == 0 else max(v or 0 for v in reached.values())
        for k in range(limit):
            for method, (step, _) in steppers.items():
                if r > 0 and (reached[method] is None or k >= reached[method]):
                    continue
                start = time.perf_counter()
                carries[method] = block(step(carries[method]))
                elapsed[method].append(time.perf_counter() - start)
                if r == 0 and method not in reached:
                    loss = float(PROBLEM.held_out(lam_of(carries[method])))
                    if loss <= target:
                        reached[method] = k + 1
            if r == 0 and len(reached) == len(steppers) and not args.full_trajectory:
                break
        if r == 0:
            for method in steppers:
                reached.setdefault(method, None)
                final[method] = float(PROBLEM.held_out(lam_of(carries[method])))
        for method in steppers:
            if r == 0 or reached[method] is not None:
                n = reached[method] or len(elapsed[method])
                times[method].append(elapsed[method][:n])
    rows = {}
    base = [sum(t) for t in times["implicit"]]
    for method in steppers:
        totals = [sum(t) for t in times[method]]
        rows[method] = dict(
            steps=reached[method],
            time=median(totals),
            per_step=median(median(t) for t in times[method] if t),
            ratio=(
                paired_ratio(totals, base)
                if reached[method] and reached["implicit"]
                else float("nan")
            ),
            final=final[method],
        )
    print(
        f"\n== 2. tuning, {name} lambda: adam({args.lr}) from 0, inner tol "
        f"1e-3*0.9^k; target held-out loss {target:.6f}; median of "
        f"{args.hpo_repeats} lockstep runs"
    )
    print(
        f"{'':16} {'steps':>6} {'time to target':>15} {'/ implicit':>10} "
        f"{'per step':>11} {'held-out at stop':>17}"
    )
    for method, row in rows.items():
        steps = "never" if row["steps"] is None else f"{row['steps']}"
        print(
            f"{method:16} {steps:>6} {ms(row['time'], '12.1f', unit=True)} "
            f"{row['ratio']:10.2f} {us(row['per_step'], '8.0f', unit=True)} "
            f"{row['final']:17.6f}"
        )
    return rows


# ------------------------------------------------------------- 3. high-dim ---

HOAG = "implicit (HOAG)"  # implicit + HOAG's decreasing inner tolerance
HIGHDIM_NOTES = """
Notes (high-dim):
- `backward share` = (time - jacobian_free's time) / time: the part of an update
  that goes to v; jacobian_free runs the same inner solve with v = grad_w g. SHINE
  can save at most the implicit method's share.
- `vs true`: against CG to 1e-12 at a w* solved to 1e-10; `vs same w*`: against CG
  to 1e-12 at the method's own inexact w* (what the backward alone can reach).
- HOAG (Pedregosa 2016) = warm-started inner solves to a tolerance decreasing over
  outer steps + CG: exactly `implicit` with inner_tol 1e-3*0.9^k, labelled so in the
  tuning table. `jaxopt implicit` = jaxopt.LBFGS (history 30) differentiated by its
  custom_root with CG to 1e-10.
"""


# The high-dim sections' rows: label -> (method, whether hessian_diag is given).
HIGHDIM_VARIANTS = {
    "jacobian_free": ("jacobian_free", False),
    "shine": ("shine", False),
    "shine + diag": ("shine", True),
    "shine_opa": ("shine_opa", False),
    "shine_refine": ("shine_refine", False),
    "shine_refine + diag": ("shine_refine", True),
    "implicit": ("implicit", False),
}


def highdim_transform(label, problem, inner_tol, **kwargs):
    """The transform of a `HIGHDIM_VARIANTS` row (or a plain method name)."""
    method, diag = HIGHDIM_VARIANTS.get(label, (label, False))
    if diag:
        kwargs["hessian_diag"] = problem.hessian_diag
    return optax_pes.shine_bilevel(
        problem.inner_loss,
        problem.outer_loss,
        inner_init=jnp.zeros(problem.dim),
        method=method,
        inner_tol=inner_tol,
        inner_max_steps=1000,
        implicit_tol=IMPLICIT_TOL,
        implicit_max_steps=1000,
        loss_kwargs=("data",),
        **kwargs,
    )


def highdim_jaxopt(problem, lam, w0, tol):
    """(hypergradient, w*) by jaxopt's implicit differentiation."""
    solver = jaxopt.LBFGS(
        fun=lambda w, lam, data: problem.inner_loss(w, lam, data=data),
        tol=tol,
        maxiter=1000,
        history_size=30,
        implicit_diff_solve=partial(
            jaxopt.linear_solve.solve_cg, tol=IMPLICIT_TOL, maxiter=1000
        ),
    )

    def value(lam, data):
        w = solver.run(w0, lam, data).params
        return problem.outer_loss(w, lam, data=data), w

    return jax.grad(value, has_aux=True)(lam, problem.data)


def highdim_hypergradient(args, problem, name, lam, tol):
    """Time, backward share and accuracy of one hypergradient per method."""
    data = problem.data
    exact, w_tight = problem.reference(lam)
    warm = problem.reference(lam + 0.1, w_tight, cg_tol=1e-2)[1]
    zeros = jnp.zeros_like(lam)
    fns, est = {}, {}
    for method in HIGHDIM_VARIANTS:
        tx = highdim_transform(method, problem, tol)
        state = tx.init(lam)._replace(inner_params=warm)
        update = jax.jit(lambda u, s, lam, data, tx=tx: tx.update(u, s, lam, data=data))
        est[method], new_state = update(zeros, state, lam, data)
        if method == "implicit":
            w_same = new_state.inner_params
            steps = int(new_state.inner_steps)
        fns[method] = partial(update, zeros, state, lam, data)
    same = _problems_reference_at(problem, lam, w_same)
    if args.jaxopt:
        run = jax.jit(lambda lam, w0: highdim_jaxopt(problem, lam, w0, tol))
        est[JAXOPT] = run(lam, warm)[0]
        fns[JAXOPT] = partial(run, lam, warm)
    samples = compare(of_thunks(fns, 1), args.highdim_repeats)
    base, jfb = samples["implicit"], median(samples["jacobian_free"])
    print(
        f"\n== 3a. high-dim hypergradient, {name} lambda, {problem.dim} features, "
        f"inner tol {tol:g} ({steps} warm L-BFGS steps); median of "
        f"{args.highdim_repeats}; exact at the same w* vs true: "
        f"{rel_error(same, exact):.1e}"
    )
    print(
        f"{'':20} {'time':>9} {'/ implicit':>10} {'backward share':>14} "
        f"{'rel. err vs true':>16} {'vs same w*':>10} {'cosine':>9}"
    )
    rows = {}
    for method, e in est.items():
        t = median(samples[method])
        rows[method] = row = dict(
            time=t,
            ratio=paired_ratio(samples[method], base),
            share=(t - jfb) / t,
            rel=rel_error(e, exact),
            rel_same=rel_error(e, same),
            cos=cosine(e, exact),
        )
        print(
            f"{method:20} {ms(t, '6.0f', unit=True)} {row['ratio']:10.2f} "
            f"{row['share']:14.0%} {row['rel']:16.2e} {row['rel_same']:10.2e} "
            f"{row['cos']:9.5f}"
        )
    return rows, (warm, exact, same)


def _problems_reference_at(problem, lam, w):
    """The exact hypergradient at a given w (CG to 1e-12, no inner step taken:
    the inner tolerance is met already)."""
    return problem.reference(lam, w, inner_tol=1e30)[0]


def highdim_refine(args, problem, name, lam, tol, warm, exact, same):
    """shine_refine's error against the exact hypergradient as refine_steps grows."""
    print(f"\n== 3b. shine_refine vs refine_steps, {name} lambda, inner tol {tol:g}")
    print(
        f"{'refine_steps':>12} {'vs true':>10} {'vs same w*':>10} {'cosine':>9}"
        f" | + diag: {'vs true':>10} {'vs same w*':>10} {'cosine':>9}"
    )
    zeros = jnp.zeros_like(lam)
    rows = {}
    for k in args.refine_steps:
        rows[k] = []
        for label in ("shine_refine", "shine_refine + diag"):
            tx = highdim_transform(label, problem, tol, refine_steps=k)
            state = tx.init(lam)._replace(inner_params=warm)
            update = jax.jit(
                lambda u, s, lam, data, tx=tx: tx.update(u, s, lam, data=data)
            )
            e = update(zeros, state, lam, problem.data)[0]
            rows[k] += [rel_error(e, exact), rel_error(e, same), cosine(e, exact)]
        r = rows[k]
        print(
            f"{k:12d} {r[0]:10.2e} {r[1]:10.2e} {r[2]:9.5f}"
            f" |         {r[3]:10.2e} {r[4]:10.2e} {r[5]:9.5f}"
        )
    return rows


def tight_held_out(problem, lam, w0=None, tol=1e-6):
    """(held-out loss, w) at an inner solution for `lam` solved to `tol` from `w0`
    (the gradient norm: with strong convexity >= exp(min lam), a held-out loss
    accurate to far below the 1e-3 of the targets)."""
    _, w = problem.reference(lam, w0, inner_tol=tol, cg_tol=1e-2)
    return float(problem.outer_loss(w, lam, data=problem.data)), w


def highdim_grid(problem, lo=-8.0, hi=2.0):
    """Minimum held-out loss over a scalar lambda (tight inner solves): a grid of
    step 0.5 on [lo, hi], warm-started from large lambda down, then step 0.05
    around the best point."""
    coarse = np.arange(hi, lo - 1e-9, -0.5)
    w, losses, ws = None, [], []
    for lam in coarse:
        loss, w = tight_held_out(problem, jnp.asarray(lam), w)
        losses.append(loss)
        ws.append(w)
    i = int(np.argmin(losses))
    best, best_lam = losses[i], coarse[i]
    w = ws[i]
    for lam in np.arange(coarse[i] + 0.45, coarse[i] - 0.46, -0.05):
        loss, w = tight_held_out(problem, jnp.asarray(lam), w)
        if loss < best:
            best, best_lam = loss, lam
    return best, float(best_lam)


def highdim_tuning(args, problem, name, lam0, lr):
    """Held-out loss vs wall-clock: adam on lambda, HOAG's inner tolerance.

    The run is timed alone; the held-out loss of each iterate lambda_k is
    evaluated afterwards, untimed, at a tight inner solution for lambda_k (warm
    started from the method's own w*), so that every method is judged by the
    hyperparameters it found, not by the looseness of its own inner solves.
    Target: the scalar grid's minimum + 1e-3 (scalar lambda), HOAG's final
    held-out loss (per-feature: no grid in 20k dimensions).
    """
    schedule = optax.exponential_decay(1e-3, 1, 0.9, end_value=1e-8)
    steppers = {}
    for method in HIGHDIM_VARIANTS:
        tx = optax.chain(highdim_transform(method, problem, schedule), optax.adam(lr))

        @jax.jit
        def step(carry, data, tx=tx):
            lam, state = carry
            updates, state = tx.update(jnp.zeros_like(lam), state, lam, data=data)
            return optax.apply_updates(lam, updates), state

        label = HOAG if method == "implicit" else method
        steppers[label] = (step, (lam0, tx.init(lam0)))
    carries = {k: c for k, (_, c) in steppers.items()}
    for step, carry in steppers.values():  # compile both carry types, untimed
        block(step(step(carry, problem.data), problem.data))
    clock = dict.fromkeys(steppers, 0.0)
    # (time, lambda_k, warm start) after each step: lambda_k's own w* comes one
    # step later, so warm-start from the last solution the method has.
    trace = {k: [(0.0, lam0, None)] for k in steppers}
    for _ in range(args.highdim_steps):
        for label, (step, _) in steppers.items():
            start = time.perf_counter()
            carries[label] = block(step(carries[label], problem.data))
            clock[label] += time.perf_counter() - start
            lam, state = carries[label]
            trace[label].append((clock[label], lam, state[0].inner_params))
    start = time.perf_counter()
    curves = {}
    for label, points in trace.items():
        curves[label] = [
            (t, tight_held_out(problem, lam, w)[0]) for t, lam, w in points
        ]
    eval_s = time.perf_counter() - start
    finals = {k: c[-1][1] for k, c in curves.items()}
    if name == "scalar":
        start = time.perf_counter()
        grid_min, grid_lam = highdim_grid(problem)
        target = grid_min + 1e-3
        what = (
            f"grid min {grid_min:.5f} (lambda {grid_lam:.2f}, "
            f"{time.perf_counter() - start:.0f} s) + 1e-3"
        )
    else:
        target, what = finals[HOAG], "HOAG's final held-out"
    print(
        f"\n== 3c. high-dim tuning, {name} lambda from {float(jnp.mean(lam0)):g}: "
        f"adam({lr}), inner tol 1e-3*0.9^k, {args.highdim_steps} outer steps in "
        f"lockstep; held-out at a tight w* (1e-6) for each iterate, evaluated after "
        f"the runs ({eval_s:.0f} s, untimed); target {target:.5f} = {what}"
    )
    print(
        f"{'':20} {'total time':>10} {'per step':>9} {'final held-out':>14} "
        f"{'best':>8} {'time to target':>14} {'/ HOAG':>7}"
    )
    hit = {
        k: next((t for t, loss in c if loss <= target), None) for k, c in curves.items()
    }
    rows = {}
    for label in steppers:
        h, ref = hit[label], hit[HOAG]
        ratio = h / ref if h is not None and ref else None
        best = min(loss for _, loss in curves[label])
        rows[label] = dict(
            total=clock[label], final=finals[label], best=best, hit=h, ratio=ratio
        )
        hit_s = "not reached" if h is None else f"{h:.1f} s"
        ratio_s = "-" if ratio is None else f"{ratio:.2f}"
        print(
            f"{label:20} {clock[label]:8.1f} s "
            f"{clock[label] / args.highdim_steps * 1e3:6.0f} ms "
            f"{finals[label]:14.5f} {best:8.5f} {hit_s:>14} {ratio_s:>7}"
        )
    return rows, curves


def highdim_main(args) -> None:
    start = time.perf_counter()
    problem = _problems.highdim_logistic_regression(
        args.highdim_samples, args.highdim_features
    )
    d = problem.dim
    print(
        f"\nhigh-dim: make_classification({args.highdim_samples}, {d}, "
        f"n_informative=50, flip_y=0.05), half held out, float64 "
        f"(data in {time.perf_counter() - start:.0f} s)"
    )
    for name, lam in (
        ("scalar", jnp.asarray(-3.0)),
        ("per-feature", jnp.full(d, -3.0)),
    ):
        if "hypergradient" not in args.highdim_sections:
            break
        _, (warm, exact, same) = highdim_hypergradient(
            args, problem, name, lam, args.highdim_tol
        )
        highdim_refine(args, problem, name, lam, args.highdim_tol, warm, exact, same)
    if args.highdim_steps and "tuning" in args.highdim_sections:
        highdim_tuning(args, problem, "scalar", jnp.asarray(-6.0), 0.2)
        highdim_tuning(args, problem, "per-feature", jnp.full(d, -3.0), 0.05)
    print(HIGHDIM_NOTES)
    print(f"(high-dim total {time.perf_counter() - start:.0f} s)")


# ------------------------------------------------------------------------ main ---


def summary(args, hyper, hpo) -> str:
    """One markdown row per method and lambda (paste into a README)."""
    tols = [f"{t:g}" for t in args.inner_tol if any(t == k[1] for k in hyper)]
    out = [
        "Ratios to `implicit` (CG to 1e-10), measured side by side; in brackets: "
        "the hypergradient's relative error (scalar lambda) or cosine (per-feature) "
        "vs the dense exact one, and outer steps to the target (implicit's).\n",
        f"| method | lambda | hypergradient time, inner tol {', '.join(tols) or '-'} "
        "| tuning: time to grid-search loss + 1e-3 |",
        "|---|---|---|---|",
    ]
    methods = ["shine", "shine_opa", "shine_refine"] + ([JAXOPT] if args.jaxopt else [])
    for name in args.lambdas:
        for m in methods:
            cells = []
            for tol in args.inner_tol:
                row = hyper.get((name, tol), {}).get(m)
                if row is not None:
                    acc = (
                        f"{row['rel']:.0e}" if name == "scalar" else f"{row['cos']:.3f}"
                    )
                    cells.append(f"{row['ratio']:.2f} ({acc})")
            tune = "-"
            if name in hpo and m in hpo[name]:
                row, ref = hpo[name][m], hpo[name]["implicit"]
                steps = "never" if row["steps"] is None else row["steps"]
                tune = f"{row['ratio']:.2f} ({steps} vs {ref['steps']})"
            out.append(f"| {m} | {name} | {', '.join(cells) or '-'} | {tune} |")
    out.append("\nBar (DESIGN.md 4): shine's tuning time to target / implicit < 1.")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tolerance, few reps")
    parser.add_argument(
        "--inner-tol",
        type=float,
        nargs="+",
        default=None,
        help="inner tolerances of section 1 (default 1e-4 1e-6 1e-8; --quick: 1e-6)",
    )
    parser.add_argument("--inner-max-steps", type=int, default=500)
    parser.add_argument(
        "--lambdas",
        nargs="+",
        choices=("scalar", "per-feature"),
        default=["scalar", "per-feature"],
    )
    parser.add_argument(
        "--sections", nargs="+", choices=("hypergradient", "hpo"), default=None
    )
    parser.add_argument("--repeats", type=int, default=None, help="section 1 samples")
    parser.add_argument("--calls", type=int, default=10, help="calls per sample")
    parser.add_argument("--hpo-repeats", type=int, default=None, help="tuning runs")
    parser.add_argument("--outer-steps", type=int, default=300, help="tuning budget")
    parser.add_argument("--lr", type=float, default=0.1, help="adam learning rate")
    parser.add_argument("--no-jaxopt", action="store_true", help="skip jaxopt")
    parser.add_argument(
        "--full-trajectory",
        action="store_true",
        help="run all --outer-steps in the first tuning run (final held-out losses)",
    )
    parser.add_argument(
        "--highdim",
        action="store_true",
        help="only the high-dimensional problems (section 3; 8-15 min on 2 CPUs)",
    )
    parser.add_argument("--highdim-features", type=int, default=20000)
    parser.add_argument("--highdim-samples", type=int, default=4000)
    parser.add_argument("--highdim-tol", type=float, default=1e-6)
    parser.add_argument("--highdim-repeats", type=int, default=5)
    parser.add_argument("--highdim-steps", type=int, default=25, help="tuning steps")
    parser.add_argument(
        "--highdim-sections",
        nargs="+",
        choices=("hypergradient", "tuning"),
        default=["hypergradient", "tuning"],
    )
    parser.add_argument(
        "--refine-steps", type=int, nargs="+", default=[0, 1, 2, 5, 10, 20, 40]
    )
    args = parser.parse_args()
    args.inner_tol = args.inner_tol or ([1e-6] if args.quick else [1e-4, 1e-6, 1e-8])
    args.repeats = args.repeats or (15 if args.quick else 50)
    args.hpo_repeats = args.hpo_repeats or (3 if args.quick else 7)
    args.sections = args.sections or ["hypergradient", "hpo"]
    args.jaxopt = jaxopt is not None and not args.no_jaxopt
    if args.highdim:
        print(
            f"jax {jax.__version__}, {os.cpu_count()} CPU cores, optax "
            f"{optax.__version__}; jaxopt reference: {'yes' if args.jaxopt else 'no'}"
        )
        highdim_main(args)
        return
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({os.cpu_count()} CPU cores), optax {optax.__version__}, float64; "
        f"breast cancer, {len(PROBLEM.y_train)} train / {len(PROBLEM.y_val)} held out, "
        f"{DIM} features; jaxopt reference: {'yes' if args.jaxopt else 'no'}"
    )
    start = time.perf_counter()
    hyper, hpo = {}, {}
    if "hypergradient" in args.sections:
        for name, lam in settings(args.lambdas).items():
            for tol in args.inner_tol:
                hyper[name, tol] = hypergradient_section(args, name, lam, tol)
        print(f"(section 1: {time.perf_counter() - start:.0f} s)")
    if "hpo" in args.sections:
        t0 = time.perf_counter()
        best, best_lam = PROBLEM.grid_minimum()
        print(
            f"\ngrid search (scalar lambda, 241 points): held-out {best:.6f} at "
            f"lambda = {best_lam:.2f}"
        )
        for name in args.lambdas:
            shape = () if name == "scalar" else (DIM,)
            hpo[name] = hpo_section(args, name, shape, best + 1e-3)
        print(f"(section 2: {time.perf_counter() - t0:.0f} s)")
    print(NOTES)
    print(f"== Summary (CPU, float64)\n\n{summary(args, hyper, hpo)}")
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
