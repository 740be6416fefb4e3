"""Two processes on one machine (JAX's multi-controller runtime) give the
single-process estimate, state and theta, and their checkpoint restores in one process.

Each process is `tests/multiprocess_worker.py`; they meet at a coordinator on
127.0.0.1 and are killed if they do not finish in time.
"""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import optax_pes

from . import multiprocess_worker as worker

WORKER = pathlib.Path(worker.__file__)
TIMEOUT = 300  # seconds for both processes, compile included


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(num_processes: int, out: pathlib.Path) -> list[str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(num_processes), str(port), out],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:  # a failed or hung peer must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=False):
        assert p.returncode == 0, log
    return logs


@pytest.mark.slow
def test_two_processes_give_the_single_process_run(tmp_path):
    logs = _launch(2, tmp_path)
    assert all("done" in log for log in logs)
    results = [np.load(tmp_path / f"{i}.npz") for i in range(2)]
    for name, (system, theta, kwargs) in worker.systems().items():
        updates, final_theta, state = worker.run(system, theta, None, **kwargs)
        expected = {f"{name}/theta": np.asarray(final_theta)}
        for i, update in enumerate(updates):
            expected[f"{name}/update{i}"] = np.asarray(update)
        for i, leaf in enumerate(jax.tree.leaves(worker.to_host(state))):
            expected[f"{name}/state{i}"] = leaf
        for key, value in expected.items():
            for result in results:  # every process holds the whole, same result
                np.testing.assert_allclose(result[key], value, rtol=2e-6, atol=1e-7)

        # The multi-process checkpoint restores in one process and runs on.
        tx = worker.chain(system, None, **kwargs)
        restored = optax_pes.tree_deserialise_leaves(
            tmp_path / f"{name}.ckpt", tx.init(theta)
        )
        for a, b in zip(
            jax.tree.leaves(worker.to_host(restored)),
            jax.tree.leaves(worker.to_host(state)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
        update, _ = jax.jit(lambda th, s, tx=tx: tx.update(th * 0, s, th))(
            final_theta, restored
        )
        assert np.all(np.isfinite(np.asarray(update)))
