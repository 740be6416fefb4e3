"""Sharded-equals-single-device checks, run on 4 forced host CPU devices.

`tests/test_sharding.py` runs this file in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` (the flag must be set before JAX
starts, so it cannot share the test process). Run it directly the same way.
"""

import contextlib
import io
import logging
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType

import optax_pes

NUM_DEVICES = 4


def training_system():
    """A small Equinox MLP regression trained by SGD with a PES-paper schedule."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (128, 5))
    y = jnp.sin(x @ jax.random.normal(kw, (5,)))
    model = eqx.nn.MLP(5, "scalar", 8, 1, key=jax.random.key(1))

    def loss(m, x, y):
        return jnp.mean((jax.vmap(m)(x) - y) ** 2)

    return optax_pes.tasks.training_system(
        model,
        loss,
        lambda th: optax.sgd(optax_pes.tasks.lr_schedule(th), momentum=0.9),
        (x, y),
        horizon=12,
        batch_size=16,
        model_init=lambda k: eqx.nn.MLP(5, "scalar", 8, 1, key=k),
    )


def estimators(training=True, **mesh):
    """Every estimator on 8 particles; staggered PES on the training system (or, with
    `training=False`, on the linear-quadratic one: `--quick` does, since compiling
    the training system for 4 devices takes most of a minute), the others on a random
    linear-quadratic system (cheaper to compile)."""
    common = dict(num_particles=8, key=3, **mesh)
    lq, _ = optax_pes.tasks.linear_quadratic(0, theta_shapes=(2,), horizon=12)
    return {
        "pes": optax_pes.pes(
            training_system() if training else lq,
            sigma=0.1,
            truncation_length=5,
            stagger=True,
            **common,
        ),
        "pes_sync": optax_pes.pes(lq, sigma=0.1, truncation_length=4, **common),
        "full_es": optax_pes.full_es(lq, sigma=0.1, **common),
        "nres": optax_pes.nres(lq, sigma=0.1, truncation_length=5, **common),
        "truncated_es": optax_pes.truncated_es(
            lq, sigma=0.1, truncation_length=4, **common
        ),
        "tbptt": optax_pes.tbptt(lq, truncation_length=4, **common),
    }


def run(tx, theta, num_updates=4, state=None):
    """`num_updates` jitted updates (from `state`, or from `init`); the estimates
    and the final state. The update compiles once: the state `init` returns (or a
    checkpoint restores) is laid out as the updates return it (before: only the
    inner state was placed on the mesh, and the second call compiled again)."""
    update = jax.jit(tx.update)
    state = tx.init(theta) if state is None else state
    estimates = []
    with _compilations() as compiled:
        for _ in range(num_updates):
            estimate, state = update(jnp.zeros_like(theta), state, theta)
            estimates.append(estimate)
    assert compiled.count("jit(update_fn)") <= 1, compiled  # (0: cached already)
    return jnp.stack(estimates), state


@contextlib.contextmanager
def _compilations():
    """The names of the functions XLA compiled inside the block."""
    names = []

    class Handler(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Finished XLA compilation of "):
                names.append(message.split()[4])

    handler, logger = Handler(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)


def check_equal(name, sharded, single):
    """Keys, counters and flags exactly; floats to float32 rounding of the array's
    scale. XLA may pick other kernels for a batch of 2 particles per device than for
    8 on one, and sums the particles in another order, which moves the last bits of
    each particle's loss. An ES estimate is a difference of such losses divided by
    sigma, so that rounding is relative to the largest entries, not to each entry: a
    small entry beside large ones (CI saw 1.5e-5 relative on -0.357 beside -2.85) is
    as exact as its neighbours. A sharding bug (a particle's noise, key or slice
    misplaced) moves entries by a fair fraction of the scale; rounding, measured, by
    up to 2.5e-6 of it here and 1.8e-6 on CI. Returns the worst difference over
    scale seen."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(a.dtype, np.floating):
            scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-1)
            np.testing.assert_allclose(a, b, rtol=0, atol=3e-5 * scale, err_msg=name)
            worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)) / scale)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
    return worst


def check_sharded(name, state):
    """The particle axis of the inner state is split over all the devices."""
    for leaf in jax.tree.leaves(state.inner_state):
        devices = leaf.sharding.device_set
        assert len(devices) == NUM_DEVICES, (name, leaf.sharding)
        assert not leaf.sharding.is_fully_replicated, (name, leaf.sharding)


QUICK = ("pes", "tbptt")  # `--quick` (the default suite): these, on two meshes


def main(quick: bool = False) -> int:
    assert jax.device_count() >= NUM_DEVICES, jax.devices()
    theta = jnp.array([jnp.log(0.05), jnp.log(1.0)])
    names = QUICK if quick else tuple(estimators())
    training = not quick
    single = {k: run(tx, theta) for k, tx in estimators(training).items() if k in names}
    explicit = jax.make_mesh((NUM_DEVICES,), ("particles",))  # explicit axes
    auto = jax.make_mesh((NUM_DEVICES,), ("particles",), axis_types=(AxisType.Auto,))
    grid = jax.make_mesh((2, 2), ("particles", "model"))
    cases = [(name, explicit, None) for name in single]
    cases += [("pes", grid, "particles")] + ([] if quick else [("pes", auto, None)])
    for name, mesh, axes in cases:
        tx = estimators(training, mesh=mesh, mesh_axes=axes)[name]
        estimates, state = run(tx, theta)
        types = "/".join(t.name for t in mesh.axis_types)
        label = f"{name} on mesh {dict(mesh.shape)} ({types}), axes {axes or 'all'}"
        if axes is None:
            check_sharded(label, state)
        worst = check_equal(label, (estimates, state), single[name])
        print(f"ok: {label} (worst difference / scale {worst:.1e})", flush=True)
    # A sharded state checkpoints and continues like the single-device run.
    tx = estimators(training, mesh=explicit)["pes"]
    _, state = run(tx, theta, num_updates=2)
    buffer = io.BytesIO()
    optax_pes.tree_serialise_leaves(buffer, state)
    buffer.seek(0)
    like = tx.init(theta)
    state = optax_pes.tree_deserialise_leaves(buffer, like)
    # Laid out as `like` (before: on one device, so the update compiled again).
    shardings = lambda tree: [leaf.sharding for leaf in jax.tree.leaves(tree)]  # noqa: E731
    assert shardings(state) == shardings(like), shardings(state)
    estimates, state = run(tx, theta, num_updates=2, state=state)
    estimate = estimates[-1]
    check_sharded("restored pes", state)
    check_equal(
        "restored pes", (estimate, state), (single["pes"][0][-1], single["pes"][1])
    )
    print("ok: a sharded state restored from a checkpoint continues", flush=True)
    # outer_loop compiles its chunk once: theta and adam's state (on one device from
    # init) are replicated over the estimator's mesh first (before: twice).
    lq, _ = optax_pes.tasks.linear_quadratic(0, theta_shapes=(2,), horizon=12)
    pes = optax_pes.pes(
        lq, num_particles=8, sigma=0.1, truncation_length=4, key=3, mesh=explicit
    )
    with _compilations() as compiled:
        optax_pes.outer_loop(
            optax.chain(pes, optax.adam(1e-2)),
            np.asarray(theta),
            12,
            chunk=4,
            progress=False,
        )
    assert compiled.count("jit(_chunk)") == 1, compiled
    print("ok: outer_loop on a mesh compiles its chunk once", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv[1:]))
