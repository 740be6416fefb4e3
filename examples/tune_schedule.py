"""PES tunes a learning-rate schedule: an MLP on scikit-learn's digits.

The PES paper's schedule-tuning experiment (Vicol et al., ICML 2021, section 5.3) at
CPU scale. The inner problem trains a Flax NNX MLP (64-64-10, ReLU) on 8x8 digits
with SGD and momentum 0.9 for T steps (minibatches of 64, a fresh random
initialisation every episode) under the paper's schedule

    alpha_t = exp(theta_0) / (1 + t / 5000) ** exp(theta_1)

(`optax_pes.tasks.lr_schedule`): theta_0 is the log initial learning rate, theta_1
the log decay power. From the paper's start theta = (log 0.003, log 30) (a small
learning rate that decays fast), `optax_pes.pes` chained with `optax.adam` tunes theta
for two meta-objectives, summed over the episode:

(a) the training loss (the minibatch loss before each step), and
(b) the validation error rate 1 - accuracy after each step (on a minibatch of 64
    validation images drawn per step: non-differentiable, so only an ES estimator
    can tune it; the episode sum averages 64,000 predictions).

A grid search over theta evaluates each meta-objective exactly (`optax_pes.unroll`
over a few seeds, vmapped in chunks); the table compares the start, PES's final theta
and the grid's best theta, each re-evaluated on fresh seeds, and the figure draws the
PES trajectory over the grid's heat map. Truncated ES with the same settings runs on
(a) too: it sees only K steps of each episode ahead, so it is biased.

What to expect (full run, T = 1000, about 2 minutes on 2 CPU cores): the start (lr
0.003 decaying to 1e-5) is 34x (a) / 8x (b) worse than the grid's best theta, (log
0.32, log 10). The grid's best region is a valley at initial learning rate about 0.3
(with momentum 0.9: one column of the grid; 0.56 is already 1.05-3x worse and from
about 2 on the MLP dies, error 0.9), nearly flat along the decay power for powers
below about 10 (over T = 1000 steps, lr_T / lr_0 = 1.2 ** -power). PES (N = 32, K =
10, sigma = 0.3, 1500 Adam steps of 0.03) reaches it for both objectives: (a) total
training loss 47.2 at theta = (-1.13, 2.25), against 47.4 at the grid's best; (b)
mean validation error 3.16 % at (-1.21, 3.21), against 3.11 %, i.e. within 0.3 % and
1.4 % (the standard errors over 32 seeds are 1 % and 1.6 %). Truncated ES with the
same settings is biased towards fast, greedy schedules: it raises the learning rate
and the decay power together (lr 0.8 decaying to 0 well before T, off the top of the
grid) and ends 3x worse than PES. With other PES seeds (2, 4, 5) the final meta-loss
stays within 7 % of the grid's best. With N = 16, two of three seeds missed on (b),
one of them over the cliff at lr about 1, where the error is flat at 0.9 and the
estimate carries no signal back: hence N = 32. Divergent points (NaN / inf) would be
masked grey; an MLP with too large a learning rate here dies (constant logits)
rather than overflows, so there are none.

    python examples/tune_schedule.py            # about 2 minutes on 2 CPU cores
    python examples/tune_schedule.py --quick    # smoke test, T = 200, < 1 minute
"""

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from tqdm import tqdm

import optax_pes
from optax_pes import tasks

THETA0 = (float(np.log(0.003)), float(np.log(30.0)))  # the PES paper's start
LOG_LR = (float(np.log(1e-4)), float(np.log(10.0)))  # grid ranges
LOG_POWER = (float(np.log(1e-2)), float(np.log(100.0)))
# "The grid's best region": within 10 % of the grid minimum. The meta-loss of one
# episode varies by about 8 % (a) and 18 % (b) between seeds (initialisation and
# minibatches), and the grid's valley is flat to within about that.
REGION = 0.10
BATCH = 64


# ---------------------------------------------------------------- problem ----


def load_data(num_val=597):
    """Pixels / 16; a fixed permutation; 1200 images to train, 597 to validate."""
    x, y = load_digits(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(y))
    x = (x[order] / 16.0).astype(np.float32)
    y = y[order].astype(np.int32)
    n = len(y) - num_val
    return (x[:n], y[:n]), (x[n:], y[n:])


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, hidden: int = 64):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def cross_entropy(model, x, labels):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def sgd_momentum(theta):
    return optax.sgd(tasks.lr_schedule(theta), momentum=0.9)


def make_systems(horizon):
    """(a) training loss, (b) validation error rate of an MLP trained for `horizon`
    steps of SGD with momentum under the schedule theta."""
    train, val = load_data()
    common = dict(
        model=MLP(nnx.Rngs(0)),
        loss_fn=cross_entropy,
        optimizer=sgd_momentum,
        train_data=train,
        horizon=horizon,
        batch_size=BATCH,
        model_init=lambda key: MLP(nnx.Rngs(key)),  # fresh init every episode
    )
    return {
        "train_loss": tasks.training_system(**common, objective="train_loss"),
        "val_error": tasks.training_system(
            **common,
            objective=tasks.accuracy_error(lambda model, x: model(x)),
            val_data=val,
            val_batch_size=BATCH,
        ),
    }


# The meta-losses reported: (a) the episode's total training loss, (b) its mean
# validation error (the episode sum that PES differentiates, divided by T).
OBJECTIVES = {
    "train_loss": dict(label="(a) training loss", unit="total", per_step=False),
    "val_error": dict(label="(b) validation error", unit="mean", per_step=True),
}


# ------------------------------------------------------------- evaluation ----


class MetaLoss:
    """The exact meta-loss of many (theta, seed) pairs: full episodes by
    `optax_pes.unroll`, vmapped over chunks of a fixed size (one compilation).
    Diverged episodes (NaN or inf) count as +inf: the worst."""

    def __init__(self, system, per_step, chunk):
        self.chunk = chunk
        scale = 1.0 / system.horizon if per_step else 1.0

        def episode(theta, key):
            return scale * jnp.sum(optax_pes.unroll(system, theta, key))

        self.fn = jax.jit(jax.vmap(episode))

    def __call__(self, thetas, seeds, desc):
        """Meta-loss of each theta (rows) on each seed (columns)."""
        thetas = np.asarray(thetas, np.float32).reshape(-1, 2)
        pairs_theta = np.repeat(thetas, len(seeds), axis=0)
        pairs_seed = np.tile(np.asarray(seeds), len(thetas))
        total = len(pairs_seed)
        pad = -total % self.chunk
        pairs_theta = np.concatenate([pairs_theta, np.repeat(thetas[:1], pad, 0)])
        pairs_seed = np.concatenate([pairs_seed, np.zeros(pad, int)])
        out = []
        for start in tqdm(range(0, total + pad, self.chunk), desc=desc, leave=False):
            keys = jax.vmap(jax.random.key)(pairs_seed[start : start + self.chunk])
            out.append(
                np.asarray(self.fn(pairs_theta[start : start + self.chunk], keys))
            )
        losses = np.concatenate(out)[:total].reshape(len(thetas), len(seeds))
        return np.where(np.isfinite(losses), losses, np.inf)


# ------------------------------------------------------------------- runs ----


def train(tx, theta, num_steps, chunk):
    """`num_steps` outer steps of `tx` from `theta` with `optax_pes.outer_loop`
    (jitted chunks of `lax.scan`, a progress bar with the meta-loss).

    Returns the trajectory of theta, shape `(num_steps + 1, 2)`, the number of
    particle windows left out of the estimates for a non-finite loss (diverged), and
    the wall-clock time of the steps and of the compilation: the first chunk's time
    beyond a later chunk's (the first call compiles).
    """
    state = tx.init(theta)
    ticks = [time.perf_counter()]
    _, _, history = optax_pes.outer_loop(
        tx,
        theta,
        num_steps,
        state=state,
        chunk=chunk,
        on_chunk=lambda *_: ticks.append(time.perf_counter()),
    )
    chunk_s = np.diff(ticks)
    compile_s = chunk_s[0] - np.median(chunk_s[1:]) if len(chunk_s) > 1 else 0.0
    return dict(
        trajectory=np.concatenate([np.asarray(theta)[None], history.theta]),
        nonfinite=int(np.sum(history.diagnostics["num_nonfinite"])),
        seconds=float(np.sum(chunk_s) - compile_s),
        compile=float(compile_s),
    )


# ------------------------------------------------------------------- main ----


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=200, small grid")
    parser.add_argument("--out", default="outputs/tune_schedule.png", help="figure")
    parser.add_argument("--horizon", type=int, default=None, help="T (1000; 200)")
    parser.add_argument("--steps", type=int, default=None, help="outer steps")
    parser.add_argument("--grid", type=int, default=None, help="points per axis")
    parser.add_argument("--particles", type=int, default=32, help="N")
    parser.add_argument("--truncation", type=int, default=10, help="K")
    parser.add_argument("--sigma", type=float, default=0.3, help="in log space")
    parser.add_argument("--lr", type=float, default=0.03, help="Adam's learning rate")
    parser.add_argument("--key", type=int, default=1, help="the estimators' seed")
    parser.add_argument("--no-tes", action="store_true", help="skip truncated ES")
    args = parser.parse_args()
    horizon = args.horizon or (200 if args.quick else 1000)
    steps = args.steps or (400 if args.quick else 1500)
    num_grid = args.grid or (9 if args.quick else 21)
    grid_seeds = range(1 if args.quick else 2)
    eval_seeds = range(100, 124 if args.quick else 132)  # fresh seeds for the table
    chunk = 96 if args.quick else 128
    start_all = time.perf_counter()

    systems = make_systems(horizon)
    theta0 = jnp.array(THETA0, jnp.float32)
    print(
        f"digits: 1200 train / 597 validation images; MLP 64-64-10 (Flax NNX), SGD "
        f"with momentum 0.9, T = {horizon} steps of batch {BATCH}; start theta = "
        f"(log 0.003, log 30) = ({THETA0[0]:.2f}, {THETA0[1]:.2f})\nPES: N = "
        f"{args.particles}, K = {args.truncation}, sigma = {args.sigma}, stagger; "
        f"{steps} steps of Adam({args.lr}); grid {num_grid} x {num_grid} x "
        f"{len(grid_seeds)} seed(s); {jax.default_backend()}"
    )

    log_lr = np.linspace(*LOG_LR, num_grid)
    log_power = np.linspace(*LOG_POWER, num_grid)
    grid_thetas = np.stack(np.meshgrid(log_lr, log_power, indexing="ij"), -1)
    es = dict(
        num_particles=args.particles,
        sigma=args.sigma,
        truncation_length=args.truncation,
        stagger=True,
    )
    results = {}
    for name, system in systems.items():
        meta = MetaLoss(system, OBJECTIVES[name]["per_step"], chunk)
        start = time.perf_counter()
        grid = meta(grid_thetas, grid_seeds, f"grid {name}").mean(1)
        grid = grid.reshape(num_grid, num_grid)
        grid_s = time.perf_counter() - start
        best = np.unravel_index(np.argmin(grid), grid.shape)
        runs = {}
        estimators = {"PES": optax_pes.pes}
        if name == "train_loss" and not (args.quick or args.no_tes):
            estimators["truncated ES"] = optax_pes.truncated_es
        for label, estimator in estimators.items():
            tx = optax.chain(estimator(system, **es, key=args.key), optax.adam(args.lr))
            runs[label] = train(tx, theta0, steps, max(1, steps // 10))
        # Start, final thetas and the grid's best, re-evaluated on fresh seeds.
        table_thetas = np.stack(
            [np.asarray(theta0), grid_thetas[best]]
            + [r["trajectory"][-1] for r in runs.values()]
        )
        evaluated = meta(table_thetas, eval_seeds, f"evaluate {name}")
        results[name] = dict(
            grid=grid,
            grid_s=grid_s,
            best=grid_thetas[best],
            grid_min=float(grid[best]),
            start_loss=evaluated[0],
            best_loss=evaluated[1],
            runs=runs,
        )
        for r, losses in zip(runs.values(), evaluated[2:], strict=True):
            r["loss"] = losses

    # ---------------------------------------------------------------- table ----
    print(
        f"\n{'objective':<27} {'theta':<8} {'log lr':>7} {'log pow':>8} "
        f"{'lr_0':>8} {'lr_T':>8} {'meta-loss':>19} {'/ grid best':>11} "
        f"{'in region':>9} {'time':>6}"
    )

    def row(objective, what, theta, losses, reference, seconds=None, region=True):
        lr = tasks.lr_schedule(jnp.asarray(theta))
        mean = float(np.mean(losses))
        spread = float(np.std(losses) / np.sqrt(len(losses)))
        ratio = mean / reference
        inside = ("yes" if ratio <= 1 + REGION else "no") if region else ""
        time_str = "" if seconds is None else f"{seconds:.1f}s"
        print(
            f"{objective:<27} {what:<8} {theta[0]:>7.2f} {theta[1]:>8.2f} "
            f"{float(lr(0)):>8.2e} {float(lr(horizon)):>8.2e} "
            f"{mean:>9.4g} +-{spread:<8.2g} {ratio:>11.3f} {inside:>9} {time_str:>6}"
        )

    for name, r in results.items():
        objective = f"{OBJECTIVES[name]['label']} ({OBJECTIVES[name]['unit']})"
        reference = float(np.mean(r["best_loss"]))
        row(objective, "start", THETA0, r["start_loss"], reference, region=False)
        row("", "grid", r["best"], r["best_loss"], reference, r["grid_s"], False)
        for label, run in r["runs"].items():
            what = "PES" if label == "PES" else "TES"
            row("", what, run["trajectory"][-1], run["loss"], reference, run["seconds"])
    print(
        f"meta-loss: mean +- standard error over {len(eval_seeds)} fresh seeds (fresh "
        f"initialisation and minibatches) of the episode's total training loss (a) or "
        f"mean\nvalidation error (b); grid: the best of the {num_grid} x {num_grid} "
        f"grid (over {len(grid_seeds)} other seed(s)), re-evaluated; in region: "
        f"within {100 * REGION:.0f} % of it;\nlr_0, lr_T: the learning rate at steps "
        f"0 and T; time: the grid search, or the {steps} outer steps (compilation "
        f"apart, below); TES: truncated ES,\nsame settings."
    )
    compiles = ", ".join(
        f"{label} {name} {run['compile']:.0f} s"
        for name, r in results.items()
        for label, run in r["runs"].items()
    )
    print(f"compilation: {compiles}")
    for name, r in results.items():
        for label, run in r["runs"].items():
            if run["nonfinite"]:
                print(
                    f"{name} {label}: {run['nonfinite']} particle windows diverged "
                    "(non-finite loss; left out of the estimates)"
                )

    # --------------------------------------------------------------- figure ----
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    step = (log_lr[1] - log_lr[0], log_power[1] - log_power[0])
    extent = (
        log_lr[0] - step[0] / 2,
        log_lr[-1] + step[0] / 2,
        log_power[0] - step[1] / 2,
        log_power[-1] + step[1] / 2,
    )
    for ax, (name, r) in zip(axes, results.items(), strict=True):
        grid = np.ma.masked_invalid(r["grid"])
        cmap = plt.get_cmap("viridis").copy()
        cmap.set_bad("0.75")  # diverged
        image = ax.imshow(
            grid.T,
            origin="lower",
            extent=extent,
            aspect="auto",
            cmap=cmap,
            norm=LogNorm(vmin=grid.min(), vmax=grid.max()),
        )
        fig.colorbar(
            image, ax=ax, label=f"{OBJECTIVES[name]['unit']} {name.replace('_', ' ')}"
        )
        ax.contour(
            log_lr,
            log_power,
            np.where(np.isfinite(r["grid"]), r["grid"], 1e30).T,
            levels=[r["grid_min"] * (1 + REGION)],
            colors="w",
            linewidths=1,
            linestyles="--",
        )
        colors = {"PES": "tab:red", "truncated ES": "tab:orange"}
        for label, run in r["runs"].items():
            t, color = run["trajectory"], colors[label]
            x, y = t[-1]
            if not (extent[0] <= x <= extent[1] and extent[2] <= y <= extent[3]):
                label += " (ends off the grid)"
            ax.plot(t[:, 0], t[:, 1], color=color, lw=1.5, label=label)
            ax.plot(x, y, "*", color=color, ms=14, mec="k")
        ax.plot(*THETA0, "o", color="w", ms=8, mec="k", label="start")
        ax.plot(*r["best"], "X", color="k", ms=10, mec="w", label="grid minimum")
        ax.plot([], [], "w--", lw=1, label=f"within {100 * REGION:.0f} % of it")
        ax.set(
            xlabel=r"$\theta_0$ = log initial learning rate",
            ylabel=r"$\theta_1$ = log decay power",
            title=f"{OBJECTIVES[name]['label']}, T = {horizon}",
        )
        ax.legend(loc="lower left", fontsize=8, facecolor="0.85")
    diverged = any(not np.all(np.isfinite(r["grid"])) for r in results.values())
    fig.suptitle(
        "PES tunes the learning-rate schedule of SGD + momentum (MLP on digits)"
        + ("; grey: diverged" if diverged else ""),
        fontsize=11,
    )
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"\nsaved {out} ({time.perf_counter() - start_all:.0f} s in all)")


if __name__ == "__main__":
    main()
