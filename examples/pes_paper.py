"""The PES paper's two toy experiments, PES against the truncated estimators.

1. Influence balancing (Tallec & Ollivier's task, PES paper section 5.1): with K = 1,
   truncated ES and truncated backprop see only the short-term influence of theta and
   walk away from the optimum theta* = -1/6, while PES converges to it.
2. Toy 2-D regression meta-problem (PES paper section 5.2): tuning the learning-rate
   schedule of an inner SGD run whose meta-loss surface has chaotic regions. From
   theta = (-4, -4), PES reaches a meta-loss close to the grid minimum (about 553);
   truncated ES stalls far above.

Prints a table for each and saves a figure (default `outputs/pes_paper.png`).

    python examples/pes_paper.py            # about a minute on a laptop CPU
    python examples/pes_paper.py --quick    # fewer outer steps, for smoke tests
"""

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_pes
from optax_pes import tasks


def train(tx, theta, num_steps, chunk):
    """Run `num_steps` outer steps of `tx` from `theta` (jitted chunks of scans, a
    progress bar with the meta-loss); the trajectory of theta,
    shape `(num_steps + 1,) + theta.shape`."""
    _, _, history = optax_pes.outer_loop(tx, theta, num_steps, chunk=chunk)
    return np.concatenate([np.asarray(theta)[None], history.theta])


def influence_balancing(num_steps):
    system = tasks.influence_balancing()
    theta0 = jnp.array([0.5])
    # The settings of the PES paper's code: N = 1000, sigma = 0.1, SGD at 1e-4, K = 1.
    es = dict(num_particles=1000, sigma=0.1, truncation_length=1, key=3)
    estimators = {
        "PES": optax_pes.pes(system, **es),
        "truncated ES": optax_pes.truncated_es(system, **es),
        "TBPTT": optax_pes.tbptt(system, truncation_length=1, key=3),
    }
    results = {}
    for name, estimator in estimators.items():
        start = time.perf_counter()
        tx = optax.chain(estimator, optax.sgd(1e-4))
        results[name] = train(tx, theta0, num_steps, chunk=num_steps // 10)[:, 0]
        results[name + " time"] = time.perf_counter() - start
    print(f"\nInfluence balancing (K = 1, {num_steps} SGD steps from theta = 0.5)")
    print(f"{'estimator':<14} {'final theta':>12} {'|theta + 1/6|':>14} {'time':>7}")
    for name in estimators:
        final = results[name][-1]
        time_s = results[name + " time"]
        print(f"{name:<14} {final:>12.5f} {abs(final + 1 / 6):>14.2e} {time_s:>6.1f}s")
    return {name: results[name] for name in estimators}


def toy_regression(num_steps):
    system = tasks.toy_regression()
    theta0 = jnp.array([-4.0, -4.0])
    es = dict(num_particles=100, sigma=0.3, truncation_length=10, key=0)
    estimators = {
        "PES": optax_pes.pes(system, **es),
        "NRES": optax_pes.nres(system, **es),
        "truncated ES": optax_pes.truncated_es(system, **es),
    }
    grid0, grid1, grid = tasks.toy_regression_grid(num=100)
    grid_min = float(np.min(grid))
    meta_loss = jax.jit(jax.vmap(lambda th: jnp.sum(optax_pes.unroll(system, th))))
    trajectories = {}
    print(f"\nToy regression (K = 10, T = 100, {num_steps} Adam steps from (-4, -4))")
    print(f"grid minimum of the meta-loss: {grid_min:.1f}")
    print(f"{'estimator':<14} {'final theta':>18} {'meta-loss':>10} {'/ grid min':>11}")
    for name, estimator in estimators.items():
        tx = optax.chain(estimator, optax.adam(1e-2))
        trajectory = train(tx, theta0, num_steps, chunk=num_steps // 10)
        trajectories[name] = trajectory
        final = float(meta_loss(jnp.asarray(trajectory[-1:]))[0])
        theta = np.array2string(trajectory[-1], precision=2)
        print(f"{name:<14} {theta:>18} {final:>10.1f} {final / grid_min:>11.3f}")
    return (grid0, grid1, grid), trajectories


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer outer steps")
    parser.add_argument("--out", default="outputs/pes_paper.png", help="figure path")
    args = parser.parse_args()
    steps_ib, steps_toy = (500, 300) if args.quick else (3000, 1000)

    influence = influence_balancing(steps_ib)
    (grid0, grid1, grid), trajectories = toy_regression(steps_toy)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, thetas), style in zip(influence.items(), ["-", "-", ":"], strict=False):
        ax0.plot(thetas, style, lw=2, label=name)
    ax0.axhline(-1 / 6, color="k", ls="--", lw=1, label=r"$\theta^* = -1/6$")
    ax0.set(xlabel="outer step", ylabel=r"$\theta$", title="Influence balancing, K=1")
    ax0.set_ylim(-0.5, 2.0)
    ax0.legend()
    mesh = ax1.pcolormesh(
        np.asarray(grid0),
        np.asarray(grid1),
        np.log(np.asarray(grid)).T,
        shading="auto",
        cmap="viridis",
    )
    fig.colorbar(mesh, ax=ax1, label="log meta-loss")
    for name, thetas in trajectories.items():
        ax1.plot(thetas[:, 0], thetas[:, 1], lw=1.5, label=name)
    ax1.set(xlabel=r"$\theta_0$ (log initial lr)", ylabel=r"$\theta_1$ (log final lr)")
    ax1.set_title("Toy regression, K=10, T=100")
    ax1.legend(loc="lower left")
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
