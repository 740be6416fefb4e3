"""24 hyperparameters of an MLP on digits: PES vs truncated ES vs random search.

The inner problem trains an Equinox MLP (64-32-32-32-10, ReLU, a fresh random
initialisation every episode) on scikit-learn's digits (1000 training, 400 validation,
397 test images, pixels / 16) for T = 300 steps of SGD, batch 32, with
`optax_pes.tasks.per_layer_sgd`: a learning rate, a momentum and a weight decay for
each of the 8 weight and bias arrays, 24 hyperparameters in all, started from a poor
setting (learning rate 0.01, momentum 0.5, weight decay 1e-4: the model barely
trains). The objective is the PES paper's: the validation loss (a minibatch of 64)
after every inner step, averaged over the episode; the area under the validation
curve, so it rewards fast training as well as a low final loss.

Three methods get the same compute, counted in inner training steps (384,000):

- PES (`optax_pes.pes`, N = 16 particles, K = 10, sigma = 0.1, staggered), 2400
  updates of Adam (learning rate 0.03, cosine decay); an update costs N K steps;
- truncated ES (`optax_pes.truncated_es`, same settings), 1600 updates: an update
  also advances one unperturbed state per antithetic pair, 3N/2 K steps;
- random search: 1280 trials, each one full episode at a theta whose 24 coordinates
  are drawn independently (learning rate log-uniform in [1e-3, 1], momentum
  uniform in logit space in [0.05, 0.993], weight decay log-uniform in
  [1e-6, 0.1]), scored by the episode's objective; the best trial is kept.

Every theta reported (20 checkpoints along each run) is then evaluated, untimed, by
training a fresh model for a full episode with 16 held-out seeds: the final
validation loss (whole validation set), the objective on the whole validation set
and the test accuracy. Prints a table and saves a figure (default
`outputs/many_hyperparameters.png`).

What to expect: all three leave the start (final validation loss 2.29, 15 % test
accuracy) within the first 10 % of the budget and reach a final validation loss of
0.17 - 0.22 (95 - 96.5 % test accuracy). On the objective they minimise PES is best
(0.432 against 0.466 for truncated ES and 0.499 for random search); on the final
validation loss random search's incumbent is best (0.167 against PES's 0.193 and
truncated ES's 0.217; the seed-to-seed spread is about 0.03). The objective is not
the final loss: PES's theta trains fastest early in the episode, random search's
finishes lower. Truncated ES shows its short-horizon bias: it only sees how the next
K = 10 steps respond to theta, so it shrinks the learning rates of all arrays but the
first layer's weights (to 0.002 - 0.01, against 0.01 - 0.26 for PES), which helps
within a window and slows the rest of the episode; its validation curve flattens
early and ends highest. Random search in 24 dimensions never places every learning
rate well at once (its incumbent mixes rates near 1 with rates near 1e-3), but here
a few hyperparameters (the first layer's learning rate and momentum, which every
method pushes up) dominate, so its first 64 trials already hold an incumbent with a
final validation loss near 0.17; later trials lower the objective from about 0.59 to
0.50 and no further after the first quarter of the budget. Its incumbent is chosen
by one noisy episode (the lowest of 1280 noisy scores), and PES's final theta
still jitters a little: differences of 0.03 in the final loss are within the noise.

    python examples/many_hyperparameters.py          # about 3 minutes, 2 cores
    python examples/many_hyperparameters.py --quick  # smoke test, about 1 minute
"""

import argparse
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm import tqdm

import optax_pes
from optax_pes import tasks

WIDTH = 32  # hidden width of the 64-32-32-32-10 MLP
NAMES = ("log_learning_rate", "logit_momentum", "log_weight_decay")
# Random search's box, per hyperparameter (sampled independently, uniformly in these
# unconstrained coordinates): learning rate 1e-3 .. 1, momentum 0.05 .. 0.993,
# weight decay 1e-6 .. 1e-1.
BOX = {
    "log_learning_rate": (np.log(1e-3), np.log(1.0)),
    "logit_momentum": (-3.0, 5.0),
    "log_weight_decay": (np.log(1e-6), np.log(1e-1)),
}


# ------------------------------------------------------------------- problem ----


def load_data():
    """Digits (1797 8x8 images, pixels / 16), a fixed permutation split into 1000
    training, 400 validation and 397 test images."""
    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(y))
    x = (x[order] / 16.0).astype(np.float32)
    y = y[order].astype(np.int32)
    splits = (slice(0, 1000), slice(1000, 1400), slice(1400, None))
    return [(jnp.asarray(x[s]), jnp.asarray(y[s])) for s in splits]


TRAIN, VAL, TEST = load_data()


def make_model(key):
    """64-32-32-32-10 ReLU MLP: 4 linear layers, 8 trainable arrays."""
    return eqx.nn.MLP(64, 10, WIDTH, depth=3, key=key)


def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=-1) == y)


MODEL = make_model(jax.random.key(0))
_, STATIC = eqx.partition(MODEL, eqx.is_inexact_array)


def layer_names():
    """'L0.w', 'L0.b', ... for the model's trainable arrays, in leaf order."""
    params, _ = eqx.partition(MODEL, eqx.is_inexact_array)
    names = []
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        keys = jax.tree_util.keystr(path)
        layer = keys.split("[")[1].split("]")[0]
        names.append(f"L{layer}.{'w' if keys.endswith('weight') else 'b'}")
    return names


# ---------------------------------------------------------------------- runs ----


def run_estimator(tx, theta0, num_chunks, chunk):
    """`num_chunks * chunk` outer steps of `tx` from `theta0` with
    `optax_pes.outer_loop` (jitted chunks of `lax.scan`). Returns the thetas after
    each chunk (index 0: theta0, stacked), and the wall-clock time of the steps and
    of the compilation: the first chunk's time beyond a later chunk's."""
    thetas, ticks = [theta0], []

    def on_chunk(theta, state, done):
        thetas.append(jax.block_until_ready(theta))
        ticks.append(time.perf_counter())

    state = tx.init(theta0)
    ticks.append(time.perf_counter())
    optax_pes.outer_loop(
        tx,
        theta0,
        num_chunks * chunk,
        state=state,
        chunk=chunk,
        record_theta=False,
        on_chunk=on_chunk,
    )
    chunk_s = np.diff(ticks)
    compile_s = chunk_s[0] - np.median(chunk_s[1:]) if len(chunk_s) > 1 else 0.0
    thetas = jax.tree.map(lambda *xs: jnp.stack(xs), *thetas)
    return thetas, float(np.sum(chunk_s) - compile_s), float(compile_s)


def sample_thetas(rng, theta0, num):
    """`num` thetas, every one of the 24 hyperparameters drawn independently and
    uniformly from `BOX` (a pytree with a leading trial axis)."""
    return {
        name: jax.tree.map(
            lambda p, lo=BOX[name][0], hi=BOX[name][1]: jnp.asarray(
                rng.uniform(lo, hi, (num,) + p.shape), p.dtype
            ),
            theta0[name],
        )
        for name in NAMES
    }


def random_search(system, theta0, num_chunks, trials_per_chunk, seed):
    """Random search: each trial trains one episode (T inner steps) at a random theta
    and is scored by the episode's objective, the one PES differentiates; keeps the
    best. Returns the incumbent after each chunk (index 0: theta0, stacked), its
    objective, the run time and the compile time."""

    def objective(theta, key):
        return jnp.mean(optax_pes.unroll(system, theta, key))

    trials = jax.vmap(objective)
    rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.key(seed), (num_chunks, trials_per_chunk))
    thetas = sample_thetas(rng, theta0, num_chunks * trials_per_chunk)

    def chunk_thetas(i):
        s = slice(i * trials_per_chunk, (i + 1) * trials_per_chunk)
        return jax.tree.map(lambda x: x[s], thetas)

    start = time.perf_counter()
    compiled = jax.jit(trials).lower(chunk_thetas(0), keys[0]).compile()
    compile_s = time.perf_counter() - start
    best, best_value = theta0, np.inf
    incumbents, values = [theta0], [np.nan]
    start = time.perf_counter()
    for i in tqdm(range(num_chunks), desc=f"{'random search':<13}", leave=False):
        batch = chunk_thetas(i)
        scores = np.asarray(compiled(batch, keys[i]))
        scores = np.where(np.isfinite(scores), scores, np.inf)
        j = int(np.argmin(scores))
        if scores[j] < best_value:
            best_value = float(scores[j])
            best = jax.tree.map(lambda x, j=j: x[j], batch)
        incumbents.append(best)
        values.append(best_value)
    run_s = time.perf_counter() - start
    incumbents = jax.tree.map(lambda *xs: jnp.stack(xs), *incumbents)
    return incumbents, np.asarray(values), run_s, compile_s


def make_evaluator(eval_system, horizon, num_seeds):
    """`evaluate(thetas)` for thetas with a leading axis: train a fresh model for a
    full episode (T inner steps, the same training as the estimators' inner loop)
    with each of `num_seeds` held-out seeds. Returns three `(thetas, seeds)` arrays:
    the episode objective measured on the whole validation set (mean over the T
    steps of the validation loss), the final validation loss (after the last step)
    and the final test accuracy; and the validation loss after every step averaged
    over the seeds, `(thetas, T)`."""
    seeds = jax.random.split(jax.random.key(10_000), num_seeds)

    def one(theta, key):
        init_key, steps_key = jax.random.split(key)
        state = eval_system.init(theta, init_key)

        def body(state, step_key):
            return eval_system.step(theta, state, step_key)

        steps = jax.random.split(steps_key, horizon)
        state, losses = jax.lax.scan(body, state, steps)
        model = eqx.combine(state.params, STATIC)
        return jnp.mean(losses), losses[-1], accuracy(model, *TEST), losses

    batched = jax.jit(jax.vmap(jax.vmap(one, (None, 0)), (0, None)))

    def evaluate(thetas):
        objective, final, acc, losses = (np.asarray(x) for x in batched(thetas, seeds))
        return objective, final, acc, losses.mean(1)

    return evaluate


def hyperparameters(theta):
    """(learning rates, momenta, weight decays) per array, as numpy vectors."""
    leaves = {name: np.array(jax.tree.leaves(theta[name])) for name in NAMES}
    return (
        np.exp(leaves["log_learning_rate"]),
        1.0 / (1.0 + np.exp(-leaves["logit_momentum"])),
        np.exp(leaves["log_weight_decay"]),
    )


def last(thetas):
    return jax.tree.map(lambda x: x[-1], thetas)


# ---------------------------------------------------------------------- main ----


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small budget")
    parser.add_argument(
        "--out", default="outputs/many_hyperparameters.png", help="figure path"
    )
    parser.add_argument("--horizon", type=int, default=300, help="T, inner steps")
    parser.add_argument("--truncation", type=int, default=10, help="K")
    parser.add_argument("--particles", type=int, default=16, help="N")
    parser.add_argument("--sigma", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.03, help="outer Adam's lr")
    parser.add_argument(
        "--updates", type=int, default=None, help="PES updates, default 2400 (240)"
    )
    parser.add_argument("--checkpoints", type=int, default=None, help="default 20 (4)")
    parser.add_argument("--eval-seeds", type=int, default=None, help="16 (4)")
    args = parser.parse_args()
    updates = args.updates or (240 if args.quick else 2400)
    checkpoints = args.checkpoints or (4 if args.quick else 20)
    eval_seeds = args.eval_seeds or (4 if args.quick else 16)
    T, K, N = args.horizon, args.truncation, args.particles
    start_all = time.perf_counter()

    # Equal compute, counted in inner training steps: a PES update runs N particles
    # for K steps; a truncated-ES update also advances one unperturbed centre state
    # per antithetic pair (3N/2 trajectories); a random-search trial is one episode.
    budget = updates * N * K
    pes_chunk = updates // checkpoints
    tes_chunk = (budget // (3 * N * K // 2)) // checkpoints
    rs_chunk = (budget // T) // checkpoints
    if min(pes_chunk, tes_chunk, rs_chunk) < 1:
        raise SystemExit("budget too small for this many checkpoints")

    theta0, optimizer = tasks.per_layer_sgd(
        MODEL, learning_rate=0.01, momentum=0.5, weight_decay=1e-4
    )
    common = dict(horizon=T, batch_size=32, model_init=make_model)
    system = tasks.training_system(
        MODEL,
        loss_fn,
        optimizer,
        TRAIN,
        objective="val_loss",
        val_data=VAL,
        val_batch_size=64,
        **common,
    )
    # The same inner training (same minibatches for the same keys), its objective
    # measured on the whole validation set: to evaluate the tuned thetas.
    eval_system = tasks.training_system(
        MODEL, loss_fn, optimizer, TRAIN, objective="val_loss", val_data=VAL, **common
    )
    evaluate = make_evaluator(eval_system, T, eval_seeds)
    num_hyper = len(jax.tree.leaves(theta0))
    print(
        f"digits: {len(TRAIN[1])} train / {len(VAL[1])} val / {len(TEST[1])} test; "
        f"MLP 64-{WIDTH}-{WIDTH}-{WIDTH}-10, fresh init every episode; "
        f"{num_hyper} hyperparameters (lr, momentum, weight decay per array)\n"
        f"inner: T = {T} SGD steps, batch 32; objective: mean validation loss "
        f"(batch 64) over the episode; start: lr 0.01, momentum 0.5, wd 1e-4\n"
        f"budget: {budget:,} inner steps per method; PES / truncated ES: N = {N}, "
        f"K = {K}, sigma = {args.sigma}, Adam({args.lr}); {jax.default_backend()}"
    )

    es = dict(num_particles=N, sigma=args.sigma, truncation_length=K, stagger=True)
    results = {}
    for name, estimator, chunk, cost, seed in (
        ("PES", optax_pes.pes, pes_chunk, N * K, 0),
        ("truncated ES", optax_pes.truncated_es, tes_chunk, 3 * N * K // 2, 0),
    ):
        # Adam with a cosine decay over the run: the estimates are noisy, and a
        # constant step would leave theta jittering around at the end.
        schedule = optax.cosine_decay_schedule(args.lr, checkpoints * chunk)
        tx = optax.chain(estimator(system, key=seed, **es), optax.adam(schedule))
        thetas, run_s, compile_s = run_estimator(tx, theta0, checkpoints, chunk)
        results[name] = dict(
            thetas=thetas,
            steps=np.arange(checkpoints + 1) * chunk * cost,
            updates=f"{checkpoints * chunk} updates",
            run_s=run_s,
            compile_s=compile_s,
        )
    thetas, values, run_s, compile_s = random_search(
        system, theta0, checkpoints, rs_chunk, seed=1
    )
    results["random search"] = dict(
        thetas=thetas,
        steps=np.arange(checkpoints + 1) * rs_chunk * T,
        updates=f"{checkpoints * rs_chunk} trials",
        run_s=run_s,
        compile_s=compile_s,
        values=values,
    )

    start = time.perf_counter()
    for r in tqdm(results.values(), desc="evaluation   ", leave=False):
        r["objective"], r["val"], r["acc"], r["curves"] = evaluate(r["thetas"])
    eval_s = time.perf_counter() - start

    row = "{:<14} {:>14} {:>12} {:>17} {:>17} {:>15} {:>7} {:>9}"
    print(
        "\n"
        + row.format(
            "method",
            "outer",
            "inner steps",
            "objective",
            "final val loss",
            "test accuracy",
            "run s",
            "compile s",
        )
    )

    def stats(r, i=-1):
        obj, val, acc = r["objective"][i], r["val"][i], 100 * r["acc"][i]
        return (
            f"{np.mean(obj):.4f} ± {np.std(obj):.4f}",
            f"{np.mean(val):.4f} ± {np.std(val):.4f}",
            f"{np.mean(acc):.2f} ± {np.std(acc):.2f} %",
        )

    print(row.format("start", "-", 0, *stats(results["PES"], 0), "-", "-"))
    for name, r in results.items():
        print(
            row.format(
                name,
                r["updates"],
                f"{r['steps'][-1]:,}",
                *stats(r),
                f"{r['run_s']:.1f}",
                f"{r['compile_s']:.1f}",
            )
        )
    print(
        f"final val loss: cross-entropy on all {len(VAL[1])} validation images after "
        f"a full episode (T = {T}) with the final theta, mean ± std over "
        f"{eval_seeds} held-out\nseeds (init and minibatches); objective: the "
        f"validation loss averaged over the episode's {T} steps (what the methods "
        "minimise, here on the whole\nvalidation set); test accuracy: on the "
        f"{len(TEST[1])} test images after the episode; evaluation untimed "
        f"({eval_s:.0f} s)."
    )

    names = layer_names()
    print(f"\nlearned hyperparameters per array ({' '.join(names)})")
    for name, r in results.items():
        lrs, moms, wds = hyperparameters(last(r["thetas"]))
        print(f"{name:<14} lr  " + " ".join(f"{v:7.3f}" for v in lrs))
        print(f"{'':<14} mom " + " ".join(f"{v:7.3f}" for v in moms))
        print(f"{'':<14} wd  " + " ".join(f"{v:7.1e}" for v in wds))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (ax_val, ax_obj, ax_episode), (ax_lr, ax_mom, ax_wd) = axes
    x = np.arange(len(names))
    width = 0.8 / len(results)
    ax_episode.plot(
        np.arange(1, T + 1), results["PES"]["curves"][0], "k:", lw=1.5, label="start"
    )
    for k, (name, r) in enumerate(results.items()):
        color = f"C{k}"
        for ax, key in ((ax_val, "val"), (ax_obj, "objective")):
            mean, std = r[key].mean(1), r[key].std(1)
            steps = r["steps"] / 1000
            ax.plot(steps, mean, "o-", ms=3, lw=1.5, color=color, label=name)
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
        ax_episode.plot(
            np.arange(1, T + 1), r["curves"][-1], lw=1.5, color=color, label=name
        )
        for ax, values in zip(
            (ax_lr, ax_mom, ax_wd), hyperparameters(last(r["thetas"])), strict=True
        ):
            ax.bar(x + (k - 1) * width, values, width, color=color, label=name)
    for ax, label in ((ax_val, "final validation loss"), (ax_obj, "objective")):
        ax.set_yscale("log")
        ax.set(
            xlabel="inner training steps spent (thousands)",
            ylabel=f"{label} (mean ± std over seeds)",
        )
        ax.legend()
    ax_val.set_title("Final validation loss (random search: incumbent)")
    ax_obj.set_title("Objective: validation loss averaged over the episode")
    ax_episode.set_yscale("log")
    ax_episode.set(
        xlabel="inner step",
        ylabel="validation loss (mean over seeds)",
        title="One episode with the final theta",
    )
    ax_episode.legend()
    for ax, label, start in (
        (ax_lr, "learning rate", 0.01),
        (ax_mom, "momentum", 0.5),
        (ax_wd, "weight decay", 1e-4),
    ):
        ax.axhline(start, color="k", ls=":", lw=1, label="start")
        ax.set_xticks(x, names)
        ax.set(ylabel=label, title=f"Final {label} per array")
        if label != "momentum":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{num_hyper} hyperparameters of an MLP on digits at equal compute "
        f"({budget:,} inner steps each)"
    )
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"\nsaved {out} ({time.perf_counter() - start_all:.0f} s in all)")


if __name__ == "__main__":
    main()
