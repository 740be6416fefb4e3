"""PES and NRES against full-episode ES and truncated ES on MuJoCo's swimmer.

The swimmer is gymnasium's Swimmer-v5 simulated by MJX, MuJoCo's JAX backend
(`optax_pes.tasks.MJXSwimmer`), driven by a linear policy (Mania et al.'s ARS policy)
for episodes of T = 1000 steps, the PES paper's setting. Every estimator is given the
same number of environment steps, with Adam at its own step size (`--learning-rate`
for all, `--learning-rates 'full ES=0.05'` per estimator: the defaults are each
estimator's best of 0.01, 0.02 and 0.05 on seed 0); the curves are the return of the
current (unperturbed) policy against the environment steps the estimator has used:

- full-episode ES: N particles run whole episodes, one update per N * T steps;
- PES: N particles run windows of K steps, one unbiased update per N * K steps;
- NRES (noise-reuse ES): the same windows, each particle keeping one perturbation
  for its whole episode (unbiased too, with less variance);
- truncated ES: the same windows from a shared state that the unperturbed policy
  advances (N * K + N/2 * K steps per update), biased towards short-term reward.

PES, NRES and truncated ES spread their particles over the episode (`--stagger`, the
default here): without it every update sees the same tenth of the episode, and PES
did not leave the swimmer's first gait. Each of `--seeds` seeds (the estimators'
keys) runs all four. Prints a table per seed (environment steps to reach full ES's
final return, and to go 95% of the way there from theta0's return; final returns;
wall time) and saves a figure (default `outputs/swimmer.png`). Needs the control
extra: `pip install -e ".[control,examples]"`.

    python examples/swimmer.py           # ~22 minutes on 2 CPU cores (2 seeds)
    python examples/swimmer.py --quick   # a smaller budget, for smoke tests

`--particle-counts` and `--sigmas` set N and the perturbation per estimator, as
`--learning-rates` sets the step size. The best PES setting measured (docs/control.md,
"Fewer particles") against full ES at its default:

    python examples/swimmer.py --seeds 3 --particle-counts 'PES=32' \
        --sigmas 'PES=0.1' --learning-rates 'full ES=0.05,PES=0.04'

MJX compiles each estimator's update and the evaluation once (15-30 s each on a CPU)
and then runs 4,000 (N = 8) to 12,000 (N = 64) environment steps per second on 2 cores
(a GPU is much faster); `--cache DIR` keeps the compiled programs for the next run.
Updates run in `--num-evals` equal chunks, so an estimator uses the largest multiple
of its chunk within the budget (truncated ES: 90 of the 100 updates that 960k steps
allow).
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


ESTIMATORS = ("full ES", "PES", "NRES", "truncated ES")


def make_estimator(
    name, system, *, num_particles, sigma, truncation_length, key, stagger
):
    """One of `ESTIMATORS`, by name; `stagger` spreads a windowed estimator's
    particles over the episode."""
    es = dict(num_particles=num_particles, sigma=sigma, key=key)
    if name == "full ES":
        return optax_pes.full_es(system, **es)
    windowed = {
        "PES": optax_pes.pes,
        "NRES": optax_pes.nres,
        "truncated ES": optax_pes.truncated_es,
    }[name]
    return windowed(system, **es, truncation_length=truncation_length, stagger=stagger)


def settings(args, name):
    """`(N, sigma, Adam step)` of one estimator: the per-estimator overrides
    (`--particle-counts`, `--sigmas`, `--learning-rates`) or the shared values."""
    return (
        args.particle_counts.get(name, args.num_particles),
        args.sigmas.get(name, args.sigma),
        args.learning_rates.get(name, args.learning_rate),
    )


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
    """Run every estimator on `budget` environment steps for each of `args.seeds`
    seeds (the estimators' keys; theta0 and the evaluation are the same); print a
    table per seed and return the curves, `{name: [(used, returns, seconds), ...]}`.
    """
    evaluate = episode_returns(system, args.eval_episodes)
    curves = {}
    seeds = range(args.seed, args.seed + args.seeds)
    for seed in seeds:
        if seed != args.seed:
            # Each seed's estimators are new transformations that compile their own
            # programs, which XLA:CPU keeps in 4,000-5,500 memory mappings per
            # training on MJX: a sweep of this harness reached Linux's 65,530 at its
            # 13th training and the next compile aborted. Dropping the last seed's
            # programs costs one more compile of `evaluate`.
            jax.clear_caches()
        for name in ESTIMATORS:
            num_particles, sigma, learning_rate = settings(args, name)
            tx = make_estimator(
                name,
                system,
                num_particles=num_particles,
                sigma=sigma,
                truncation_length=args.truncation_length,
                key=seed,
                stagger=args.stagger,
            )
            per_update = steps_per_update(
                name,
                num_particles=num_particles,
                truncation_length=args.truncation_length,
                horizon=system.horizon,
            )
            num_updates = max(1, args.budget // per_update)
            curves.setdefault(name, []).append(
                train(
                    tx,
                    theta0,
                    learning_rate=learning_rate,
                    num_updates=num_updates,
                    num_evals=args.num_evals,
                    evaluate=evaluate,
                    env_steps=per_update,
                )
            )
    print(f"\n{title}")
    print(
        "; ".join(
            "{}: N = {}, sigma = {}, Adam {}".format(name, *settings(args, name))
            for name in ESTIMATORS
        )
    )
    print(
        f"budget {args.budget:,} environment steps per estimator and seed; target = "
        "full ES's final return in the same seed; 'fewer' = full ES's steps to a "
        "level / the estimator's (also at 95% of the way from theta0's return to the "
        "target: on a plateau the final return itself is partly evaluation noise)"
    )
    print(
        f"{'seed':>4} {'estimator':<13} {'env steps':>10} {'final return':>13} "
        f"{'target':>7} {'steps to target':>16} {'fewer':>6} {'at 95%':>7} "
        f"{'wall':>7}"
    )
    fewer = {name: [] for name in curves}
    for i, seed in enumerate(seeds):
        start, target = curves["full ES"][i][1][[0, -1]]
        levels = (target, start + 0.95 * (target - start))
        full = [steps_to_reach(*curves["full ES"][i][:2], level) for level in levels]
        for name, runs in curves.items():
            used, returns, seconds = runs[i]
            reach = [steps_to_reach(used, returns, level) for level in levels]
            ratios = [
                a / b if a is not None and b else None
                for a, b in zip(full, reach, strict=True)
            ]
            fewer[name].append(ratios)
            shown = [f"{r:.1f}x" if r else "-" for r in ratios]
            steps = f"{reach[0]:,}" if reach[0] is not None else "not reached"
            print(
                f"{seed:>4} {name:<13} {used[-1]:>10,} {returns[-1]:>13.1f} "
                f"{target:>7.1f} {steps:>16} {shown[0]:>6} {shown[1]:>7} "
                f"{seconds:>6.0f}s"
            )
    if len(seeds) > 1:
        print("over the seeds: final return mean (min-max); fewer steps (target, 95%)")
        for name, runs in curves.items():
            finals = np.array([returns[-1] for _, returns, _ in runs])
            ratios = "; ".join(
                ", ".join(f"{r:.1f}x" if r else "-" for r in pair)
                for pair in fewer[name]
            )
            print(
                f"  {name:<13} {finals.mean():7.1f} ({finals.min():.1f}-"
                f"{finals.max():.1f}); {ratios}"
            )
    return curves


def plot(curves, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for colour, (name, runs) in enumerate(curves.items()):
        for i, (used, returns, _) in enumerate(runs):  # one line per seed
            label = name if i == 0 else None
            ax.plot(used, returns, f"C{colour}", marker=".", lw=1.5, label=label)
    for _, returns, _ in curves["full ES"]:
        ax.axhline(returns[-1], color="k", ls=":", lw=1)
    ax.set(xlabel="environment steps", ylabel="return", title=title)
    ax.legend()
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def _per_estimator(cast):
    """A parser of 'full ES=0.05,PES=0.02' -> {'full ES': 0.05, 'PES': 0.02}, each
    value read by `cast`."""

    def parse(text):
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in ESTIMATORS:
                raise argparse.ArgumentTypeError(
                    f"unknown estimator {name!r}; expected one of {ESTIMATORS}"
                )
            values[name] = cast(value)
        return values

    parse.__name__ = f"'estimator={cast.__name__}'"  # argparse's "invalid ... value"
    return parse


def parse_args(description, **defaults):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smaller budget")
    parser.add_argument("--budget", type=int, help="environment steps per estimator")
    parser.add_argument("--num-particles", type=int, help="N (even)")
    parser.add_argument("--truncation-length", type=int, help="K")
    parser.add_argument("--sigma", type=float, help="perturbation std")
    parser.add_argument(
        "--learning-rate", type=float, help="Adam's, for every estimator"
    )
    parser.add_argument(
        "--learning-rates",
        type=_per_estimator(float),
        help="per-estimator overrides, e.g. 'full ES=0.05,PES=0.02'",
    )
    parser.add_argument(
        "--particle-counts",
        type=_per_estimator(int),
        default={},
        help="per-estimator N, e.g. 'PES=32'",
    )
    parser.add_argument(
        "--sigmas",
        type=_per_estimator(float),
        default={},
        help="per-estimator perturbation std, e.g. 'PES=0.1'",
    )
    parser.add_argument("--num-evals", type=int, help="evaluations per estimator")
    parser.add_argument("--eval-episodes", type=int, help="episodes per evaluation")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, help="how many seeds: seed, seed + 1, ...")
    parser.add_argument(
        "--stagger",
        action=argparse.BooleanOptionalAction,
        help="spread the windowed estimators' particles over the episode",
    )
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
        budget=960_000,
        num_particles=64,
        truncation_length=100,
        sigma=0.05,
        learning_rate=0.02,
        num_evals=15,
        eval_episodes=2,
        learning_rates={"full ES": 0.05},  # each estimator's best of 0.01, 0.02, 0.05
        seeds=2,
        stagger=True,
        out="outputs/swimmer.png",
        quick=dict(
            budget=40_000, num_particles=8, num_evals=4, eval_episodes=1, seeds=1
        ),
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
