"""DEQ backward and forward costs: SHINE against the other adjoints and solvers.

Prints, measured side by side in one run (never as tests), on a DEQ layer
`f(z, x) = tanh(W z + U x + b)` (an Equinox module, `d` features, a batch of `B`
samples through `jax.vmap`, one sample per DEQ call as the API requires):

1. Backward (pullback only) of `optax_pes.DEQ` with each adjoint. The forward and
   `jax.vjp` run once inside `jax.jit`; the VJP function `jax.vjp` returns is a
   pytree, so it is passed as an argument to a jitted pullback, which alone is
   timed. Bars: Shine / JacobianFree <= 1.5, Shine / one batched VJP of f at z*
   w.r.t. (params, x) <= 1.5 (the floor), Implicit / Shine >= 10 (the SHINE paper's
   13x was on large CIFAR MDEQs). Also Shine with Broyden memory 5, 10 and 20 (SHINE's
   own cost is reading the (B, memory + 1, d) inverse buffers), Shine(refine_steps=r),
   Phantom(5), and Implicit with GMRES (restart 30 and 10) and with fixed-point
   iteration. Accuracy: cosine of each gradient (w.r.t. the layer's parameters and
   x, all flattened) with the exact implicit gradient from a dense per-sample solve
   `(I - J_f)^T w = zbar` at a tightly converged z*.
2. Forward: optax_pes.Broyden (and its Anderson / FixedPoint) against jaxopt's
   Broyden (no line search, and its default backtracking line search) and
   AndersonAcceleration, and optimistix's FixedPointIteration, Chord and Newton
   (optimistix 0.1 has no Broyden), per sample via `jax.vmap`, same tolerance.
   optax_pes stops when `|f(z) - z|_2 <= tol * max(1, |z|_2)`; the others take an
   absolute tolerance, so sample i gets `tol_i = tol * max(1, |z*_i|_2)` (a traced
   per-sample value) in the same 2-norm: jaxopt's error is `|g|_2`, optimistix gets
   `norm=two_norm, rtol=0, atol=tol_i`. jaxopt's Broyden solves `z - f(z) = 0` (its
   inverse starts at +I). Every returned iterate is checked with the same residual.
   Bar: ours fewer steps and less time.

3. The multiscale DEQ (`optax_pes.models.MDEQClassifier`, channels (8, 16)) after
   `--mdeq-train-steps` Adam steps with Shine on scikit-learn's digits: the whole
   model's pullback per adjoint against JacobianFree (one VJP of the cell at z*, the
   floor), and the cosine to the exact gradient (dense per-sample solve at a z*
   solved to 1e-6) on the training loss's cotangent. Bar: Shine / JFB <= 1.2.

Layers (sections 1-2): random "trained-like" inits, not trained. `||W||_2 = 0.9`
(a contraction; a Gaussian W of that norm has spectral radius ~0.5, so the layer
is easy) and, in the default run, `||W||_2 = 2.0` (spectral radius ~1.1: not a
contraction in norm, ~2.3x more solver steps, a more "trained-like"
ill-conditioned Jacobian). Both saturate tanh enough that plain iteration converges
in about as many steps as Broyden; so the default run ends with the forward solvers
on a layer slow for plain iteration (`--skip-slow` to leave it out): symmetric W with
eigenvalues spread over [-0.99, 0.99] and a small input, near-linear at z* (spectral
radius ~0.99), up to 1000 steps each.
Timing: everything jitted, warmed up, `block_until_ready`, candidates interleaved
round-robin in a rotating order, median of `--repeats` calls; float32. The forward
solvers that build dense Jacobians or take 20-100x longer (jaxopt's Broyden,
optimistix's Chord and Newton) are timed in a group of their own.

    python benchmarks/deq_backward.py            # d=256, B=256, 2 layers (< 10 min)
    python benchmarks/deq_backward.py --quick    # d=128, B=64, 1 layer (< 1 min)
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
from _problems import Layer, digits_data, make_conv_layer, make_layer
from _timing import block, compare, cosine, medians, ms, of_thunks
from jax.flatten_util import ravel_pytree

import optax_pes

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import jaxopt

warnings.filterwarnings("ignore", category=DeprecationWarning, module="jaxopt")

MEMORY_SWEEP = (5, 10, 20)  # Broyden memory besides the default 30

NOTES = """
Notes:
- JacobianFree and "VJP of f at z*" are the same computation (the DEQ output is
  f(z*, x) at a stop-gradient z*). Shine adds, per sample, w = zbar - S^T (A^T S
  zbar): it reads the B x memory x d buffer of Broyden's steps twice (memory-bound)
  against ~4 B d^2 flops for f's VJP with W shared across the batch, so Shine / JFB
  grows with memory / d: small for conv MDEQs, visible on a dense d=128-256 layer.
- Implicit / Shine: on a small contractive layer the backward system converges in
  about as many (cheap, z-only) VJPs as the forward took steps, so a lean implicit
  backward (fixed point) is only a few Shine backwards. lineax's GMRES runs a full
  restart cycle with no in-cycle convergence test (plus a residual-only first
  pass) and orthogonalises at HIGHEST precision, so it costs far more per VJP.
- Shine's cosine is close to JFB's: Broyden's inverse is accurate on the secant
  directions the forward explored, not on a random cotangent; refine fixes that.
- Forward: under vmap a Broyden step reads its (B, memory + 1, d) buffer of
  steps' filled rows three times (B^-1 = -I + S^T A S: S g and S dz, then S^T (A S g);
  in leading blocks of 1, 2, 4, ... rows, copies under vmap) and writes one row,
  so its time still grows with the rows a solve fills.
"""


# ------------------------------------------------------------------- timing ------


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each (compiled) thunk, warmed up, round-robin in
    an order that rotates every round (no candidate always follows the same one)."""
    return medians(compare(of_thunks(fns), repeats))


# ----------------------------------------------------------------- backward ------


def deq_pullback(layer: Layer, solver, adjoint, xs, z0):
    """`(vjp_fn, forward)` of the batched DEQ with `adjoint`.

    `vjp_fn` (a pytree: the residuals of one jitted forward) is what `pull` times;
    `forward()` reruns the jitted forward + `jax.vjp`. Differentiated w.r.t. the
    DEQ's array leaves (the layer's parameters) and the inputs xs.
    """
    deq = optax_pes.DEQ(layer, solver=solver, adjoint=adjoint)
    params, static = eqx.partition(deq, eqx.is_inexact_array)

    def batched(params, xs):
        model = eqx.combine(params, static)
        return jax.vmap(lambda x: model(x, z0))(xs)

    forward = jax.jit(lambda p, xs: jax.vjp(batched, p, xs))
    _, vjp_fn = block(forward(params, xs))
    return vjp_fn, (lambda: forward(params, xs))


def layer_pullback(layer: Layer, xs, zs):
    """One batched VJP of f at z* w.r.t. (params, x): the floor of any backward."""
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def batched(params, xs, zs):
        model = eqx.combine(params, static)
        return jax.vmap(lambda x, z: model(z, x))(xs, zs)

    forward = jax.jit(lambda p, xs, zs: jax.vjp(lambda p, x: batched(p, x, zs), p, xs))
    _, vjp_fn = block(forward(params, xs, zs))
    return vjp_fn


def z_pullback(layer, xs, zs):
    """One batched VJP of f in z alone at z*: a refinement step's unit of work."""

    def batched(zs):
        return jax.vmap(lambda x, z: layer(z, x))(xs, zs)

    return block(jax.jit(lambda zs: jax.vjp(batched, zs))(zs))[1]


@jax.jit
def pull(vjp_fn, cotangent):
    return vjp_fn(cotangent)


def exact_gradient(layer: Layer, xs, zs, cotangent):
    """Implicit gradient w.r.t. (layer params, x) by a dense per-sample solve."""

    @jax.jit
    def run(layer, xs, zs, cotangent):
        def w_of(x, z, g):
            jac = jax.jacfwd(lambda z: layer(z, x))(z)
            eye = jnp.eye(z.shape[0], dtype=z.dtype)
            return jnp.linalg.solve((eye - jac).T, g)

        ws = jax.vmap(w_of)(xs, zs, cotangent)
        params, static = eqx.partition(layer, eqx.is_inexact_array)

        def batched(params, xs):
            model = eqx.combine(params, static)
            return jax.vmap(lambda x, z: model(z, x))(xs, zs)

        _, vjp_fn = jax.vjp(batched, params, xs)
        return vjp_fn(ws)

    return run(layer, xs, zs, cotangent)


def backward_section(args, layer, xs, z0, zs_exact, cotangent):
    solver = optax_pes.Broyden(max_steps=args.max_steps, tol=args.tol, memory=30)
    adjoints: dict[str, Any] = {
        "JacobianFree": optax_pes.JacobianFree(),
        "Shine": optax_pes.Shine(),
        "Shine(fallback)": optax_pes.Shine(fallback=True),
        **{
            f"Shine(refine={r})": optax_pes.Shine(refine_steps=r) for r in (1, 2, 5, 10)
        },
        "Phantom(5)": optax_pes.Phantom(k=5, damping=0.5),
        "Implicit(gmres)": optax_pes.Implicit(max_steps=100, tol=args.tol),
        "Implicit(fixed_point)": optax_pes.Implicit(
            max_steps=200, tol=args.tol, linear_solver="fixed_point"
        ),
    }
    if not args.quick:
        adjoints["Implicit(lx.GMRES restart=30)"] = optax_pes.Implicit(
            max_steps=100,
            tol=args.tol,
            linear_solver=lx.GMRES(
                rtol=args.tol, atol=args.tol, max_steps=100, restart=30
            ),
        )
    vjps: dict[str, Any] = {}
    fwd_fns: dict[str, Callable[[], Any]] = {}
    for name, adjoint in adjoints.items():
        vjps[name], fwd_fns[name] = deq_pullback(layer, solver, adjoint, xs, z0)
    # SHINE's own cost is reading the (B, memory, d) inverse buffers: sweep memory.
    for m in args.memory_sweep:
        small = optax_pes.Broyden(max_steps=args.max_steps, tol=args.tol, memory=m)
        name = f"Shine(memory={m})"
        vjps[name], fwd_fns[name] = deq_pullback(
            layer, small, optax_pes.Shine(), xs, z0
        )
    # The floor: one batched VJP of f at the forward's own z* (JFB's output is f(z*)).
    zs_fwd = block(
        jax.jit(
            jax.vmap(lambda x: optax_pes.DEQ(layer, solver=solver).solve(x, z0)[0])
        )(xs)
    )
    vjps["VJP of f at z*"] = layer_pullback(layer, xs, zs_fwd)

    exact = exact_gradient(layer, xs, zs_exact, cotangent)  # (layer grads, x grads)
    grads = {k: block(pull(v, cotangent)) for k, v in vjps.items()}
    # DEQ gradients are (DEQ params = {fn: layer params}, xs): compare layer leaves.
    cos = {}
    for k, (gp, gx) in grads.items():
        gp = gp if isinstance(gp, Layer) else gp.fn
        cos[k] = cosine((gp, gx), exact)

    times = interleaved(
        {k: (lambda v=v: pull(v, cotangent)) for k, v in vjps.items()}, args.repeats
    )
    fwd_time = interleaved(
        {"Shine": fwd_fns["Shine"], "JacobianFree": fwd_fns["JacobianFree"]},
        max(3, args.repeats // 5),
    )
    return times, cos, fwd_time


def adjoint_suite(implicit_tol: float, phantom: bool = False) -> dict[str, Any]:
    """The adjoints the conv and MDEQ sections compare, by name."""
    return {
        "JacobianFree": optax_pes.JacobianFree(),
        "Shine": optax_pes.Shine(),
        "Shine(fallback)": optax_pes.Shine(fallback=True),
        **{f"Shine(refine={r})": optax_pes.Shine(refine_steps=r) for r in (1, 2, 5)},
        **({"Phantom(5)": optax_pes.Phantom(k=5, damping=0.5)} if phantom else {}),
        "Implicit(gmres)": optax_pes.Implicit(max_steps=100, tol=implicit_tol),
        "Implicit(fixed_point)": optax_pes.Implicit(
            max_steps=100, tol=implicit_tol, linear_solver="fixed_point"
        ),
    }


def print_adjoint_table(times, cos, base: str, base_label: str) -> None:
    """Time per pullback, its ratios to `base` and to Shine, and the cosine."""
    print(f"{'':24} {'time':>12} {base_label:>7} {'/ Shine':>9} {'cos(exact)':>12}")
    base_t, shine = times[base], times["Shine"]
    for k, t in times.items():
        c = f"{cos[k]:12.4f}" if k in cos else f"{'-':>12}"
        print(
            f"{k:24} {ms(t, '9.3f', unit=True)} {t / base_t:7.2f} {t / shine:9.2f} {c}"
        )


def summary_table(layer: str, rows: list[tuple[str, str]]) -> str:
    """A markdown table of `(ratio, measured)` rows for one layer."""
    platform = jax.devices()[0].platform
    lines = [f"| {platform} | {layer} | {label} | {value} |" for label, value in rows]
    return "\n".join(
        ["| device | layer | ratio | measured |", "|---|---|---|---|", *lines]
    )


# ------------------------------------------------------------- conv layer ------


def unrolled_exact(layer, xs, zs, steps: int):
    """A hand-written exact backward: `steps` unrolled iterations of
    w <- zbar + J^T w per sample (vmapped), then one batched VJP w.r.t. (params, x).
    Returns a jitted `(cotangent) -> grads` and the residual it reaches."""
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def grads(params, xs, zs, cotangent):
        model = eqx.combine(params, static)

        def w_of(x, z, g):
            _, vjp = jax.vjp(lambda z: model(z, x), z)
            w = g
            for _ in range(steps):
                w = g + vjp(w)[0]
            return w, jnp.linalg.norm(g + vjp(w)[0] - w) / jnp.linalg.norm(w)

        ws, res = jax.vmap(w_of)(xs, zs, cotangent)
        batched = lambda p, xs: jax.vmap(lambda x, z: eqx.combine(p, static)(z, x))(
            xs, zs
        )
        return jax.vjp(batched, params, xs)[1](ws), res

    run = jax.jit(grads)
    return (lambda cotangent: run(params, xs, zs, cotangent)[0]), (
        lambda cotangent: float(jnp.max(run(params, xs, zs, cotangent)[1]))
    )


def loss_cotangent(zs, key, classes: int = 10):
    """The cotangent a training loss sends into z*: softmax cross-entropy of a random
    linear readout of the spatially pooled state, at random labels."""
    k_r, k_y = jax.random.split(key)
    readout = jax.random.normal(k_r, (zs.shape[-1], classes)) / np.sqrt(zs.shape[-1])
    labels = jax.random.randint(k_y, zs.shape[:1], 0, classes)

    def loss(zs):
        logits = jnp.mean(zs, axis=(1, 2)) @ readout
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

    return jax.grad(loss)(zs)


def conv_section(args, gain: float) -> str:
    """Every adjoint on the convolutional layer, against one batched VJP of f at z*
    and an unrolled exact backward at the same tolerance, and refinement's steps
    against one VJP of f in z alone (their floor); returns a summary table."""
    key = jax.random.key(args.seed)
    k_layer, k_x, k_ct = jax.random.split(key, 3)
    size, channels, batch = 8, args.conv_channels, args.conv_batch
    layer = make_conv_layer(channels, gain, k_layer)
    shape = (size, size, channels)
    xs = jax.random.normal(k_x, (batch, *shape))
    z0 = jnp.zeros(shape)
    cotangent = jax.random.normal(k_ct, (batch, *shape))
    print(
        f"\n######## conv layer tanh({gain} * layernorm(conv3x3(z)) + x), "
        f"z {shape} NHWC, batch {batch}, Broyden memory {args.conv_memory}, "
        f"tol {args.tol}"
    )
    solver = optax_pes.Broyden(
        max_steps=args.max_steps, tol=args.tol, memory=args.conv_memory
    )
    adjoints = adjoint_suite(args.tol)
    vjps: dict[str, Any] = {}
    fwd_fns: dict[str, Callable[[], Any]] = {}
    for name, adjoint in adjoints.items():
        vjps[name], fwd_fns[name] = deq_pullback(layer, solver, adjoint, xs, z0)
    deq = optax_pes.DEQ(layer, solver=solver)
    zs, info = block(jax.jit(jax.vmap(lambda x: deq.solve(x, z0)))(xs))
    vjps["VJP of f at z*"] = layer_pullback(layer, xs, zs)
    pulls = {k: (lambda v=v: pull(v, cotangent)) for k, v in vjps.items()}
    exact_fn, exact_res = unrolled_exact(layer, xs, zs, args.conv_exact_steps)
    pulls[f"unrolled exact ({args.conv_exact_steps})"] = lambda: exact_fn(cotangent)
    reference = unrolled_exact(layer, xs, zs, 200)[0](cotangent)
    grads = {k: block(fn()) for k, fn in pulls.items()}
    cos = {}
    for k, (gp, gx) in grads.items():
        gp = gp.fn if isinstance(gp, optax_pes.DEQ) else gp
        cos[k] = cosine((gp, gx), reference)
    # The cotangent a classification loss sends (not a random one), and where
    # Shine(fallback) replaced SHINE's w (its per-sample x-gradient differs).
    loss_ct = block(loss_cotangent(zs, k_ct))
    loss_ref = unrolled_exact(layer, xs, zs, 200)[0](loss_ct)
    loss_cos, fired = {}, {}
    for k in ("JacobianFree", "Shine", "Shine(fallback)", *adjoints):
        if k in loss_cos or k.startswith("Implicit"):
            continue
        gp, gx = block(pull(vjps[k], loss_ct))
        loss_cos[k] = cosine((gp.fn, gx), loss_ref)
    for ct_name, ct in (("random", cotangent), ("loss", loss_ct)):
        plain = pull(vjps["Shine"], ct)[1]
        guarded = pull(vjps["Shine(fallback)"], ct)[1]
        changed = jnp.any(plain != guarded, axis=(1, 2, 3))
        fired[ct_name] = float(jnp.mean(changed))
    # A refinement step's unit of work: one batched VJP of f in z alone.
    z_vjp = z_pullback(layer, xs, zs)
    pulls["VJP of f in z at z*"] = lambda: pull(z_vjp, cotangent)
    times = interleaved(pulls, args.repeats)
    print(
        f"forward: {float(jnp.mean(info.steps)):.1f} Broyden steps (mean); unrolled "
        f"exact backward's residual |zbar + J^T w - w| / |w| <= "
        f"{exact_res(cotangent):.1e}"
    )
    print_adjoint_table(times, cos, "VJP of f at z*", "/ VJP")
    vjp_t, shine = times["VJP of f at z*"], times["Shine"]
    print(
        "cosine with the exact gradient on a classification loss's cotangent: "
        + ", ".join(f"{k} {c:.4f}" for k, c in loss_cos.items())
    )
    print(
        f"Shine(fallback) fired for {fired['random']:.0%} of samples (random "
        f"cotangent), {fired['loss']:.0%} (loss cotangent)"
    )
    exact_t = times[f"unrolled exact ({args.conv_exact_steps})"]
    # What refinement's five steps cost against their floor, five VJPs in z.
    z_vjp_t = times["VJP of f in z at z*"]
    refine_steps = (times["Shine(refine=5)"] - shine) / (5 * z_vjp_t)
    rows = [
        ("Shine / one batched VJP of f at z*", f"{shine / vjp_t:.2f}"),
        ("Shine(refine=5) / Shine", f"{times['Shine(refine=5)'] / shine:.2f}"),
        ("(Shine(refine=5) - Shine) / five VJPs of f in z", f"{refine_steps:.2f}"),
        (
            "Implicit(fixed_point) / unrolled exact",
            f"{times['Implicit(fixed_point)'] / exact_t:.2f}",
        ),
        (
            "Implicit(gmres) / unrolled exact",
            f"{times['Implicit(gmres)'] / exact_t:.2f}",
        ),
        (
            "Implicit(fixed_point) / Shine",
            f"{times['Implicit(fixed_point)'] / shine:.2f}",
        ),
        (
            "cosine Shine / JacobianFree",
            f"{cos['Shine']:.3f} / {cos['JacobianFree']:.3f}",
        ),
        (
            "cosine Shine / JacobianFree, loss cotangent",
            f"{loss_cos['Shine']:.3f} / {loss_cos['JacobianFree']:.3f}",
        ),
    ]
    return summary_table(f"conv gain {gain} (8, 8, {channels}) x {batch}", rows)


# -------------------------------------------------------------- multiscale DEQ ---


def digits(seed: int):
    """scikit-learn's 8x8 digits, shuffled (pixels / 16, channels-last), and labels."""
    pixels, labels = digits_data()
    order = np.random.RandomState(seed).permutation(len(labels))
    return pixels.reshape(-1, 8, 8, 1)[order], labels[order]


def mdeq_model(args, adjoint, seed: int = 0):
    return optax_pes.models.MDEQClassifier(
        1,
        10,
        args.mdeq_channels,
        solver=optax_pes.Broyden(max_steps=30, tol=args.mdeq_tol, memory=30),
        adjoint=adjoint,
        key=seed,
    )


def mdeq_trained(args, images, labels):
    """`(model, last loss)`: the example's MDEQ after `--mdeq-train-steps` Adam
    steps with Shine."""
    import optax

    model = mdeq_model(args, optax_pes.Shine(), args.seed)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adam(3e-2)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss(p):
            logits = jax.vmap(eqx.combine(p, static))(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = optim.init(params)
    rng = np.random.RandomState(args.seed)
    value = float("nan")
    for _ in range(args.mdeq_train_steps):
        idx = rng.randint(0, len(labels), args.mdeq_batch)
        params, opt_state, value = step(params, opt_state, images[idx], labels[idx])
    return eqx.combine(params, static), float(value)


def mdeq_exact(model, images, ct):
    """Implicit gradient of `sum(ct * logits)` w.r.t. the model's arrays by a dense
    per-sample solve `(I - J_f)^T w = zbar` at a tight z* (Broyden to 1e-6)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    tight = optax_pes.Broyden(max_steps=300, tol=1e-6, memory=60)

    @jax.jit
    def run(params, images, ct):
        m = eqx.combine(params, static)

        def per_sample(image, g):
            x = m.inject(image)
            z0 = tuple(jnp.zeros_like(a) for a in x)
            z, _ = eqx.tree_at(lambda d: d.solver, m.deq, tight).solve(x, z0)
            z = jax.lax.stop_gradient(z)
            flat, unravel = ravel_pytree(z)
            zbar = ravel_pytree(jax.vjp(m.readout, z)[1](g)[0])[0]
            jac = jax.jacfwd(lambda f: ravel_pytree(m.cell(unravel(f), x))[0])(flat)
            w = jnp.linalg.solve((jnp.eye(flat.size) - jac).T, zbar)
            res = jnp.linalg.norm(ravel_pytree(m.cell(z, x))[0] - flat)
            return z, unravel(w), res

        zs, ws, res = jax.vmap(per_sample)(images, ct)

        def surrogate(p):
            mm = eqx.combine(p, static)

            def one(image, z, w, g):
                head = jnp.vdot(mm.readout(z), g)
                fz = ravel_pytree(mm.cell(z, mm.inject(image)))[0]
                return head + jnp.vdot(fz, ravel_pytree(w)[0])

            return jnp.sum(jax.vmap(one)(images, zs, ws, ct))

        return jax.grad(surrogate)(params), jnp.max(res)

    return run(params, images, ct)


def mdeq_section(args) -> str:
    """Every adjoint on the (briefly trained) multiscale DEQ: pullback time against
    JacobianFree (= one VJP of the cell at z*, the floor) and cosines to the exact
    gradient on the training loss's cotangent; returns a summary table."""
    images, labels = digits(args.seed)
    t0 = time.perf_counter()
    trained, train_loss = mdeq_trained(args, images, labels)
    x, y = images[: args.mdeq_batch], labels[: args.mdeq_batch]
    print(
        f"\n######## multiscale DEQ (optax_pes.models.MDEQClassifier, channels "
        f"{args.mdeq_channels}) on 8x8 digits, batch {args.mdeq_batch}, Broyden "
        f"memory 30, tol {args.mdeq_tol}; {args.mdeq_train_steps} Adam steps with "
        f"Shine first (loss {train_loss:.3f}, {time.perf_counter() - t0:.0f} s)"
    )
    adjoints = adjoint_suite(1e-4, phantom=True)
    logits = jax.vmap(trained)(x)
    # The cotangent the training loss sends into the logits (mean cross-entropy).
    ct = jax.grad(lambda lg: jnp.mean(-jax.nn.log_softmax(lg)[jnp.arange(len(y)), y]))(
        logits
    )
    exact, res = mdeq_exact(trained, x, ct)
    vjps, cos = {}, {}
    for name, adjoint in adjoints.items():
        model = eqx.tree_at(lambda m: m.deq.adjoint, trained, adjoint)
        p, static = eqx.partition(model, eqx.is_inexact_array)
        forward = jax.jit(
            lambda p, x, static=static: jax.vjp(
                lambda p: jax.vmap(eqx.combine(p, static))(x), p
            )
        )
        _, vjps[name] = block(forward(p, x))
        cos[name] = cosine(block(pull(vjps[name], ct))[0], exact)
    plain = ravel_pytree(pull(vjps["Shine"], ct))[0]
    guarded = ravel_pytree(pull(vjps["Shine(fallback)"], ct))[0]
    fired = bool(jnp.any(plain != guarded))
    steps = float(jnp.mean(jax.vmap(trained.solve)(x)[1].steps))
    pulls = {k: (lambda v=v: pull(v, ct)) for k, v in vjps.items()}
    times = interleaved(pulls, args.repeats)
    print(
        f"forward: {steps:.1f} Broyden steps (mean); exact reference: dense solve at "
        f"z* with max |f(z*) - z*| = {float(res):.1e}; Shine(fallback) "
        f"{'changed' if fired else 'did not change'} the gradient"
    )
    print_adjoint_table(times, cos, "JacobianFree", "/ JFB")
    jfb, shine = times["JacobianFree"], times["Shine"]
    rows = [
        ("Shine / JacobianFree (one VJP of the cell at z*)", f"{shine / jfb:.2f}"),
        ("Shine(refine=5) / Shine", f"{times['Shine(refine=5)'] / shine:.2f}"),
        ("Implicit(gmres) / Shine", f"{times['Implicit(gmres)'] / shine:.2f}"),
        (
            "Implicit(fixed_point) / Shine",
            f"{times['Implicit(fixed_point)'] / shine:.2f}",
        ),
        (
            "cosine, loss cotangent: Shine / JacobianFree / refine(5) / Implicit",
            f"{cos['Shine']:.3f} / {cos['JacobianFree']:.3f} / "
            f"{cos['Shine(refine=5)']:.3f} / {cos['Implicit(gmres)']:.3f}",
        ),
    ]
    return summary_table(f"MDEQ {args.mdeq_channels} x {args.mdeq_batch}", rows)


# ------------------------------------------------------------------ forward ------


def residual(layer, xs, zs):
    return jax.vmap(lambda x, z: jnp.linalg.norm(layer(z, x) - z))(xs, zs)


def forward_solvers(args, layer, memory: int):
    """Name -> jitted fn(xs, z0s, tols) -> (z, steps, f evaluations), per sample."""
    steps_max = args.max_steps

    def ours(solver):
        deq = optax_pes.DEQ(layer, solver=solver, adjoint=optax_pes.JacobianFree())

        def one(x, z0, tol):
            del tol  # ours applies tol * max(1, |z|) itself
            out, info = deq.solve(x, z0)  # out = f(z*, x); evals: init, steps, out
            return out, info.steps, info.steps + 2

        return one

    def g_root(z, x):  # root of z - f(z): Jacobian ~ I, jaxopt's gamma=1 init
        return z - layer(z, x)

    def jaxopt_broyden(linesearch: bool):
        def one(x, z0, tol):
            solver = jaxopt.Broyden(
                fun=g_root,
                maxiter=steps_max,
                tol=tol,
                history_size=memory,
                stepsize=0.0 if linesearch else 1.0,
                implicit_diff=False,
            )
            z, state = solver.run(z0, x)
            return z, state.iter_num, state.num_fun_eval

        return one

    def jaxopt_anderson(history: int):
        def one(x, z0, tol):
            solver = jaxopt.AndersonAcceleration(
                fixed_point_fun=lambda z, x: layer(z, x),
                history_size=history,
                maxiter=steps_max,
                tol=tol,
                implicit_diff=False,
            )
            z, state = solver.run(z0, x)
            return z, state.iter_num, state.num_fun_eval

        return one

    def optx_fixed_point(x, z0, tol):
        solver = optx.FixedPointIteration(rtol=0.0, atol=tol, norm=optx.two_norm)
        sol = optx.fixed_point(
            lambda z, x: layer(z, x), solver, z0, x, max_steps=steps_max, throw=False
        )
        n = sol.stats["num_steps"]
        return sol.value, n, n

    def optx_root(cls):
        def one(x, z0, tol):
            solver = cls(rtol=0.0, atol=tol, norm=optx.two_norm)
            sol = optx.root_find(
                lambda z, x: layer(z, x) - z,
                solver,
                z0,
                x,
                max_steps=steps_max,
                throw=False,
            )
            n = sol.stats["num_steps"]
            return sol.value, n, n

        return one

    ours_tol = args.tol
    fns = {
        f"optax_pes.Broyden(m={memory})": ours(
            optax_pes.Broyden(max_steps=steps_max, tol=ours_tol, memory=memory)
        ),
        # Without Powell's safeguard (the default before it), side by side.
        f"optax_pes.Broyden(m={memory}, powell=0)": ours(
            optax_pes.Broyden(
                max_steps=steps_max, tol=ours_tol, memory=memory, powell=0.0
            )
        ),
        **{
            f"optax_pes.Broyden(m={m})": ours(
                optax_pes.Broyden(max_steps=steps_max, tol=ours_tol, memory=m)
            )
            for m in args.memory_sweep
        },
        "optax_pes.Anderson(m=5)": ours(
            optax_pes.Anderson(max_steps=steps_max, tol=ours_tol, memory=5)
        ),
        "optax_pes.FixedPoint": ours(
            optax_pes.FixedPoint(max_steps=steps_max, tol=ours_tol)
        ),
        f"jaxopt.Broyden(m={memory})": jaxopt_broyden(linesearch=False),
        f"jaxopt.Broyden(m={memory}, ls)": jaxopt_broyden(linesearch=True),
        "jaxopt.Anderson(m=5)": jaxopt_anderson(5),
        "optx.FixedPointIteration": optx_fixed_point,
        "optx.Chord": optx_root(optx.Chord),
        "optx.Newton": optx_root(optx.Newton),
    }
    return {k: jax.jit(jax.vmap(f)) for k, f in fns.items()}


HEAVY_SOLVERS = ("jaxopt.Broyden", "optx.Chord", "optx.Newton")


def forward_section(args, layer, xs, z0s, zs_exact, exclude=()):
    tols = args.tol * jnp.maximum(1.0, jnp.linalg.norm(zs_exact, axis=-1))
    fns = forward_solvers(args, layer, memory=30)
    fns = {k: f for k, f in fns.items() if not k.startswith(tuple(exclude))}
    rows = {}
    for name, fn in fns.items():
        z, steps, evals = block(fn(xs, z0s, tols))
        res = residual(layer, xs, z)
        rows[name] = {
            "steps": float(jnp.mean(steps)),
            "max_steps": int(jnp.max(steps)),
            "evals": float(jnp.mean(evals)),
            "ok": float(jnp.mean(res <= 1.01 * tols)),
            "res": float(jnp.median(res / tols)),
        }
    # The solvers that build dense (batch, d, d) Jacobians or run 20-100x longer are
    # timed apart: interleaved with them, the solvers with the largest buffers
    # (Broyden at memory 30) read 1.3-1.7x their time alone, whatever the order.
    thunks = {k: (lambda f=f: f(xs, z0s, tols)) for k, f in fns.items()}
    heavy = {k: t for k, t in thunks.items() if k.startswith(HEAVY_SOLVERS)}
    light = {k: t for k, t in thunks.items() if k not in heavy}
    times = interleaved(light, max(5, args.repeats // 3))
    if heavy:
        times |= interleaved(heavy, max(3, args.repeats // 10))
    return rows, times


# --------------------------------------------------------------------- main ------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d=128, B=64, few reps")
    parser.add_argument("--dim", type=int, default=None, help="features d")
    parser.add_argument("--batch", type=int, default=None, help="batch size B")
    parser.add_argument(
        "--rho",
        type=float,
        nargs="+",
        default=None,
        help="spectral norms of W, one layer each (default 0.9 2.0; --quick: 0.9)",
    )
    parser.add_argument("--tol", type=float, default=1e-5, help="forward tolerance")
    parser.add_argument("--max-steps", type=int, default=50, help="forward max steps")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-forward", action="store_true")
    parser.add_argument("--skip-conv", action="store_true", help="no conv layer")
    parser.add_argument("--skip-dense", action="store_true", help="no dense layers")
    parser.add_argument(
        "--skip-slow", action="store_true", help="no layer slow for plain iteration"
    )
    parser.add_argument("--conv-channels", type=int, default=None)
    parser.add_argument("--conv-batch", type=int, default=None)
    parser.add_argument(
        "--conv-gain",
        type=float,
        nargs="+",
        default=None,
        help="conv layers' gains, one layer each (default 0.6 1.0; --quick: 0.6)",
    )
    parser.add_argument("--conv-exact-steps", type=int, default=32)
    parser.add_argument(
        "--conv-memory", type=int, default=30, help="conv layers' Broyden memory"
    )
    parser.add_argument("--skip-mdeq", action="store_true", help="no multiscale DEQ")
    parser.add_argument("--mdeq-batch", type=int, default=64)
    parser.add_argument("--mdeq-tol", type=float, default=1e-3)
    parser.add_argument("--mdeq-train-steps", type=int, default=None)
    args = parser.parse_args()
    args.conv_channels = args.conv_channels or (32 if args.quick else 64)
    args.conv_batch = args.conv_batch or (16 if args.quick else 64)
    args.conv_gain = args.conv_gain or ([0.6] if args.quick else [0.6, 1.0])
    args.mdeq_channels = (8, 16)
    if args.mdeq_train_steps is None:
        args.mdeq_train_steps = 20 if args.quick else 150
    args.dim = args.dim or (128 if args.quick else 256)
    args.batch = args.batch or (64 if args.quick else 256)
    args.repeats = args.repeats or (15 if args.quick else 60)
    args.rho = args.rho or ([0.9] if args.quick else [0.9, 2.0])
    args.memory_sweep = () if args.quick else MEMORY_SWEEP
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({jax.device_count()} device(s), {os.cpu_count()} CPU cores); "
        f"d={args.dim}, B={args.batch}, tol={args.tol}, repeats={args.repeats}, "
        "float32"
    )
    start = time.perf_counter()
    tables = [] if args.skip_dense else [run_layer(args, rho) for rho in args.rho]
    if not args.skip_conv:
        tables.extend(conv_section(args, gain) for gain in args.conv_gain)
    if not args.skip_mdeq:
        tables.append(mdeq_section(args))
    if not (args.skip_slow or args.skip_forward or args.quick):
        tables.append(slow_layer_section(args))
    for table in tables:
        print("\n" + table)
    print(NOTES)
    print(f"(total {time.perf_counter() - start:.0f} s)")


def print_forward(rows, ftimes) -> None:
    print(
        "\n== Forward: per-sample solves (vmap), same 2-norm test "
        "|f(z)-z| <= tol*max(1,|z*|)"
    )
    print(
        f"{'':30} {'mean steps':>10} {'max':>4} {'f evals':>8} {'conv.':>6} "
        f"{'res/tol':>8} {'time':>12}"
    )
    for k, r in rows.items():
        print(
            f"{k:30} {r['steps']:10.1f} {r['max_steps']:4d} {r['evals']:8.1f} "
            f"{r['ok']:6.0%} {r['res']:8.2f} {ms(ftimes[k], '9.3f', unit=True)}"
        )


def slow_layer_section(args) -> str:
    """The forward solvers on a layer that is slow for plain iteration: symmetric W
    with eigenvalues spread evenly over [-0.99, 0.99] and a small input, so f is
    near-linear at z* and a fixed-point step contracts by ~0.99 (up to 1000 steps
    for every solver; jaxopt's Broyden, ~0.2 s per call at 10 steps, and
    optimistix's Chord, 15 s per call here with 70 % converged, are left out)."""
    dim, batch = args.dim, args.batch
    q, _ = np.linalg.qr(np.random.default_rng(args.seed).normal(size=(dim, dim)))
    w = jnp.asarray((q * np.linspace(-0.99, 0.99, dim)) @ q.T, jnp.float32)
    u = 0.01 * jax.random.normal(jax.random.key(args.seed), (dim, dim)) / np.sqrt(dim)
    layer = Layer(w, u, jnp.zeros(dim))
    xs = jax.random.normal(jax.random.key(args.seed + 1), (batch, dim))
    tight = optax_pes.DEQ(
        layer,
        solver=optax_pes.FixedPoint(max_steps=5000, tol=1e-7),
        adjoint=optax_pes.JacobianFree(),
    )
    zs_exact = block(jax.jit(jax.vmap(lambda x: tight.solve(x, jnp.zeros(dim))[0]))(xs))
    jac = jax.jacfwd(lambda z: layer(z, xs[0]))(zs_exact[0])
    radius = float(jnp.max(jnp.abs(jnp.linalg.eigvals(np.asarray(jac)))))
    print(
        f"\n######## slow layer for plain iteration: symmetric W, eigenvalues in "
        f"[-0.99, 0.99], small x; spectral radius of J at z* {radius:.3f}"
    )
    slow = argparse.Namespace(**{**vars(args), "max_steps": 1000})
    rows, ftimes = forward_section(
        slow,
        layer,
        xs,
        jnp.zeros_like(xs),
        zs_exact,
        exclude=("jaxopt.Broyden", "optx.Chord"),
    )
    print_forward(rows, ftimes)
    ours = "optax_pes.Broyden(m=30)"
    out = [
        f"| device | slow layer (radius {radius:.2f}) | steps / ours | time / ours "
        "| converged |",
        "|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        out.append(
            f"| cpu | {k} | {r['steps'] / rows[ours]['steps']:.2f} | "
            f"{ftimes[k] / ftimes[ours]:.2f} | {r['ok']:.0%} |"
        )
    return "\n".join(out)


def run_layer(args, rho: float) -> str:
    """Both sections on the layer with ||W||_2 = rho; returns its summary table."""
    key = jax.random.key(args.seed)
    k_layer, k_x, k_ct = jax.random.split(key, 3)
    layer = make_layer(args.dim, rho, k_layer)
    radius = float(jnp.max(jnp.abs(jnp.linalg.eigvals(np.asarray(layer.w)))))
    print(f"\n######## layer ||W||_2 = {rho} (spectral radius {radius:.2f})")
    xs = jax.random.normal(k_x, (args.batch, args.dim))
    z0 = jnp.zeros((args.dim,))
    cotangent = jax.random.normal(k_ct, (args.batch, args.dim))

    # A tightly converged z* for the exact gradient and the per-sample tolerances.
    tight = optax_pes.DEQ(
        layer, solver=optax_pes.Broyden(max_steps=200, tol=1e-7, memory=60)
    )
    zs_exact = block(jax.jit(jax.vmap(lambda x: tight.solve(x, z0)[0]))(xs))
    res_exact = residual(layer, xs, zs_exact)
    print(
        f"reference z*: max |f(z*)-z*| = {float(jnp.max(res_exact)):.2e}, "
        f"mean |z*| = {float(jnp.mean(jnp.linalg.norm(zs_exact, axis=-1))):.2f}"
    )

    t0 = time.perf_counter()
    times, cos, fwd_time = backward_section(args, layer, xs, z0, zs_exact, cotangent)
    print(f"\n== Backward: pullback only, median of {args.repeats} interleaved calls")
    forward = ms(fwd_time["Shine"], "9.3f", unit=True)
    print(f"   (the DEQ forward, with jax.vjp, takes {forward} for Shine)")
    print(f"{'':24} {'time':>12} {'/ Shine':>9} {'cos(exact)':>12}")
    shine = times["Shine"]
    for k, t in times.items():
        print(f"{k:24} {ms(t, '9.3f', unit=True)} {t / shine:9.2f} {cos[k]:12.7f}")
    print(f"(backward section: {time.perf_counter() - t0:.0f} s)")

    rows, ftimes = {}, {}
    if not args.skip_forward:
        t0 = time.perf_counter()
        rows, ftimes = forward_section(args, layer, xs, jnp.zeros_like(xs), zs_exact)
        print_forward(rows, ftimes)
        print(f"(forward section: {time.perf_counter() - t0:.0f} s)")

    return summary(args, rho, times, cos, rows, ftimes)


def summary(args, rho, times, cos, rows, ftimes) -> str:
    """A markdown table of the ratios (paste into a README)."""
    shine, jfb = times["Shine"], times["JacobianFree"]
    out = [
        f"== Summary: ||W||_2={rho}, d={args.dim}, B={args.batch}, tol={args.tol}, "
        "CPU, float32\n",
        "| measure | value | bar |",
        "|---|---|---|",
        f"| Shine / JacobianFree, backward time | {shine / jfb:.2f} | <= 1.5 |",
        f"| Shine / one batched VJP of f at z* | "
        f"{shine / times['VJP of f at z*']:.2f} | <= 1.5 |",
    ]
    for m in args.memory_sweep:
        k = f"Shine(memory={m})"
        out.append(
            f"| {k} / JacobianFree (cos {cos[k]:.4f}) | {times[k] / jfb:.2f} | |"
        )
    for k, label, bar in (
        ("Implicit(gmres)", f"Implicit(tol={args.tol}, default GMRES)", ">= 10"),
        ("Implicit(lx.GMRES restart=30)", "Implicit(lx.GMRES restart=30)", ""),
        ("Implicit(fixed_point)", "Implicit(fixed point)", ""),
    ):
        if k in times:
            out.append(f"| {label} / Shine | {times[k] / shine:.1f} | {bar} |")
    names = ["JacobianFree", "Shine", "Shine(fallback)", "Phantom(5)"]
    names += [f"Shine(refine={r})" for r in (1, 2, 5, 10)] + ["Implicit(gmres)"]
    bars = {"Shine(refine=5)": "cos > 0.999", "Implicit(gmres)": "cos > 0.9999"}
    for k in names:
        out.append(
            f"| {k}: cosine with exact, time / Shine | {cos[k]:.6f}, "
            f"{times[k] / shine:.2f} | {bars.get(k, '')} |"
        )
    if rows:
        ours = "optax_pes.Broyden(m=30)"
        r0 = rows[ours]
        out.append(
            f"| forward {ours}: mean steps, time | {r0['steps']:.1f}, "
            f"{ms(ftimes[ours], '.2f', unit=True)} | |"
        )
        for k, r in rows.items():
            if k != ours:
                out.append(
                    f"| forward {k} / ours: steps, time | "
                    f"{r['steps'] / r0['steps']:.2f}, {ftimes[k] / ftimes[ours]:.2f} "
                    "| > 1 |"
                )
    return "\n".join(out)


if __name__ == "__main__":
    main()
