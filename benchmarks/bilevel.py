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
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
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


def load_data():
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(y))
    x, y = x[order], y[order].astype(np.float64)
    n = len(y) // 2
    x = (x - x[:n].mean(0)) / x[:n].std(0)
    return (jnp.asarray(x[:n]), jnp.asarray(y[:n])), (jnp.asarray(x[n:]), y[n:])


(X_TRAIN, Y_TRAIN), (X_VAL, Y_VAL) = load_data()
DIM = X_TRAIN.shape[1]


def log_loss(w, x, y):
    z = x @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z)


def inner_loss(w, lam):
    return log_loss(w, X_TRAIN, Y_TRAIN) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)


def outer_loss(w, lam):
    return log_loss(w, X_VAL, Y_VAL)


@jax.jit
def newton_solution(lam):
    def step(w, _):
        hess = jax.hessian(inner_loss)(w, lam)
        return w - jnp.linalg.solve(hess, jax.grad(inner_loss)(w, lam)), None

    return jax.lax.scan(step, jnp.zeros(DIM), None, length=30)[0]


@jax.jit
def held_out(lam):
    return outer_loss(newton_solution(lam), lam)


@jax.jit
def exact_hypergradient(lam):
    """Dense reference: grad_h g - (d_h grad_w f)^T H^-1 grad_w g at w*."""
    w = newton_solution(lam)
    v = jnp.linalg.solve(jax.hessian(inner_loss)(w, lam), jax.grad(outer_loss)(w, lam))
    mixed = jax.jacobian(lambda h: jax.grad(inner_loss)(w, h))(lam)
    return jax.grad(outer_loss, argnums=1)(w, lam) - jnp.tensordot(v, mixed, axes=1)


def grid_minimum() -> tuple[float, float]:
    lams = jnp.linspace(-10.0, 2.0, 241)
    losses = jax.vmap(held_out)(lams)
    i = int(jnp.argmin(losses))
    return float(losses[i]), float(lams[i])


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


# ----------------------------------------------------------------------- timing ---


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, calls: int
) -> dict[str, list[float]]:
    """Seconds per call of each warmed-up thunk: `repeats` samples of `calls` calls,
    round-robin over the thunks."""
    for fn in fns.values():
        block(fn())
        block(fn())
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = fn()
            block(out)
            samples[name].append((time.perf_counter() - start) / calls)
    return samples


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median of the ratios of samples taken side by side."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def cosine(a, b) -> float:
    a, b = jnp.ravel(a), jnp.ravel(b)
    return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def rel_error(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def us(seconds: float) -> str:
    return f"{1e6 * seconds:8.0f} us"


# ------------------------------------------------------------ 1. hypergradient ---


def hypergradient_section(args, name: str, lam, tol: float) -> dict[str, dict]:
    """Time and accuracy of one hypergradient per method at (lam, tol)."""
    exact = exact_hypergradient(lam)
    warm = newton_solution(lam + 0.1)
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
    samples = interleaved(fns, args.repeats, args.calls)
    base, jfb = samples["implicit"], statistics.median(samples["jacobian_free"])
    print(
        f"\n== 1. hypergradient, {name} lambda, inner tol {tol:g}: one jitted update "
        f"from a warm state, median of {args.repeats} x {args.calls} calls"
    )
    print(
        f"{'':16} {'time':>11} {'- JFB':>9} {'/ implicit':>10} {'inner steps':>11} "
        f"{'rel. error':>10} {'cosine':>10}"
    )
    for method, row in info.items():
        t = statistics.median(samples[method])
        row |= dict(time=t, ratio=median_ratio(samples[method], base))
        accuracy = f"{'':10} {'':10}"
        if row["estimate"] is not None:
            row |= dict(
                rel=rel_error(row["estimate"], exact),
                cos=cosine(row["estimate"], exact),
            )
            accuracy = f"{row['rel']:10.2e} {row['cos']:10.6f}"
        flag = "" if row["converged"] else " (hit max steps)"
        print(
            f"{method:16} {us(t)} {1e6 * (t - jfb):6.0f} us {row['ratio']:10.2f} "
            f"{row['steps']:11d} {accuracy}{flag}"
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
                    loss = float(held_out(lam_of(carries[method])))
                    if loss <= target:
                        reached[method] = k + 1
            if r == 0 and len(reached) == len(steppers) and not args.full_trajectory:
                break
        if r == 0:
            for method in steppers:
                reached.setdefault(method, None)
                final[method] = float(held_out(lam_of(carries[method])))
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
            time=statistics.median(totals),
            per_step=statistics.median(
                statistics.median(t) for t in times[method] if t
            ),
            ratio=(
                median_ratio(totals, base)
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
            f"{method:16} {steps:>6} {1e3 * row['time']:12.1f} ms {row['ratio']:10.2f} "
            f"{us(row['per_step'])} {row['final']:17.6f}"
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
        f"breast cancer, {X_TRAIN.shape[0]} train / {X_VAL.shape[0]} held out, "
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
        best, best_lam = grid_minimum()
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
