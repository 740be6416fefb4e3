"""Compile time of one PES update against the bare vmapped unroll it wraps.

The system is the docs' `training_system` (digits, an Equinox MLP 64-64-10, SGD with
momentum from a learning-rate schedule of theta, fresh model per episode). For each
setting it prints, for `jax.jit(...).lower` (tracing + lowering: Python time) and
`.compile()` (XLA), the seconds of

- `bare`: what any estimator must compile: `N` fresh inner states (`vmap(init)`) and a
  `lax.scan` of `K` vmapped inner steps, summing the losses;
- `pes`: `jax.jit` of one `optax.chain(pes(...), adam)` update;

and the ratio pes / bare, with the HLO's size in lines; then the wall time of a
first and a later *eager* update (`tx.update` called outside `jit`), which compile
once and are then cached by the estimator. Run:

    python benchmarks/compile_time.py            # N in (8, 64), K in (10, 20)
    python benchmarks/compile_time.py --quick    # N=8, K=10

Each figure is the median of `--repeats` fresh compilations (jax's caches cleared in
between).
"""

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits

import optax_pes


def make_system(horizon: int):
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)

    def loss(model, x, y):
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return optax_pes.tasks.training_system(
        eqx.nn.MLP(64, 10, 64, 2, key=jax.random.key(0)),
        loss,
        lambda theta: optax.sgd(optax_pes.tasks.lr_schedule(theta), momentum=0.9),
        (x[:1200], y[:1200]),
        horizon=horizon,
        batch_size=64,
        model_init=lambda key: eqx.nn.MLP(64, 10, 64, 2, key=key),
    )


def bare_fn(system, n: int, k: int):
    def run(thetas, key):
        init_key, step_key = jax.random.split(key)
        states = jax.vmap(system.init)(thetas, jax.random.split(init_key, n))

        def body(carry, keys):
            states, total = carry
            states, loss = jax.vmap(system.step)(thetas, states, keys)
            return (states, total + loss), None

        keys = jax.random.split(step_key, (k, n))
        (states, total), _ = jax.lax.scan(body, (states, jnp.zeros(n)), keys)
        return states, total

    theta = jnp.array([jnp.log(0.003), jnp.log(30.0)])
    return run, (jnp.tile(theta, (n, 1)), jax.random.key(0))


def pes_fn(system, n: int, k: int):
    meta = optax.chain(
        optax_pes.pes(system, num_particles=n, sigma=0.3, truncation_length=k, key=0),
        optax.adam(0.05),
    )
    theta = jnp.array([jnp.log(0.003), jnp.log(30.0)])
    state = meta.init(theta)

    def update(theta, state):
        updates, state = meta.update(jnp.zeros_like(theta), state, theta)
        return optax.apply_updates(theta, updates), state

    return update, (theta, state)


def time_compile(make, repeats: int) -> tuple[float, float, int]:
    """Median seconds of lower and of compile, and the HLO's line count."""
    lowers, compiles = [], []
    lines = 0
    for _ in range(repeats):
        jax.clear_caches()
        fn, args = make()
        start = time.perf_counter()
        lowered = jax.jit(fn).lower(*args)
        middle = time.perf_counter()
        lowered.compile()
        end = time.perf_counter()
        lowers.append(middle - start)
        compiles.append(end - middle)
        lines = len(lowered.as_text().splitlines())
    return statistics.median(lowers), statistics.median(compiles), lines


def time_eager(system, n: int, k: int, stagger: bool) -> tuple[float, float, float]:
    """Seconds of an eager init, first update and later update."""
    jax.clear_caches()
    tx = optax_pes.pes(
        system, num_particles=n, sigma=0.3, truncation_length=k, key=0, stagger=stagger
    )
    theta = jnp.array([jnp.log(0.003), jnp.log(30.0)])
    times = []
    start = time.perf_counter()
    state = jax.block_until_ready(tx.init(theta))
    times.append(time.perf_counter() - start)
    for _ in range(2):
        start = time.perf_counter()
        _, state = jax.block_until_ready(tx.update(jnp.zeros(2), state, theta))
        times.append(time.perf_counter() - start)
    return tuple(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=200)
    args = parser.parse_args()
    settings = [(8, 10)] if args.quick else [(8, 10), (64, 10), (8, 20), (64, 20)]
    system = make_system(args.horizon)
    print(
        f"backend {jax.default_backend()}, T={args.horizon}, medians of "
        f"{args.repeats} fresh compilations; seconds"
    )
    print(
        "| N | K | bare lower | bare compile | pes lower | pes compile "
        "| pes/bare lower | pes/bare compile | HLO lines pes / bare |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k in settings:
        bl, bc, b_lines = time_compile(
            lambda n=n, k=k: bare_fn(system, n, k), args.repeats
        )
        pl, pc, p_lines = time_compile(
            lambda n=n, k=k: pes_fn(system, n, k), args.repeats
        )
        print(
            f"| {n} | {k} | {bl:.2f} | {bc:.2f} | {pl:.2f} | {pc:.2f} "
            f"| {pl / bl:.2f} | {pc / bc:.2f} | {p_lines} / {b_lines} |"
        )
    n, k = settings[0]
    print(f"\nEager PES (N={n}, K={k}): seconds of init, first update, later update")
    print("| stagger | init | first update | later update |")
    print("|---|---|---|---|")
    for stagger in (False, True):
        init, first, later = time_eager(system, n, k, stagger)
        print(f"| {stagger} | {init:.2f} | {first:.2f} | {later:.3f} |")


if __name__ == "__main__":
    main()
