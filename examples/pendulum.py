"""PES and NRES against full-episode ES and truncated ES on gymnax's Pendulum-v1.

The fast companion of `examples/swimmer.py`, with the same comparison at equal
environment-step budgets: an MLP policy (observations scaled by their ranges, torque
clipped to [-2, 2]) swings the pendulum up and holds it over episodes of T = 200
steps (gymnax's time limit), from random initial angles. Prints the same table and
saves a figure (default `outputs/pendulum.png`). Needs gymnax: `pip install -e
".[control,examples]"`.

    python examples/pendulum.py           # a few minutes on a laptop CPU
    python examples/pendulum.py --quick   # a smaller budget, for smoke tests
"""

import pathlib
import sys

import optax_pes

# The harness (budgets, evaluation, table, figure) is the swimmer example's.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from swimmer import compare, parse_args, plot  # noqa: E402


def main():
    import gymnax

    args = parse_args(
        __doc__.splitlines()[0],
        budget=1_000_000,
        num_particles=32,
        truncation_length=20,
        sigma=0.3,
        learning_rate=0.05,
        num_evals=20,
        eval_episodes=64,
        learning_rates={},
        seeds=1,
        stagger=False,
        out="outputs/pendulum.png",
        quick=dict(budget=100_000, num_evals=4),
    )
    env, params = gymnax.make("Pendulum-v1")
    policy, theta0 = optax_pes.tasks.mlp_policy(
        3,
        1,
        key=args.seed,
        hidden_sizes=(32,),
        obs_scale=[1.0, 1.0, 8.0],  # cos, sin in [-1, 1]; angular velocity in [-8, 8]
        action_bound=2.0,
    )
    system = optax_pes.tasks.control_system(
        optax_pes.tasks.from_gymnax(env, params), policy, horizon=200
    )
    title = (
        f"gymnax Pendulum-v1, MLP policy, T = 200, N = {args.num_particles}, "
        f"K = {args.truncation_length}"
    )
    curves = compare(system, theta0, args, title=title)
    plot(curves, args.out, title)


if __name__ == "__main__":
    main()
