"""One process of the multi-process checks (`tests/test_multiprocess.py` runs two).

    python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process joins JAX's multi-controller runtime on 127.0.0.1 (CPU, gloo collectives),
builds a global mesh over every process's devices and runs the same estimator chains as
the single-process reference (`run` with `mesh=None`). What it computed is gathered to
every process and written to `OUT_DIR/PROCESS_ID.npz`; process 0 also checkpoints the
gathered final states (`OUT_DIR/NAME.ckpt`).
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_pes

NUM_UPDATES = 3


def systems():
    """name -> (system, theta, pes arguments): a linear-quadratic system, and a small
    training loop tuned by staggered PES."""
    lq, theta = optax_pes.tasks.linear_quadratic(0, theta_shapes=(2,), horizon=12)
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (64, 3))
    y = jnp.sin(x @ jax.random.normal(kw, (3,)))

    def loss(w, x, y):
        return jnp.mean((jnp.tanh(x @ w) - y) ** 2)

    training = optax_pes.tasks.training_system(
        jnp.zeros(3),
        loss,
        lambda th: optax.sgd(optax_pes.tasks.lr_schedule(th)),
        (x, y),
        horizon=10,
        batch_size=16,
    )
    return {
        "lq": (lq, theta, dict(truncation_length=4)),
        "training": (training, jnp.array([-1.0, 2.0]), dict(truncation_length=3)),
    }


def chain(system, mesh, **kwargs):
    pes = optax_pes.pes(
        system, num_particles=8, sigma=0.1, key=3, stagger=True, mesh=mesh, **kwargs
    )
    return optax.chain(pes, optax.adam(1e-2))


def run(system, theta, mesh, **kwargs):
    """NUM_UPDATES updates of pes + adam: (the updates, final theta, final state)."""
    tx = chain(system, mesh, **kwargs)
    state = tx.init(theta)
    step = jax.jit(lambda th, s: tx.update(jnp.zeros_like(th), s, th))
    updates = []
    for _ in range(NUM_UPDATES):
        update, state = step(theta, state)
        updates.append(update)
        theta = optax.apply_updates(theta, update)
    return updates, theta, state


def to_host(tree):
    """Every leaf as a process-local numpy array (keys as their key data)."""
    from jax.experimental import multihost_utils

    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if jax.process_count() > 1:
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(leaf, tree)


def main(process_id: int, num_processes: int, port: int, out: pathlib.Path) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
    )
    # Auto axes: the estimators' sharding constraints then propagate through the step.
    mesh = jax.make_mesh(
        (len(jax.devices()),), ("particles",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    results = {}
    for name, (system, theta, kwargs) in systems().items():
        updates, theta, state = run(system, theta, mesh, **kwargs)
        for i, update in enumerate(to_host(updates)):
            results[f"{name}/update{i}"] = update
        results[f"{name}/theta"] = to_host(theta)
        host_state = to_host(state)
        for i, leaf in enumerate(jax.tree.leaves(host_state)):
            results[f"{name}/state{i}"] = leaf
        if process_id == 0:
            like = chain(system, None, **kwargs).init(theta)
            restored = jax.tree.map(
                lambda x, saved: (
                    jax.random.wrap_key_data(saved, impl=jax.random.key_impl(x))
                    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                    else jnp.asarray(saved)
                ),
                like,
                host_state,
            )
            optax_pes.tree_serialise_leaves(out / f"{name}.ckpt", restored)
    np.savez(out / f"{process_id}.npz", **results)
    print(f"process {process_id} of {jax.process_count()}: done", flush=True)


if __name__ == "__main__":
    main(
        int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4])
    )
