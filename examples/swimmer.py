"""PES against full-episode ES and truncated ES on MuJoCo's swimmer, at equal budgets.

The swimmer is gymnasium's Swimmer-v5 simulated by MJX, MuJoCo's JAX backend
(`optax_pes.tasks.MJXSwimmer`), driven by a linear policy (Mania et al.'s ARS policy)
for episodes of T = 1000 steps, the PES paper's setting. Every estimator is given the
same number of environment steps and Adam; the curves are the return of the current
(unperturbed) policy against the environment steps the estimator has used:

- full-episode ES: N particles run whole episodes, one update per N * T steps;
- PES: N particles run windows of K steps, one unbiased update per N * K steps;
- truncated ES: the same windows from a shared state that the unperturbed policy
  advances (N * K + N/2 * K steps per update), biased towards short-term reward.

Prints a table (environment steps to reach full ES's final return, final returns,
wall time) and saves a figure (default `outputs/swimmer.png`). Needs the control
extra: `pip install -e ".[control,examples]"`.

    python examples/swimmer.py           # ~35 minutes on 2 (shared) CPU cores
    python examples/swimmer.py --quick   # a smaller budget, for smoke tests

MJX compiles each estimator's update and the evaluation once, a minute or more each on
a CPU, and then runs a few hundred to a few thousand environment steps per second
there (more with more particles in parallel; a GPU is much faster); `--cache DIR`
keeps the compiled programs for the next run. Updates run in `--num-evals` equal
chunks, so an estimator uses the largest multiple of its chunk within the budget
(full ES: 30 of the 37 updates that 300k steps would allow).
"""

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_pes


def steps_per_update(name, *, num_particles, truncation_length, horizon):
    """Environment steps one update of each estimator takes (with antithetic pairs)."""
    if name == "full ES":
        return num_particles * horizon
    if name == "truncated ES":  # the perturbed windows and the shared centre state
        return (num_particles + num_particles // 2) * truncation_length
    return num_particles * truncation_length


def make_estimators(system, *, num_particles, sigma, truncation_length, key):
    """The three estimators, by name, with the same particles and noise scale."""
    es = dict(num_particles=num_particles, sigma=sigma, key=key)
    window = dict(es, truncation_length=truncation_length)
    return {
        "full ES": optax_pes.full_es(system, **es),
        "PES": optax_pes.pes(system, **window),
        "truncated ES": optax_pes.truncated_es(system, **window),
    }


def episode_returns(system, num_episodes, seed=12345):
    """`theta -> mean return` over fixed reset keys, jitted once for every estimator."""
    keys = jax.random.split(jax.random.key(seed), num_episodes)

    @jax.jit
    def evaluate(theta):
        losses = jax.vmap(lambda key: optax_pes.unroll(system, theta, key))(keys)
        return -jnp.mean(jnp.sum(losses, axis=1))

    return evaluate


def train(tx, theta, *, learning_rate, num_updates, num_evals, evaluate, env_steps):
    """Adam + `tx` for `num_updates` updates (rounded down to `num_evals` equal
    chunks) with `optax_pes.outer_loop`, evaluated after each chunk.

    Returns `(env_steps_used, returns, seconds)`, the first two starting at theta0.
    """
    tx = optax.chain(tx, optax.adam(learning_rate))
    num_evals = min(num_evals, num_updates)
    chunk = num_updates // num_evals
    start = time.perf_counter()
    used, returns = [0], [float(evaluate(theta))]

    def on_chunk(theta, state, done):
        used.append(done * env_steps)
        returns.append(float(evaluate(theta)))

    optax_pes.outer_loop(
        tx,
        theta,
        chunk * num_evals,
        chunk=chunk,
        record_theta=False,
        on_chunk=on_chunk,
    )
    return np.array(used), np.array(returns), time.perf_counter() - start


def steps_to_reach(used, returns, target):
    """The first evaluation's environment steps at which `returns >= target`."""
    hit = np.nonzero(returns >= target)[0]
    return int(used[hit[0]]) if hit.size else None


def compare(system, theta0, args, *, title):
    """Run every estimator on `budget` environment steps; print and return curves."""
    evaluate = episode_returns(system, args.eval_episodes)
    estimators = make_estimators(
        system,
        num_particles=args.num_particles,
        sigma=args.sigma,
        truncation_length=args.truncation_length,
        key=args.seed,
    )
    curves = {}
    for name, tx in estimators.items():
        per_update = steps_per_update(
            name,
            num_particles=args.num_particles,
            truncation_length=args.truncation_length,
            horizon=system.horizon,
        )
        num_updates = max(1, args.budget // per_update)
        curves[name] = train(
            tx,
            theta0,
            learning_rate=args.learning_rate,
            num_updates=num_updates,
            num_evals=args.num_evals,
            evaluate=evaluate,
            env_steps=per_update,
        )
    target = curves["full ES"][1][-1]
    print(f"\n{title}")
    print(
        f"budget {args.budget:,} environment steps per estimator; target = full ES's "
        f"final return {target:.1f}"
    )
    header = (
        f"{'estimator':<13} {'env steps':>10} {'final return':>13} "
        f"{'steps to target':>16} {'fewer':>6} {'wall':>7}"
    )
    print(header)
    full_steps = steps_to_reach(*curves["full ES"][:2], target)
    for name, (used, returns, seconds) in curves.items():
        reach = steps_to_reach(used, returns, target)
        fewer = f"{full_steps / reach:.1f}x" if reach else "-"
        reach = f"{reach:,}" if reach is not None else "not reached"
        print(
            f"{name:<13} {used[-1]:>10,} {returns[-1]:>13.1f} {reach:>16} "
            f"{fewer:>6} {seconds:>6.0f}s"
        )
    return curves


def plot(curves, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (used, returns, _) in curves.items():
        ax.plot(used, returns, marker=".", lw=2, label=name)
    ax.axhline(curves["full ES"][1][-1], color="k", ls=":", lw=1)
    ax.set(xlabel="environment steps", ylabel="return", title=title)
    ax.legend()
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def parse_args(description, **defaults):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smaller budget")
    parser.add_argument("--budget", type=int, help="environment steps per estimator")
    parser.add_argument("--num-particles", type=int, help="N (even)")
    parser.add_argument("--truncation-length", type=int, help="K")
    parser.add_argument("--sigma", type=float, help="perturbation std")
    parser.add_argument("--learning-rate", type=float, help="Adam's")
    parser.add_argument("--num-evals", type=int, help="evaluations per estimator")
    parser.add_argument("--eval-episodes", type=int, help="episodes per evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="figure path")
    parser.add_argument("--cache", help="a directory for JAX's compilation cache")
    args = parser.parse_args()
    quick = defaults.pop("quick")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick.get(name, value) if args.quick else value)
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return args


def main():
    args = parse_args(
        __doc__.splitlines()[0],
        budget=300_000,
        num_particles=8,
        truncation_length=100,
        sigma=0.05,
        learning_rate=0.02,
        num_evals=15,
        eval_episodes=2,
        out="outputs/swimmer.png",
        quick=dict(budget=40_000, num_evals=4, eval_episodes=1),
    )
    env = optax_pes.tasks.MJXSwimmer()
    policy, theta0 = optax_pes.tasks.linear_policy(env.obs_dim, env.act_dim)
    system = optax_pes.tasks.control_system(env, policy, horizon=1000)
    title = (
        f"MJX swimmer, linear policy, T = 1000, N = {args.num_particles}, "
        f"K = {args.truncation_length}"
    )
    curves = compare(system, theta0, args, title=title)
    plot(curves, args.out, title)


if __name__ == "__main__":
    main()
