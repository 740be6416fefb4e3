"""A deep equilibrium classifier on scikit-learn's digits, trained with each adjoint.

The model embeds an 8x8 image, solves for the fixed point of one tanh layer with
Broyden's method (`optax_pes.DEQ`, vmapped over the minibatch) and reads the class
out of the equilibrium. Every run has the same forward computation (same Broyden
solver and tolerance, same initialisation, same minibatch order); only the backward
pass differs:

- `Shine()`: the transposed Broyden inverse of the forward solve (no extra solve);
- `Shine(refine_steps=5)`: SHINE refined by 5 GMRES steps;
- `Shine(fallback=True)`: SHINE, Jacobian-free for samples whose estimate blows up;
- `Implicit()`: the exact implicit gradient, a GMRES solve to tolerance;
- `JacobianFree()`: the cotangent is passed through unchanged;
- `Phantom(k=5, damping=0.5)`: backprop through 5 damped steps from the fixed point.

Prints a table (test accuracy, forward and backward time per minibatch, solver
statistics) and saves a figure (default `outputs/deq_digits.png`). What to expect:
every adjoint reaches about the accuracy of a one-hidden-layer MLP (96-98 %; the
test set has 450 images, so 0.2 % is one image); SHINE's backward costs about as
much as the Jacobian-free one, little more than one batched VJP of the layer, and
far less than the implicit backward, whose GMRES runs whole 30-vector Krylov cycles.

    python examples/deq_digits.py            # a few minutes on a 2-core CPU
    python examples/deq_digits.py --quick    # part of the data, 3 epochs: smoke test
"""

import argparse
import functools
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

import optax_pes

ADJOINTS = {
    "Shine()": optax_pes.Shine(),
    "Shine(refine_steps=5)": optax_pes.Shine(refine_steps=5),
    "Shine(fallback=True)": optax_pes.Shine(fallback=True),
    "Implicit()": optax_pes.Implicit(),
    "JacobianFree()": optax_pes.JacobianFree(),
    "Phantom(k=5, damping=0.5)": optax_pes.Phantom(k=5, damping=0.5),
}


# ------------------------------------------------------------------------ model ----


class Layer(eqx.Module):
    """f(z, x) = tanh(W z + x): x is the embedded image (the input injection)."""

    linear: eqx.nn.Linear

    def __init__(self, width, scale, *, key):
        linear = eqx.nn.Linear(width, width, key=key)
        # A small W keeps f contractive at initialisation (|W| about 0.6).
        self.linear = eqx.tree_at(lambda m: m.weight, linear, scale * linear.weight)

    def __call__(self, z, x):
        return jnp.tanh(self.linear(z) + x)


class DEQClassifier(eqx.Module):
    embed: eqx.nn.Linear
    deq: optax_pes.DEQ
    readout: eqx.nn.Linear

    def __init__(self, width, solver, adjoint, *, key):
        k_embed, k_layer, k_readout = jax.random.split(key, 3)
        self.embed = eqx.nn.Linear(64, width, key=k_embed)
        self.deq = optax_pes.DEQ(
            Layer(width, 0.5, key=k_layer), solver=solver, adjoint=adjoint
        )
        self.readout = eqx.nn.Linear(width, 10, key=k_readout)

    def __call__(self, image):
        """Logits and solver info for ONE image (jax.vmap over a batch)."""
        x = self.embed(image)
        z, info = self.deq.solve(x, jnp.zeros_like(x))
        return self.readout(z), info


def loss_fn(model, images, labels):
    logits, info = jax.vmap(model)(images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, info)


@functools.partial(jax.jit, static_argnums=1)
def forward(params, static, images, labels):
    """The forward pass alone (no derivatives), for the test accuracy and the
    timings. A plain `jax.jit` on the model's arrays (`eqx.partition`), as every
    timed function here: no per-call Python work beyond `jax.jit`'s own."""
    return loss_fn(eqx.combine(params, static), images, labels)


class MLP(eqx.Module):
    """The baseline: the DEQ's embedding and readout around one tanh, no fixed point."""

    embed: eqx.nn.Linear
    readout: eqx.nn.Linear

    def __init__(self, width, *, key):
        k_embed, _, k_readout = jax.random.split(key, 3)
        self.embed = eqx.nn.Linear(64, width, key=k_embed)
        self.readout = eqx.nn.Linear(width, 10, key=k_readout)

    def __call__(self, image):
        return self.readout(jnp.tanh(self.embed(image))), None


# ------------------------------------------------------------------------- data ----


def load_data(quick):
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    if quick:
        x_train, y_train = x_train[:512], y_train[:512]
    scaler = StandardScaler().fit(x_train)  # constant pixels are left at 0
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return f32(x_train), jnp.asarray(y_train), f32(x_test), jnp.asarray(y_test)


def minibatches(num, batch_size, rng):
    """Shuffled index batches of one epoch; the last partial batch is dropped (so
    every step has the same shape and compiles once)."""
    perm = rng.permutation(num)
    for i in range(num // batch_size):
        yield perm[i * batch_size : (i + 1) * batch_size]


# --------------------------------------------------------------------- training ----


def train(model, data, epochs, batch_size, lr, desc):
    """Adam on minibatches; returns the model, test accuracy per epoch (epoch 0 is
    the initialisation) and the solver statistics of every training step."""
    x_train, y_train, x_test, y_test = data
    optim = optax.adam(lr)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, images, labels):
        grad_fn = eqx.filter_value_and_grad(loss_fn, has_aux=True)
        (loss, (_, info)), grads = grad_fn(model, images, labels)
        params = eqx.filter(model, eqx.is_array)
        updates, opt_state = optim.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, loss, info

    def accuracy(model, images, labels):
        # In minibatches of the training shape (the last one padded), so that the
        # forward compiled here is the one timed later.
        pad = -len(images) % batch_size
        images = jnp.concatenate([images, images[:pad]])
        labels = jnp.concatenate([labels, labels[:pad]])
        params, static = eqx.partition(model, eqx.is_array)
        correct = [
            np.asarray(jnp.argmax(forward(params, static, xb, yb)[1][0], -1) == yb)
            for xb, yb in zip(
                images.reshape(-1, batch_size, images.shape[-1]),
                labels.reshape(-1, batch_size),
                strict=True,
            )
        ]
        return np.concatenate(correct)[: len(images) - pad].mean()

    rng = np.random.default_rng(0)  # the same minibatch order for every adjoint
    accuracies = [float(accuracy(model, x_test, y_test))]
    steps, converged = [], []
    bar = tqdm(range(epochs), desc=f"{desc:<26}", leave=False)
    for _ in bar:
        for idx in minibatches(len(x_train), batch_size, rng):
            model, opt_state, loss, info = step(
                model, opt_state, x_train[idx], y_train[idx]
            )
            if info is not None:
                steps.append(np.asarray(info.steps))
                converged.append(np.asarray(info.converged))
        accuracies.append(float(accuracy(model, x_test, y_test)))
        bar.set_postfix(loss=f"{float(loss):.3f}", test_acc=f"{accuracies[-1]:.3f}")
    stats = None
    if steps:
        stats = (float(np.mean(steps)), float(np.mean(converged)))
    return model, accuracies, stats


# ---------------------------------------------------------------------- timing ----


def per_call_times(fns, number, rounds):
    """Seconds per call of each `fn()` in `fns` (a dict), compiled and warmed up
    first, as `timeit` does: `number` calls back to back (JAX dispatches them
    asynchronously, as in a training loop), one block at the end, total / number;
    the least of `rounds` such measurements. Rounds are interleaved between the
    functions, so a change of load on the machine hits them alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            out = [fn() for _ in range(number)]
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / number)
    return {name: float(np.min(t)) for name, t in times.items()}


def time_passes(model, batches, number, rounds, checks=True):
    """Forward and backward seconds per minibatch, averaged over `batches`.

    Method: everything is jitted, compiled and warmed up before timing; each figure
    is measured on the same minibatch(es) with `per_call_times`:

    - fwd: the loss alone (solve + readout + cross-entropy), no derivatives;
    - bwd: the pullback alone. `jax.vjp` of the loss runs (in its own jitted call,
      not timed) the forward and keeps its residuals (the fixed points, the Broyden
      inverses); the timed call only applies the returned pullback to the cotangent
      1.0. That is the whole backward pass: the adjoint's cotangent map (SHINE's
      low-rank product, GMRES, ...), the batched VJP of f at z*, and the embedding,
      readout and loss;
    - grad - fwd: a cross-check, the jitted `value_and_grad` minus fwd. It agrees
      with bwd up to what XLA fuses or schedules differently, and up to noise (a
      difference of two timings: it can come out slightly negative);
    - VJP of f: the reference cost the design compares a backward pass with, one
      batched VJP of the DEQ layer f alone at the fixed points (w.r.t. its weights
      and x).

    `checks=False` leaves out the last two (fewer compilations, for `--quick`).
    """
    params, static = eqx.partition(model, eqx.is_array)
    loss = lambda p, xb, yb: loss_fn(eqx.combine(p, static), xb, yb)[0]
    vjp = jax.jit(lambda p, xb, yb: jax.vjp(lambda q: loss(q, xb, yb), p))
    pullback = jax.jit(lambda pb: pb(jnp.ones((), jnp.float32)))
    value_and_grad = jax.jit(jax.value_and_grad(loss))

    @eqx.filter_jit
    def fixed_points(model, xb):
        x = jax.vmap(model.embed)(xb)
        return x, jax.vmap(lambda x: model.deq.solve(x, jnp.zeros_like(x))[0])(x)

    @jax.jit
    def layer_vjp(layer, x, z, zbar):
        f = lambda layer, x: jax.vmap(layer)(z, x)
        return jax.vjp(f, layer, x)[1](zbar)

    out = []
    for xb, yb in batches:
        _, pb = vjp(params, xb, yb)
        fns = {
            "fwd": functools.partial(forward, params, static, xb, yb),
            "bwd": functools.partial(pullback, pb),
        }
        if checks:
            x, z = fixed_points(model, xb)
            zbar = jax.random.normal(jax.random.key(0), z.shape)
            fns["grad"] = functools.partial(value_and_grad, params, xb, yb)
            layer = model.deq.fn
            fns["VJP of f"] = functools.partial(layer_vjp, layer, x, z, zbar)
        out.append(per_call_times(fns, number, rounds))
    mean = {name: float(np.mean([t[name] for t in out])) for name in out[0]}
    nan = float("nan")
    mean["grad - fwd"] = mean.pop("grad", nan) - mean["fwd"]
    mean.setdefault("VJP of f", nan)
    return mean


# ------------------------------------------------------------------------ main ----


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="512 images, 3 epochs")
    parser.add_argument("--out", default="outputs/deq_digits.png", help="figure path")
    parser.add_argument("--epochs", type=int, default=None, help="default 15 (3)")
    parser.add_argument("--width", type=int, default=128, help="DEQ state size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    start_all = time.perf_counter()
    epochs = args.epochs or (3 if args.quick else 15)
    timing_batches, number, rounds = (1, 10, 3) if args.quick else (4, 20, 7)

    data = load_data(args.quick)
    x_train, y_train, x_test, _ = data
    print(
        f"digits: {len(x_train)} train / {len(x_test)} test images, width "
        f"{args.width}, batch {args.batch_size}, {epochs} epochs of Adam({args.lr}), "
        f"{jax.device_count()} {jax.default_backend()} device(s)"
    )
    # One forward for every run: Broyden to |f(z) - z| <= 1e-4 (absolute or
    # relative), the same one for the adjoints that do not need its inverse.
    solver = optax_pes.Broyden(max_steps=30, tol=1e-4, memory=30)
    key = jax.random.key(0)

    _, mlp_acc, _ = train(
        MLP(args.width, key=key), data, epochs, args.batch_size, args.lr, "MLP"
    )
    print(f"baseline MLP (embed -> tanh -> readout): test accuracy {mlp_acc[-1]:.3f}")

    rng = np.random.default_rng(1)
    batches = [
        (x_train[idx], y_train[idx])
        for idx in list(minibatches(len(x_train), args.batch_size, rng))[
            :timing_batches
        ]
    ]
    results = {}
    for name, adjoint in ADJOINTS.items():
        model = DEQClassifier(args.width, solver, adjoint, key=key)
        start = time.perf_counter()
        model, accuracies, stats = train(
            model, data, epochs, args.batch_size, args.lr, name
        )
        train_s = time.perf_counter() - start
        times = time_passes(model, batches, number, rounds, checks=not args.quick)
        results[name] = dict(acc=accuracies, stats=stats, times=times, train=train_s)

    print(
        f"\n{'adjoint':<26} {'test acc':>8} {'fwd ms':>7} {'bwd ms':>7} "
        f"{'grad-fwd':>8} {'VJP(f)':>7} {'steps':>6} {'conv':>5} {'train s':>8}"
    )
    ms = lambda v, w: "-".rjust(w) if np.isnan(v) else f"{1e3 * v:>{w}.3f}"
    for name, r in results.items():
        t = r["times"]
        steps, conv = r["stats"]
        print(
            f"{name:<26} {r['acc'][-1]:>8.3f} {ms(t['fwd'], 7)} {ms(t['bwd'], 7)} "
            f"{ms(t['grad - fwd'], 8)} {ms(t['VJP of f'], 7)} {steps:>6.1f} "
            f"{conv:>5.2f} {r['train']:>8.1f}"
        )
    print(
        f"Timed on each run's trained model, {len(batches)} training minibatch(es) of "
        f"{args.batch_size}, least of {rounds} rounds of {number} back-to-back calls."
        "\nfwd: the jitted loss, no derivatives; bwd: the jitted pullback of "
        "jax.vjp alone (residuals precomputed);\ngrad-fwd: jitted value_and_grad "
        "minus fwd (a cross-check); VJP(f): one batched VJP of the DEQ layer at z*;"
        "\nsteps, conv: mean Broyden steps and fraction converged over all training "
        "solves; train s: training wall time, compilation included."
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, r in results.items():
        ax0.plot(r["acc"], marker=".", label=name)
    ax0.axhline(mlp_acc[-1], color="k", ls="--", lw=1, label="MLP baseline")
    ax0.set(xlabel="epoch", ylabel="test accuracy", title="DEQ on digits")
    ax0.set_ylim(max(0.0, min(min(r["acc"][1:]) for r in results.values()) - 0.05), 1)
    ax0.legend(fontsize=8)
    names = list(results)
    pos = np.arange(len(names))
    fwd = [1e3 * results[n]["times"]["fwd"] for n in names]
    bwd = [1e3 * results[n]["times"]["bwd"] for n in names]
    ax1.bar(pos - 0.2, fwd, 0.4, label="forward")
    bars = ax1.bar(pos + 0.2, bwd, 0.4, label="backward (pullback)")
    ax1.bar_label(bars, fmt="%.2f", fontsize=7)
    vjp_f = np.mean([results[n]["times"]["VJP of f"] for n in names]) * 1e3
    if not np.isnan(vjp_f):
        ax1.axhline(vjp_f, color="k", ls=":", lw=1, label="one batched VJP of f")
    labels = [n.replace("(", "\n(").replace(", ", ",\n") for n in names]
    ax1.set_xticks(pos, labels, fontsize=7)
    ax1.set_yscale("log")
    ax1.set(ylabel="ms per minibatch (log)", title="Time per minibatch (trained model)")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"\nsaved {out} ({time.perf_counter() - start_all:.0f} s in all)")


if __name__ == "__main__":
    main()
