"""PES overhead: optax_pes.pes against the bare unroll it wraps, and against evosax.

Prints, measured side by side in one run (never as tests), on the CPU and on whatever
other device jax finds:

1. PES update time / time of the bare vmapped K-step forward unroll of the same N
   particles (the same perturbed thetas, inner states and steps: a jitted `lax.scan`
   over K of `jax.vmap(system.step)`). Bar: <= 1.15. Two call structures, each
   compared like for like: one jitted call per window (Python dispatch included), and
   a `lax.scan` over many windows inside one jit (dispatch removed).
2. optax_pes.pes (chained with adam) against evosax's `PersistentES` driven by hand
   on the same task, N and K (ask -> vmapped K-step unroll -> tell). Bar: ours faster.
3. Peak memory of the compiled PES update (XLA's `memory_analysis`) at K=10 vs K=100
   and T=100 vs T=10000. Bar: flat in T, temporaries independent of K.

Two inner problems: an MLP trained by SGD on synthetic regression data (theta = log
learning rate), where an inner step has real work, and the PES paper's
influence-balancing system, where a step is ~50 flops per particle and the fixed
per-window cost of the estimator is proportionally largest.

    python benchmarks/pes_overhead.py            # default settings (< 10 min, 2 cores)
    python benchmarks/pes_overhead.py --quick    # small repeat counts (< 2 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import optax
from _problems import SYSTEMS, THETA0, bare_window, perturbed
from _timing import (
    add_sampling_arguments,
    block,
    calls_for,
    compare,
    header,
    medians,
    memory_of,
    paired_ratio,
    sampling_defaults,
    sized,
    us,
)

import optax_pes

SIGMA = 0.1
OUTER_LR = 1e-2

SYSTEM_NAMES = ("infl", "mlp")  # of _problems.SYSTEMS


def horizon_for(k: int) -> int:
    # A multiple of K (episodes end on window boundaries) and long enough that the
    # occasional re-initialisation is a small, realistic part of the cost.
    return max(1000, 10 * k)


# ------------------------------------------------------------------ 1. overhead ----


@dataclasses.dataclass
class Setting:
    system: str
    n: int
    k: int


def min_es_window(system: optax_pes.UnrolledSystem, n: int, k: int):
    """The least any antithetic ES window does: fresh noise, perturb, unroll, score.

    (theta, (inner, key, xi)) -> ((inner, key, xi), estimate). No episode clocks,
    resets, non-finite handling or diagnostics: a floor, not a usable estimator.
    """
    vstep = jax.vmap(system.step)
    g = n // 2

    def window(theta, carry):
        inner, key, xi = carry
        key, noise_key, step_key = jax.random.split(key, 3)
        z = jax.random.normal(noise_key, (g,) + theta.shape, theta.dtype)
        thetas = jnp.concatenate([theta + SIGMA * z, theta - SIGMA * z])
        keys = jax.random.split(step_key, (k, g))

        def body(c, ks):
            state, total = c
            state, loss = vstep(thetas, state, jnp.concatenate([ks, ks]))
            return (state, total + loss), None

        (inner, total), _ = jax.lax.scan(body, (inner, jnp.zeros(n)), keys)
        xi = xi + z / SIGMA
        estimate = jnp.tensordot(total[:g] - total[g:], xi, axes=1) / n
        return (inner, key, xi), estimate

    return window


def overhead(setting: Setting, budget: float, repeats: int) -> dict[str, list[float]]:
    """Seconds per window: PES and bare unroll, per-call jit and scan over windows."""
    n, k = setting.n, setting.k
    system = SYSTEMS[setting.system](horizon_for(k))
    theta = THETA0[setting.system]
    zeros = jnp.zeros_like(theta)
    tx = optax_pes.pes(system, num_particles=n, sigma=SIGMA, truncation_length=k, key=0)

    # PES, one jitted call per window, state threaded.
    pes_update = jax.jit(tx.update)
    pes_state = block(pes_update(zeros, tx.init(theta), theta)[1])  # compile + init
    start = time.perf_counter()
    pes_state = block(pes_update(zeros, pes_state, theta)[1])
    one = time.perf_counter() - start

    def pes_call(state):
        return pes_update(zeros, state, theta)[1]

    # Bare unroll of the same particles: same perturbed thetas, same inner states.
    thetas = perturbed(theta, n, SIGMA)
    bare = jax.jit(bare_window(system, n, k))
    bare_carry = (pes_state.inner_state, jax.random.key(2))
    block(bare(thetas, *bare_carry))  # compile

    def bare_call(carry):
        inner, key, _ = bare(thetas, *carry)
        return inner, key

    # The same, as a scan over `m` windows inside one jit (no Python dispatch).
    m = calls_for(one, budget)

    # theta / thetas are arguments, not closed-over constants XLA could fold.
    @jax.jit
    def pes_scan(state, theta):
        def body(carry, _):
            state, acc = carry
            upd, state = tx.update(jnp.zeros_like(theta), state, theta)
            return (state, acc + upd), None

        (state, acc), _ = jax.lax.scan(
            body, (state, jnp.zeros_like(theta)), None, length=m
        )
        return state, acc

    window = bare_window(system, n, k)

    @jax.jit
    def bare_scan(carry, thetas):
        def body(carry, _):
            inner, key, acc = carry
            inner, key, total = window(thetas, inner, key)
            return (inner, key, acc + total), None

        (inner, key, _), _ = jax.lax.scan(body, (*carry, jnp.zeros(n)), None, length=m)
        return inner, key

    es_window = min_es_window(system, n, k)

    @jax.jit
    def min_es_scan(carry, theta):
        def body(carry, _):
            carry, acc = carry
            carry, estimate = es_window(theta, carry)
            return (carry, acc + estimate), None

        return jax.lax.scan(body, (carry, jnp.zeros_like(theta)), None, length=m)[0]

    # The state's round trip alone: PES's inputs in, a same-shaped state out, no
    # work. What one call per window pays for moving ~15 small leaves each way.
    def touch(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jax.random.key_data(x) + 1)
        return x + jnp.ones((), x.dtype)

    round_trip = jax.jit(lambda u, s, p: (u + p, jax.tree.map(touch, s)))

    def round_trip_call(state):
        return round_trip(zeros, state, theta)[1]

    es_carry = (
        pes_state.inner_state,
        jax.random.key(3),
        jnp.zeros((n // 2,) + theta.shape),
    )
    candidates = {
        "pes_call": (pes_call, pes_state, 1),
        "bare_call": (bare_call, bare_carry, 1),
        "state_io": (round_trip_call, pes_state, 1),
        "pes_scan": (lambda c: pes_scan(c[0], theta), (pes_state, zeros), m),
        "bare_scan": (lambda c: bare_scan(c, thetas), bare_carry, m),
        "min_es_scan": (
            lambda c: min_es_scan(c[0], theta),
            (es_carry, zeros),
            m,
        ),
    }
    return compare({name: sized(*c, budget) for name, c in candidates.items()}, repeats)


# ------------------------------------------------------------------ 2. evosax ------


def evosax_vs_ours(
    setting: Setting, budget: float, repeats: int
) -> dict[str, list[float]]:
    """Seconds per outer update: optax_pes.pes + adam vs evosax PersistentES + adam."""
    from evosax.algorithms import PersistentES

    n, k = setting.n, setting.k
    horizon = horizon_for(k)
    system = SYSTEMS[setting.system](horizon)
    theta0 = THETA0[setting.system]
    zeros = jnp.zeros_like(theta0)

    # ---- ours: chain(pes, adam), one outer step = update + apply_updates.
    tx = optax.chain(
        optax_pes.pes(system, num_particles=n, sigma=SIGMA, truncation_length=k, key=0),
        optax.adam(OUTER_LR),
    )

    def ours_step(carry):
        theta, state = carry
        updates, state = tx.update(zeros, state, theta)
        return optax.apply_updates(theta, updates), state

    # ---- evosax: ask -> reset inner states at episode start -> K-step unroll -> tell.
    es = PersistentES(
        population_size=n,
        solution=theta0,
        optimizer=optax.adam(OUTER_LR),
        std_schedule=optax.constant_schedule(SIGMA),
    )
    es_params = es.default_params.replace(T=horizon, K=k)
    vinit, vstep = jax.vmap(system.init), jax.vmap(system.step)

    def evo_step(carry):
        es_state, inner, key = carry
        key, k_ask, k_init, k_steps, k_tell = jax.random.split(key, 5)
        population, es_state = es.ask(k_ask, es_state, es_params)
        # evosax tracks the episode clock (inner_step_counter) and the perturbation
        # accumulator; the inner states are the caller's: fresh at an episode start.
        inner = jax.lax.cond(
            es_state.inner_step_counter == 0,
            lambda: vinit(population, jax.random.split(k_init, n)),
            lambda: inner,
        )

        def body(c, ks):
            state, total = c
            state, loss = vstep(population, state, ks)
            return (state, total + loss), None

        (inner, fitness), _ = jax.lax.scan(
            body, (inner, jnp.zeros(n)), jax.random.split(k_steps, (k, n))
        )
        es_state, _ = es.tell(k_tell, population, fitness, es_state, es_params)
        return es_state, inner, key

    # evosax as its API is used in a Python loop: jitted ask, unroll, tell calls.
    ask = jax.jit(lambda key, st: es.ask(key, st, es_params))
    tell = jax.jit(lambda key, pop, fit, st: es.tell(key, pop, fit, st, es_params)[0])

    @jax.jit
    def unroll(population, inner, key, counter):
        k_init, k_steps = jax.random.split(key)
        inner = jax.lax.cond(
            counter == 0,
            lambda: vinit(population, jax.random.split(k_init, n)),
            lambda: inner,
        )

        def body(c, ks):
            state, total = c
            state, loss = vstep(population, state, ks)
            return (state, total + loss), None

        (inner, fitness), _ = jax.lax.scan(
            body, (inner, jnp.zeros(n)), jax.random.split(k_steps, (k, n))
        )
        return inner, fitness

    def evo_api_step(carry):
        es_state, inner, key = carry
        key, k_ask, k_unroll, k_tell = jax.random.split(key, 4)
        population, es_state = ask(k_ask, es_state)
        inner, fitness = unroll(
            population, inner, k_unroll, es_state.inner_step_counter
        )
        es_state = tell(k_tell, population, fitness, es_state)
        return es_state, inner, key

    ours_jit, evo_jit = jax.jit(ours_step), jax.jit(evo_step)
    ours_carry = block(ours_jit((theta0, tx.init(theta0))))
    es_state = es.init(jax.random.key(0), theta0, es_params)
    inner0 = jax.vmap(system.init)(
        jnp.broadcast_to(theta0, (n,) + theta0.shape),
        jax.random.split(jax.random.key(3), n),
    )
    evo_carry = block(evo_jit((es_state, inner0, jax.random.key(4))))
    block(evo_api_step(evo_carry))  # compile the three pieces
    start = time.perf_counter()
    block(ours_jit(ours_carry))
    m = calls_for(time.perf_counter() - start, budget)

    def scanned(step):
        @jax.jit
        def run(carry):
            return jax.lax.scan(lambda c, _: (step(c), None), carry, None, length=m)[0]

        return run

    ours_scan, evo_scan = scanned(ours_step), scanned(evo_step)
    candidates = {
        "ours_call": (ours_jit, ours_carry, 1),
        "evo_call": (evo_jit, evo_carry, 1),
        "evo_api": (evo_api_step, evo_carry, 1),
        "ours_scan": (ours_scan, ours_carry, m),
        "evo_scan": (evo_scan, evo_carry, m),
    }
    return compare({name: sized(*c, budget) for name, c in candidates.items()}, repeats)


# ------------------------------------------------------------------ 3. memory ------


def compiled_memory(system_name: str, n: int, k: int, horizon: int) -> dict[str, int]:
    system = SYSTEMS[system_name](horizon)
    theta = THETA0[system_name]
    tx = optax_pes.pes(system, num_particles=n, sigma=SIGMA, truncation_length=k, key=0)
    state = tx.init(theta)
    pes = jax.jit(tx.update).lower(jnp.zeros_like(theta), state, theta)
    bare = jax.jit(bare_window(system, n, k)).lower(
        jnp.broadcast_to(theta, (n,) + theta.shape),
        state.inner_state,
        jax.random.key(0),
    )
    return {
        **memory_of(pes.compile()),
        "bare_temp": memory_of(bare.compile())["temp"],
    }


# ------------------------------------------------------------------ main -----------

OVERHEAD_NOTE = """\
notes: ratio = PES / bare, median of per-repeat ratios of interleaved samples.
  'call': one jax.jit(tx.update) call per window (Python dispatch included, the
  same for both sides, so it pulls ratios towards 1 when windows are tiny); 'scan':
  lax.scan over many windows in one jit. 'minES' is a hand-written antithetic ES
  window (fresh noise, perturb, unroll, score; no episode clocks, resets,
  non-finite handling or diagnostics): the floor for any PES implementation.
  'infl' (influence balancing, n=23) does ~50 flops per particle per inner step,
  so a K=10 window is a few microseconds and the per-window work every ES must do
  (a fresh normal draw, the perturbation, the score) plus PES's bookkeeping (episode
  clocks, reset cond, validity masks, diagnostics) are a visible fraction of it:
  even minES is over 1.15 there. With K=100, or a real inner step ('mlp': an SGD
  step of a 2-layer MLP), the fixed cost is amortised.
  'state I/O': one jitted call that takes PES's inputs (updates, state, params) and
  returns a same-shaped state with no work: what a call per window costs before any
  work is done (dispatch and XLA:CPU's per-call runtime, which is not linear in the
  leaves: one (N, 23) inner-state leaf more or less changed it by ~20 us here). On
  'infl' it is as large as pes/call itself, and a bare call costs 20 us pinned to one
  core against 45 us on two: the per-call ratio there measures the runtime, not the
  window's work (the scan columns do)."""


def run_device(device: jax.Device, args: argparse.Namespace, table: list[str]) -> None:
    name = f"{device.platform}"
    if device.platform == "cpu":
        name += f" ({os.cpu_count()} cores)"
    else:
        name += f" ({device.device_kind})"
    print(f"\n=== device: {name} ===", flush=True)
    settings = [
        Setting(system, n, k)
        for system in args.systems
        for n in args.particles
        for k in args.truncations
    ]

    if "overhead" in args.sections:
        section_overhead(device, args, settings, table)
    if "evosax" in args.sections:
        section_evosax(device, args, settings, table)
    if "memory" in args.sections:
        section_memory(device, args, table)


def section_overhead(device, args, settings, table) -> None:
    print("\n1. PES update vs bare vmapped K-step unroll (microseconds per window)")
    head = (
        f"{'system':6} {'N':>4} {'K':>4} | {'pes/call':>9} {'bare/call':>9} "
        f"{'ratio':>6} | {'pes/scan':>9} {'bare/scan':>9} {'ratio':>6} | "
        f"{'minES/scan':>10} {'ratio':>6} | {'state I/O':>9}"
    )
    header(head)
    for s in settings:
        t = overhead(s, args.budget, args.repeats)
        rc = paired_ratio(t["pes_call"], t["bare_call"])
        rs = paired_ratio(t["pes_scan"], t["bare_scan"])
        re = paired_ratio(t["min_es_scan"], t["bare_scan"])
        t = medians(t)
        print(
            f"{s.system:6} {s.n:4d} {s.k:4d} | {us(t['pes_call'])} "
            f"{us(t['bare_call'])} {rc:6.3f} | {us(t['pes_scan'])} "
            f"{us(t['bare_scan'])} {rs:6.3f} | {us(t['min_es_scan']):>10} "
            f"{re:6.3f} | {us(t['state_io'])}",
            flush=True,
        )
        for kind, r in (("jit call/window", rc), ("scan over windows", rs)):
            ok = "ok" if r <= 1.15 else "OVER"
            table.append(
                f"| {device.platform} | PES / bare unroll ({kind}) | {s.system} "
                f"N={s.n} K={s.k} | {r:.3f} | <= 1.15 {ok} |"
            )
    print(OVERHEAD_NOTE)


def section_evosax(device, args, settings, table) -> None:
    print(
        "\n2. optax_pes.pes + adam vs evosax PersistentES + adam driven by hand "
        "(microseconds per outer update)"
    )
    head = (
        f"{'system':6} {'N':>4} {'K':>4} | {'ours/call':>9} {'evo/call':>9} "
        f"{'evo/api':>9} {'ratio':>6} | {'ours/scan':>9} {'evo/scan':>9} {'ratio':>6}"
    )
    header(head)
    for s in settings:
        t = evosax_vs_ours(s, args.budget, args.repeats)
        rc = paired_ratio(t["ours_call"], t["evo_call"])
        rs = paired_ratio(t["ours_scan"], t["evo_scan"])
        ra = paired_ratio(t["ours_call"], t["evo_api"])
        t = medians(t)
        print(
            f"{s.system:6} {s.n:4d} {s.k:4d} | {us(t['ours_call'])} "
            f"{us(t['evo_call'])} {us(t['evo_api'])} {rc:6.3f} | "
            f"{us(t['ours_scan'])} {us(t['evo_scan'])} {rs:6.3f}",
            flush=True,
        )
        for kind, r in (
            ("fused jit call", rc),
            ("scan over updates", rs),
            ("vs evosax 3-call API loop", ra),
        ):
            ok = "ok" if r < 1.0 else "SLOWER"
            table.append(
                f"| {device.platform} | ours / evosax PersistentES ({kind}) | "
                f"{s.system} N={s.n} K={s.k} | {r:.3f} | < 1 {ok} |"
            )
    print(
        "note: evosax's PersistentES keeps the mean, the antithetic perturbation "
        "accumulator\n  (pert_accum, N x dims) and one synchronous episode clock "
        "(inner_step_counter);\n  the caller keeps the N inner states and "
        "re-initialises them when the clock is 0.\n  Driven here: ask -> "
        "(re-init at episode start) -> lax.scan over K of vmap(step)\n  at the "
        "population -> tell (identity fitness shaping, adam), per outer update.\n"
        "  'evo/call' fuses that into one jit; 'evo/api' calls the jitted ask, "
        "unroll\n  and tell separately (3 dispatches) as the API is used in a "
        "Python loop;\n  ratio = ours / evosax (< 1: ours faster), fused vs "
        "fused, scan vs scan."
    )


def section_memory(device, args, table) -> None:
    print("\n3. Compiled memory of jax.jit(pes.update) (XLA memory_analysis, bytes)")
    system_name = "mlp"
    n = max(args.particles)
    cases = {
        "K=10,T=1000": (10, 1000),
        "K=100,T=1000": (100, 1000),
        "K=10,T=100": (10, 100),
        "K=10,T=10000": (10, 10000),
    }
    mem = {
        label: compiled_memory(system_name, n, k, t) for label, (k, t) in cases.items()
    }
    print(f"{system_name} N={n}")
    print(
        f"{'case':14} {'temp':>10} {'args':>10} {'out':>10} {'total':>10} "
        f"{'bare temp':>10}"
    )
    for label, m in mem.items():
        print(
            f"{label:14} {m['temp']:10d} {m['args']:10d} {m['out']:10d} "
            f"{m['total']:10d} {m['bare_temp']:10d}"
        )
    ratios = {
        "temp K=100/K=10": mem["K=100,T=1000"]["temp"] / mem["K=10,T=1000"]["temp"],
        "total K=100/K=10": mem["K=100,T=1000"]["total"] / mem["K=10,T=1000"]["total"],
        "temp T=10000/T=100": mem["K=10,T=10000"]["temp"] / mem["K=10,T=100"]["temp"],
        "total T=10000/T=100": mem["K=10,T=10000"]["total"]
        / mem["K=10,T=100"]["total"],
        "temp PES/bare unroll K=10": mem["K=10,T=1000"]["temp"]
        / mem["K=10,T=1000"]["bare_temp"],
        "temp PES/bare unroll K=100": mem["K=100,T=1000"]["temp"]
        / mem["K=100,T=1000"]["bare_temp"],
    }
    for label, r in ratios.items():
        print(f"  {label}: {r:.3f}")
        table.append(
            f"| {device.platform} | PES compiled memory {label} | {system_name} "
            f"N={n} | {r:.3f} | ~1 {'ok' if r < 1.1 else 'GROWS'} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small repeat counts")
    add_sampling_arguments(parser)
    parser.add_argument("--particles", type=int, nargs="+", default=[16, 128])
    parser.add_argument(
        "--truncations",
        type=int,
        nargs="+",
        default=None,
        help="K values (default: 10 100; 10 with --quick)",
    )
    parser.add_argument(
        "--systems", nargs="+", default=["mlp", "infl"], choices=SYSTEM_NAMES
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["overhead", "evosax", "memory"],
        choices=["overhead", "evosax", "memory"],
    )
    parser.add_argument(
        "--cpu-only", action="store_true", help="skip the accelerator, if any"
    )
    args = parser.parse_args()
    sampling_defaults(args, args.quick)
    if args.truncations is None:
        args.truncations = [10] if args.quick else [10, 100]

    print(
        f"jax {jax.__version__}, optax {optax.__version__}, backend "
        f"{jax.default_backend()}; repeats={args.repeats} (median), "
        f"~{args.budget}s per sample"
    )
    devices = [jax.devices("cpu")[0]]
    if jax.default_backend() != "cpu" and not args.cpu_only:
        devices.append(jax.devices()[0])
    table = [
        "| device | ratio | setting | value | bar |",
        "| --- | --- | --- | --- | --- |",
    ]
    started = time.perf_counter()
    for device in devices:
        with jax.default_device(device):
            run_device(device, args, table)
    print(f"\n(total {time.perf_counter() - started:.0f}s)\n\nSummary:")
    print("\n".join(table))


if __name__ == "__main__":
    main()
