"""The particle axis sharded over a mesh gives the single-device estimate.

JAX fixes its device count when it starts, so the checks (`tests/sharded_checks.py`)
run in a fresh interpreter with 4 forced host CPU devices.
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import optax_pes

CHECKS = pathlib.Path(__file__).with_name("sharded_checks.py")


def _sharded_checks(*args: str) -> str:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, str(CHECKS), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_sharded_estimate_equals_single_device():
    # Staggered PES and TBPTT (both on a linear-quadratic system) on a 4-device mesh
    # and on a 2x2 grid, a sharded checkpoint restored, and outer_loop on a mesh, each
    # compiling its update once: the default suite's share.
    # The slow test below runs PES on the training system.
    out = _sharded_checks("--quick")
    assert out.count("ok:") == 5, out


@pytest.mark.slow
def test_every_sharded_estimator_equals_single_device():
    # Every estimator, and Auto as well as Explicit mesh axes (about 75 s).
    out = _sharded_checks()
    assert out.count("ok:") == 10, out


def test_mesh_errors_name_the_argument():
    system, _ = optax_pes.tasks.linear_quadratic(0, horizon=4)
    mesh = jax.make_mesh((1,), ("particles",))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        optax_pes.pes(
            system, num_particles=2, sigma=0.1, truncation_length=2, key=0, mesh="cpu"
        )
    with pytest.raises(ValueError, match="mesh_axes must name axes"):
        optax_pes.pes(
            system,
            num_particles=2,
            sigma=0.1,
            truncation_length=2,
            key=0,
            mesh=mesh,
            mesh_axes="data",
        )
    with pytest.raises(ValueError, match="mesh_axes needs a mesh"):
        optax_pes.nres(
            system,
            num_particles=2,
            sigma=0.1,
            truncation_length=2,
            key=0,
            mesh_axes="particles",
        )


def test_one_device_mesh_is_the_same_code_path():
    system, _ = optax_pes.tasks.linear_quadratic(0, horizon=6)
    theta = jnp.zeros(3)
    mesh = jax.make_mesh((1,), ("particles",))
    out = []
    for m in (None, mesh):
        tx = optax_pes.pes(
            system, num_particles=4, sigma=0.1, truncation_length=4, key=0, mesh=m
        )
        out.append(jax.jit(tx.update)(jnp.zeros(3), tx.init(theta), theta)[0])
    assert jnp.array_equal(out[0], out[1])
