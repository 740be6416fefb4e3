"""A multiscale DEQ (`optax_pes.models.MDEQClassifier`) on scikit-learn's digits.

The model is `optax_pes.models.MDEQClassifier`: a convolutional stem injects each
8x8 image at two resolutions, (8, 8, c0) and (4, 4, c1); a Broyden solve finds the
equilibrium of the multiscale cell (residual blocks per resolution, fused by strided
and 1x1 convolutions, group norms); the head pools both resolutions into 10 logits.
It is trained with each adjoint, with the same forward (same solver, tolerance,
initialisation and minibatch order per seed); only the backward pass differs:

- `Shine()`: the transposed Broyden inverse of the forward solve (no extra solve);
- `Shine(refine_steps=5)`: SHINE refined by 5 fixed-point steps;
- `Shine(fallback=True)`: SHINE, Jacobian-free for samples whose estimate blows up;
- `JacobianFree()`: the cotangent passed through unchanged;
- `Implicit(tol=1e-4)`: the implicit gradient, GMRES to a relative 1e-4;
- `Implicit(tol=1e-4), GMRES(20)`: the control, the same implicit gradient by GMRES
  with longer cycles: what a difference within the solve's tolerance and float32
  rounding does to the accuracy (the noise floor of every comparison in the table);
- `Phantom(k=5, damping=0.5)`: backprop through 5 damped steps from the fixed point;

and, as the explicit baseline, the same stem, cell and head (the same parameters)
with the cell applied twice from z = 0 and backpropagated through: no fixed point.

Prints a markdown table (test accuracy, mean and spread over seeds; forward and
backward time per minibatch; mean Broyden steps) and saves a figure (default
`outputs/mdeq_digits.png`): training loss against step per model, and final test
accuracy.

    python examples/mdeq_digits.py            # about 6 minutes on a 2-core CPU
    python examples/mdeq_digits.py --quick    # 1 seed, 40 steps: a smoke test
    python examples/mdeq_digits.py --seeds 8 --models shine,jfb,implicit
"""

import argparse
import functools
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import optax_pes

CONTROL = "Implicit(tol=1e-4), GMRES(20)"
ADJOINTS = {
    "Shine()": optax_pes.Shine(),
    "Shine(refine_steps=5)": optax_pes.Shine(refine_steps=5),
    "Shine(fallback=True)": optax_pes.Shine(fallback=True),
    "JacobianFree()": optax_pes.JacobianFree(),
    # GMRES to 1e-4: in float32 the default 1e-6 is out of reach on this layer (the
    # solve would run to max_steps and fall back to Jacobian-free).
    "Implicit(tol=1e-4)": optax_pes.Implicit(tol=1e-4),
    # The control: the same gradient to the same tolerance, computed by GMRES with
    # cycles of 20 steps instead of 10. Its accuracy differs from Implicit's only
    # within that tolerance and by float32 rounding, amplified by training: the
    # comparison's noise floor.
    CONTROL: optax_pes.Implicit(
        tol=1e-4, linear_solver=lx.GMRES(rtol=1e-4, atol=1e-4, restart=20, max_steps=6)
    ),
    "Phantom(k=5, damping=0.5)": optax_pes.Phantom(k=5, damping=0.5),
}
EXPLICIT = "explicit (cell twice)"
# Short names for --models.
KEYS = dict(
    zip(
        (
            "shine",
            "refine",
            "fallback",
            "jfb",
            "implicit",
            "control",
            "phantom",
            "explicit",
        ),
        (*ADJOINTS, EXPLICIT),
        strict=True,
    )
)


# ------------------------------------------------------------------------ model ----


class Explicit(eqx.Module):
    """The baseline: the MDEQ's stem, cell and head, the cell applied `depth` times
    from z = 0 (ordinary backprop, no fixed point). Same parameters as the MDEQ."""

    model: optax_pes.models.MDEQClassifier
    depth: int = eqx.field(static=True)

    def solve(self, image):
        x = self.model.inject(image)
        z = tuple(jnp.zeros_like(a) for a in x)
        for _ in range(self.depth):
            z = self.model.cell(z, x)
        return self.model.readout(z), None


def loss_fn(model, images, labels):
    logits, info = jax.vmap(model.solve)(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, info)


@functools.partial(jax.jit, static_argnums=1)
def forward(params, static, images, labels):
    """The loss and logits alone (no derivatives): test accuracy and timing."""
    return loss_fn(eqx.combine(params, static), images, labels)


@functools.partial(jax.jit, static_argnums=(1, 2))
def train_step(params, static, optim, opt_state, images, labels):
    """One Adam step. A plain `jax.jit` on the arrays (compiled once per adjoint and
    shared by the seeds, which differ only in their arrays)."""

    def loss(p):
        return loss_fn(eqx.combine(p, static), images, labels)

    (value, (_, info)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = optim.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value, info


# ------------------------------------------------------------------------- data ----


def load_data(quick):
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    if quick:
        x_train, y_train = x_train[:512], y_train[:512]
    mean, std = x_train.mean(), x_train.std()
    prep = lambda a: jnp.asarray((a - mean) / std, jnp.float32).reshape(-1, 8, 8, 1)
    return prep(x_train), jnp.asarray(y_train), prep(x_test), jnp.asarray(y_test)


def batch_order(num, batch_size, steps, rng):
    """`steps` minibatches of indices, epoch after epoch (each shuffled; partial
    batches dropped so that every step has one shape)."""
    out = []
    while len(out) < steps:
        perm = rng.permutation(num)
        out += [
            perm[i : i + batch_size] for i in range(0, num - batch_size + 1, batch_size)
        ]
    return out[:steps]


# --------------------------------------------------------------------- training ----


def accuracy(params, static, images, labels, batch_size):
    """Test accuracy, in minibatches of the training shape (the last one padded),
    so that the forward compiled here is the one timed."""
    pad = -len(images) % batch_size
    xs = jnp.concatenate([images, images[:pad]])
    ys = jnp.concatenate([labels, labels[:pad]])
    correct = [
        np.asarray(jnp.argmax(forward(params, static, xb, yb)[1][0], -1) == yb)
        for xb, yb in zip(
            xs.reshape(-1, batch_size, *images.shape[1:]),
            ys.reshape(-1, batch_size),
            strict=True,
        )
    ]
    return float(np.concatenate(correct)[: len(images)].mean())


def train(model, data, steps, batch_size, optim, seed, desc):
    """Adam; returns the trained arrays, the loss per step, the test accuracy and the
    mean Broyden steps (None for the explicit net)."""
    x_train, y_train, x_test, y_test = data
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = optim.init(params)
    order = batch_order(len(x_train), batch_size, steps, np.random.default_rng(seed))
    losses, solver_steps = [], []
    bar = tqdm(order, desc=f"{desc:<28}", leave=False)
    for i, idx in enumerate(bar):
        params, opt_state, loss, info = train_step(
            params, static, optim, opt_state, x_train[idx], y_train[idx]
        )
        losses.append(loss)
        if info is not None:
            solver_steps.append(info.steps)
        if i % 20 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    losses = np.asarray(jax.device_get(losses))
    mean_steps = float(np.mean(jax.device_get(solver_steps))) if solver_steps else None
    acc = accuracy(params, static, x_test, y_test, batch_size)
    return params, static, opt_state, losses, acc, mean_steps


def per_call_ms(fns, number, rounds):
    """Milliseconds per call of each `fn()` (already compiled): `number` calls back to
    back, one block at the end; the least of `rounds`, interleaved."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready([fn() for _ in range(number)])
            times[name].append((time.perf_counter() - start) / number)
    return {name: 1e3 * float(np.min(t)) for name, t in times.items()}


# ------------------------------------------------------------------------ main ----


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 steps")
    parser.add_argument("--out", default="outputs/mdeq_digits.png", help="figure path")
    parser.add_argument("--steps", type=int, default=None, help="default 300 (40)")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (1)")
    parser.add_argument("--channels", default="8,16", help="per resolution")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-2, help="Adam's first rate")
    parser.add_argument(
        "--constant-lr",
        action="store_true",
        help="keep the rate (default: cosine decay to 0 over the steps)",
    )
    parser.add_argument(
        "--models",
        default=",".join(KEYS),
        help=f"comma-separated, of {','.join(KEYS)} (default: all)",
    )
    args = parser.parse_args()
    chosen = args.models.split(",")
    unknown = sorted(set(chosen) - set(KEYS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; expected names from {list(KEYS)}")
    start_all = time.perf_counter()
    steps = args.steps or (40 if args.quick else 300)
    seeds = args.seeds or (1 if args.quick else 3)
    channels = tuple(int(c) for c in args.channels.split(","))
    number, rounds = (3, 2) if args.quick else (5, 5)

    data = load_data(args.quick)
    x_train, y_train, x_test, _ = data
    # One forward for every MDEQ: Broyden to |f(z) - z| <= 1e-3 (absolute or
    # relative), at most 30 steps.
    solver = optax_pes.Broyden(max_steps=30, tol=1e-3, memory=30)
    make = lambda adjoint, seed: optax_pes.models.MDEQClassifier(
        1, 10, channels, solver=solver, adjoint=adjoint, key=seed
    )
    size = sum(a.size for a in jax.tree.leaves(eqx.filter(make(None, 0), eqx.is_array)))
    print(
        f"digits: {len(x_train)} train / {len(x_test)} test 8x8 images; MDEQ channels "
        f"{channels} ({size} parameters); {steps} steps of Adam({args.lr}"
        f"{', constant' if args.constant_lr else ', cosine decay'}), batch "
        f"{args.batch_size}; {seeds} seed(s); {jax.device_count()} "
        f"{jax.default_backend()} device(s)"
    )

    # The rate decays to 0 (cosine) by the last step: at a constant 3e-2 the final
    # weights are a snapshot of a noisy trajectory, and the spread of the test
    # accuracy over seeds was larger (docs/deq.md). One object: train_step compiles
    # once per model.
    lr = args.lr if args.constant_lr else optax.cosine_decay_schedule(args.lr, steps)
    optim = optax.adam(lr)
    timing_batch = (x_train[: args.batch_size], y_train[: args.batch_size])
    runs = {KEYS[k]: ADJOINTS.get(KEYS[k]) for k in KEYS if k in chosen}
    results = {}
    trained = {}
    for name, adjoint in runs.items():
        accs, losses, solver_steps = [], [], []
        for seed in range(seeds):
            model = make(adjoint, seed)
            if name == EXPLICIT:
                model = Explicit(model, depth=2)
            params, static, opt_state, loss, acc, mean_steps = train(
                model, data, steps, args.batch_size, optim, seed, f"{name} s{seed}"
            )
            accs.append(acc)
            losses.append(loss)
            solver_steps.append(mean_steps)
        trained[name] = eqx.combine(params, static)
        results[name] = dict(
            acc=np.asarray(accs),
            loss=np.asarray(losses),
            steps=None if solver_steps[0] is None else float(np.mean(solver_steps)),
        )
        print(
            f"{name:<28} test acc {np.mean(accs):.4f}  (per seed: "
            f"{' '.join(f'{100 * a:.1f}' for a in accs)})"
        )

    # Timed on one training minibatch, interleaved. Every adjoint on the same trained
    # MDEQ (the first row's, last seed, its adjoint swapped): the same forward, so the
    # differences are the backward passes' alone (on each adjoint's own model, the
    # forward's Broyden steps differ). The explicit net on its own. fwd is the jitted
    # loss alone; step is the jitted training step (value_and_grad and Adam's
    # update); bwd = step - fwd.
    reference = next((trained[n] for n in trained if n != EXPLICIT), None)
    fns = {}
    for name in results:
        model = trained[name]
        if name != EXPLICIT:
            model = eqx.tree_at(lambda m: m.deq.adjoint, reference, ADJOINTS[name])
        params, static = eqx.partition(model, eqx.is_array)
        opt_state = optim.init(params)
        fns[name, "fwd"] = functools.partial(forward, params, static, *timing_batch)
        fns[name, "step"] = functools.partial(
            train_step, params, static, optim, opt_state, *timing_batch
        )
    ms = per_call_ms(fns, number, rounds)
    for name, r in results.items():
        r.update(fwd=ms[name, "fwd"], step=ms[name, "step"])
        r["bwd"] = r["step"] - r["fwd"]

    print(
        "\n| model | test accuracy (%) | backward ms | forward ms | train step ms | "
        "Broyden steps |\n| --- | --- | --- | --- | --- | --- |"
    )
    for name, r in results.items():
        acc = 100 * r["acc"]
        spread = f" ± {acc.std():.2f}" if len(acc) > 1 else ""
        solver_steps = "-" if r["steps"] is None else f"{r['steps']:.1f}"
        print(
            f"| {name} | {acc.mean():.2f}{spread} | {r['bwd']:.1f} | {r['fwd']:.1f} | "
            f"{r['step']:.1f} | {solver_steps} |"
        )
    notes = [
        f"{len(x_test)} test images (one is {100 / len(x_test):.2f} points);",
        f"accuracy mean ± std over {seeds} seed(s). Times per minibatch of",
        f"{args.batch_size}, every MDEQ row on the same trained model (least of",
        f"{rounds} interleaved rounds of {number} calls): forward = the jitted loss;",
        "train step = the jitted value_and_grad + Adam update; backward = step -",
        "forward. Broyden steps: mean over all training solves.",
    ]
    print("\n" + " ".join(notes))
    # Every model sees the same initialisation and minibatches per seed, so the
    # differences are paired: their spread over seeds is far below the accuracies'.
    implicit = "Implicit(tol=1e-4)"
    for shine in (n for n in results if n.startswith("Shine") or n == CONTROL):
        for other in (implicit, "JacobianFree()"):
            if other not in results:
                continue
            diff = 100 * (results[shine]["acc"] - results[other]["acc"])
            error = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.nan
            print(
                f"{shine} - {other} accuracy, paired over {len(diff)} seed(s): "
                f"{diff.mean():+.2f} ± {error:.2f} points (mean ± standard error; "
                f"per seed {np.array2string(diff, precision=2)})"
            )
        if implicit in results:
            ratio = results[shine]["step"] / results[implicit]["step"]
            print(f"{shine} / {implicit} train step time: {ratio:.2f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    window = max(1, steps // 20)
    kernel = np.ones(window) / window
    for name, r in results.items():
        curve = np.convolve(r["loss"].mean(0), kernel, mode="valid")
        ax0.plot(np.arange(len(curve)) + window, curve, label=name)
    ax0.set(
        xlabel="training step",
        ylabel=f"training loss (mean over seeds, {window}-step average)",
        yscale="log",
        title="MDEQ on digits",
    )
    ax0.legend(fontsize=8)
    names = list(results)
    pos = np.arange(len(names))
    means = [100 * results[n]["acc"].mean() for n in names]
    stds = [100 * results[n]["acc"].std() for n in names]
    bars = ax1.bar(pos, means, yerr=stds, capsize=3)
    ax1.bar_label(bars, fmt="%.1f", fontsize=7)
    ax1.set_xticks(
        pos, [n.replace("(", "\n(").replace(", ", ",\n") for n in names], fontsize=6
    )
    ax1.set_ylim(max(0, min(means) - 10), 100)
    ax1.set(ylabel="test accuracy (%)", title=f"After {steps} steps ({seeds} seed(s))")
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"\nsaved {out} ({time.perf_counter() - start_all:.0f} s in all)")


if __name__ == "__main__":
    main()
