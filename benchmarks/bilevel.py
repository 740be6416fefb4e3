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
   excluded, median over interleaved repeats. Ratios are to `implicit` (conjugate
   gradient to 1e-10, the exact reference); `jacobian_free` is the floor (the same
   inner solve, the inverse replaced by the identity), so `time - JFB time` is what
   the backward costs. Accuracy against the dense exact hypergradient (Newton's
   w*, dense Hessian solve): relative error for the scalar lambda, cosine (and
   relative error) for the per-feature one. Optional external reference: the same
   implicit hypergradient with jaxopt (`jaxopt.LBFGS`, history 30, zoom line
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

    python benchmarks/bilevel.py            # 3 inner tolerances, ~1.5 min, 2 CPUs
    python benchmarks/bilevel.py --quick    # one tolerance, fewer repeats, < 1 min
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
    samples = compare(of_thunks(fns, args.calls), args.repeats, rotate=False)
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
    args = parser.parse_args()
    args.inner_tol = args.inner_tol or ([1e-6] if args.quick else [1e-4, 1e-6, 1e-8])
    args.repeats = args.repeats or (15 if args.quick else 50)
    args.hpo_repeats = args.hpo_repeats or (3 if args.quick else 7)
    args.sections = args.sections or ["hypergradient", "hpo"]
    args.jaxopt = jaxopt is not None and not args.no_jaxopt
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
