"""Scaling of optax_pes.pes: particles, devices and horizon.

Prints, measured side by side in one run (never as tests):

1. Particles. The time of one jitted PES update for N = 8 ... 256 particles at a fixed
   truncation length K; its time per particle relative to the smallest N; and its
   ratio to the bare vmapped K-step forward unroll of the same N particles (a jitted
   `lax.scan` over K of `jax.vmap(system.step)`), all N interleaved in each repeat.
2. Devices. The same update with the particle axis sharded over a mesh of D devices,
   at a fixed N. By default the script re-runs itself once per D with D forced host
   CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=D`; the device count
   is fixed when jax starts); the D worker processes stay alive and are sampled in
   turn, so the ratios to D=1 are paired. Forced host devices share the machine's
   cores: beyond the core count they cannot speed anything up. `--real-devices` uses
   `jax.devices()` in this process instead (e.g. a multi-GPU host). Every D also checks
   that the sharded estimate equals the single-device (mesh=None) one.
2b. Processes (`--sections processes`, or `--processes 1 2`). JAX's multi-controller
   runtime on this machine: P processes on 127.0.0.1 (`jax.distributed.initialize`,
   one CPU device each), the particle axis sharded over a mesh of all P devices.
   Each P is a group of P child processes kept alive and sampled in turn (a sample:
   the same fixed number of updates in every process, timed by process 0); printed:
   the update time against P=1 at the same N, and whether the estimate of 3 updates
   (gathered) equals the single-process mesh=None one. The P processes share the
   machine's cores, as forced host devices do.
3. Memory vs horizon. XLA's compiled memory analysis (temp + arguments + outputs) of
   the PES update for T = 100 ... 100,000 at K = 10 and 100: flat in T. For contrast,
   `jax.grad` of the summed full unroll (`optax_pes.unroll`, backpropagation through
   time of one trajectory), which stores every step's residuals: linear in T.

Task: a 64-32-10 Equinox MLP trained on scikit-learn's digits (pixels / 16) by SGD
with momentum 0.9 and the PES paper's learning-rate schedule
(`optax_pes.tasks.lr_schedule(theta)`, theta = log initial rate, log decay power),
minibatches of 32, a fresh initialisation per episode, objective the training loss;
and, in section 1, the PES paper's influence-balancing system (n = 23).

    python benchmarks/scaling.py                  # default settings (< 6 min, 2 cores)
    python benchmarks/scaling.py --quick          # small sizes (< 3 min)
    python benchmarks/scaling.py --real-devices   # section 2 on jax.devices()
    python benchmarks/scaling.py --sections processes --processes 1 2
"""

# ruff: noqa: E402 (a process worker joins JAX's runtime before the imports below build arrays)
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax


def _join_runtime_if_worker(argv: list[str]) -> None:
    """A `--process-worker` must join JAX's multi-controller runtime before anything
    touches a backend, and importing `_problems` builds arrays: join here."""
    if "--process-worker" not in argv:
        return
    value = lambda flag: int(argv[argv.index(flag) + 1])
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{value('--port')}",
        num_processes=value("--num-processes"),
        process_id=value("--process-worker"),
    )


_join_runtime_if_worker(sys.argv)

import jax.numpy as jnp
import numpy as np
import optax
from _problems import SYSTEMS, THETA0, bare_window, digits_system, perturbed
from _timing import (
    Candidate,
    Interleaved,
    add_sampling_arguments,
    block,
    compare,
    header,
    median,
    memory_of,
    mib,
    ms,
    paired_ratio,
    sampling_defaults,
    sized,
)

import optax_pes

SIGMA = 0.1
MESSAGE = "SCALING_JSON "  # prefix of the worker's machine-readable stdout lines
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

SYSTEM_NAMES = ("digits", "infl")  # of _problems.SYSTEMS
DESCRIPTION = {
    "digits": "digits MLP 64-32-10, SGD momentum + lr_schedule(theta), batch 32",
    "infl": "influence balancing (n=23)",
}


def make_pes(system, n: int, k: int, **mesh) -> optax.GradientTransformation:
    return optax_pes.pes(
        system,
        num_particles=n,
        sigma=SIGMA,
        truncation_length=k,
        key=0,
        stagger=True,
        **mesh,
    )


# ------------------------------------------------------------------ machine --------


def num_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ------------------------------------------------------------------ 1. particles ---


def particle_candidates(
    system_name: str, ns: list[int], k: int, horizon: int, budget: float
) -> dict[str, Candidate]:
    """For every N: the jitted PES update and the bare window, one call per sample."""
    system = SYSTEMS[system_name](horizon)
    theta = THETA0[system_name]
    zeros = jnp.zeros_like(theta)
    candidates = {}
    for n in ns:
        tx = make_pes(system, n, k)
        update = jax.jit(tx.update)
        state = block(update(zeros, tx.init(theta), theta)[1])  # compile + init

        def pes_call(state, update=update):
            return update(zeros, state, theta)[1]

        # The same particles (inner states) at perturbed thetas, without the estimator.
        bare, thetas = jax.jit(bare_window(system, n, k)), perturbed(theta, n, SIGMA)

        def bare_call(carry, bare=bare, thetas=thetas):
            inner, key, _ = bare(thetas, *carry)
            return inner, key

        candidates[f"pes{n}"] = sized(pes_call, state, 1, budget)
        candidates[f"bare{n}"] = sized(
            bare_call, (state.inner_state, jax.random.key(2)), 1, budget
        )
    return candidates


def section_particles(args: argparse.Namespace, table: list[str]) -> None:
    k, horizon = args.k, args.horizon
    for system_name in args.systems:
        print(
            f"\n1. Particles: {DESCRIPTION[system_name]}; K={k}, T={horizon}, "
            "stagger; one jitted call per update (milliseconds)",
            flush=True,
        )
        ns = sorted(args.particles)
        started = time.perf_counter()
        t = compare(
            particle_candidates(system_name, ns, k, horizon, args.budget),
            args.repeats,
        )
        n0 = ns[0]
        head = (
            f"{'N':>5} | {'PES':>8} {'bare':>8} {'PES/bare':>8} | "
            f"{f'PES t/t(N={n0})':>14} {'per-particle':>12} | "
            f"{'bare per-particle':>17}"
        )
        header(head)
        for n in ns:
            pes, bare = t[f"pes{n}"], t[f"bare{n}"]
            ratio = paired_ratio(pes, bare)
            growth = paired_ratio(pes, t[f"pes{n0}"])
            per_particle = paired_ratio(pes, t[f"pes{n0}"], n0 / n)
            bare_per_particle = paired_ratio(bare, t[f"bare{n0}"], n0 / n)
            print(
                f"{n:5d} | {ms(median(pes))} {ms(median(bare))} {ratio:8.3f} | "
                f"{growth:14.2f} {per_particle:12.3f} | {bare_per_particle:17.3f}",
                flush=True,
            )
            table.append(
                f"| particles | {system_name} N={n} K={k} | PES/bare {ratio:.2f}; "
                f"per-particle vs N={n0} {per_particle:.2f} (bare "
                f"{bare_per_particle:.2f}) |"
            )
        print(f"({time.perf_counter() - started:.0f}s, compile included)")
    print(
        "notes: per-particle = (t(N)/N) / (t(N0)/N0), median of per-repeat ratios of\n"
        "  interleaved samples (all N and both columns in each repeat); < 1: fixed\n"
        "  per-call costs (dispatch, noise, bookkeeping) amortised over more\n"
        "  particles, ~1: linear in N. PES/bare: the estimator's cost on top of the\n"
        "  vmapped K-step unroll of the same N particles."
    )


# ------------------------------------------------------------------ 2. devices -----


def run_updates(tx, theta: jax.Array, num_updates: int):
    """`num_updates` jitted updates from init: the stacked estimates, the final state
    and the jitted update."""
    update = jax.jit(tx.update)
    state = tx.init(theta)
    estimates = []
    for _ in range(num_updates):
        estimate, state = update(jnp.zeros_like(theta), state, theta)
        estimates.append(estimate)
    return jnp.stack(estimates), block(state), update


def device_candidates(
    device_counts: list[int], args: argparse.Namespace
) -> tuple[dict[str, Candidate], dict[str, Any]]:
    """The PES update without a mesh ("none") and over meshes of the first D devices
    ("meshD"), each checked against "none"; timed candidates and the checks."""
    system = digits_system(args.horizon)
    theta = THETA0["digits"]
    zeros = jnp.zeros_like(theta)
    n, k = args.device_particles, args.k

    def timed(update, state):
        def call(state):
            return update(zeros, state, theta)[1]

        return sized(call, state, 1, args.budget)

    start = time.perf_counter()
    reference, state, update = run_updates(make_pes(system, n, k), theta, 3)
    candidates = {"none": timed(update, state)}
    info: dict[str, Any] = {"compile_none_s": time.perf_counter() - start}
    for d in device_counts:
        start = time.perf_counter()
        mesh = jax.make_mesh((d,), ("particles",), devices=jax.devices()[:d])
        estimates, state, update = run_updates(
            make_pes(system, n, k, mesh=mesh), theta, 3
        )
        a, b = np.asarray(estimates), np.asarray(reference)
        scale = float(np.max(np.abs(b)))
        sharded = all(
            len(leaf.sharding.device_set) == d
            and (d == 1 or not leaf.sharding.is_fully_replicated)
            for leaf in jax.tree.leaves(state.inner_state)
        )
        # Tolerance relative to the estimate's scale: with fewer particles per device
        # XLA may pick other matmul kernels (inner states move by ~1 ulp), and a
        # component that is a small difference of large L_i * xi_i terms carries
        # that rounding in absolute, not relative, terms.
        info[f"mesh{d}"] = {
            "equal": bool(np.allclose(a, b, rtol=1e-5, atol=1e-5 * scale)),
            "elementwise": bool(np.allclose(a, b, rtol=1e-5, atol=1e-6)),
            "bitwise": bool(np.array_equal(a, b)),
            "relative_diff": float(np.max(np.abs(a - b))) / scale,
            "sharded": sharded,
        }
        candidates[f"mesh{d}"] = timed(update, state)
        info[f"compile_mesh{d}_s"] = time.perf_counter() - start
    return candidates, info


def emit(message: dict[str, Any]) -> None:
    print(MESSAGE + json.dumps(message), flush=True)


def worker(args: argparse.Namespace) -> None:
    """One forced-host-device process: set up, then one sample per 'sample' line."""
    d = args.worker
    if jax.device_count() != d:
        raise SystemExit(
            f"worker expected {d} devices, jax has {jax.device_count()}: set "
            f"XLA_FLAGS={DEVICE_COUNT_FLAG}={d} before jax starts"
        )
    candidates, info = device_candidates([d], args)
    emit({"ready": True, "devices": d, **info})
    timer = Interleaved(candidates)
    for rep, line in enumerate(sys.stdin):
        if line.strip() != "sample":
            break
        emit(timer.sample(rep))


def child_env(devices: int | None) -> dict[str, str]:
    """This environment on the CPU, with `devices` forced host devices (None: one)."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith(DEVICE_COUNT_FLAG)
    ]
    if devices is not None:
        flags.append(f"{DEVICE_COUNT_FLAG}={devices}")
    return dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")


def child_command(args: argparse.Namespace, *extra: str) -> list[str]:
    """This script as a worker, with the settings the workers share."""
    return [
        sys.executable,
        os.path.abspath(__file__),
        *extra,
        "--device-particles",
        str(args.device_particles),
        "--k",
        str(args.k),
        "--horizon",
        str(args.horizon),
        "--budget",
        str(args.budget),
        "--process-calls",
        str(args.process_calls),
    ]


class Worker:
    """A child process of this script: on `d` forced host CPU devices, or (with
    `command` and `env`) any worker mode."""

    def __init__(
        self,
        d: int,
        args: argparse.Namespace,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        env = child_env(d) if env is None else env
        command = (
            child_command(args, "--worker", str(d)) if command is None else command
        )
        self.d = d
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )

    def receive(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(MESSAGE):
                return json.loads(line[len(MESSAGE) :])
        self.proc.wait()
        self.stderr.seek(0)
        raise RuntimeError(
            f"worker D={self.d} exited ({self.proc.returncode}):\n"
            + self.stderr.read()[-3000:]
        )

    def sample(self) -> dict[str, float]:
        self.proc.stdin.write("sample\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def forced_device_samples(
    args: argparse.Namespace,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Start one worker per D (in turn: set-up is not timed), then sample them in
    rotating order; samples keyed "noneD" and "meshD"."""
    workers: list[Worker] = []
    info: dict[str, Any] = {}
    samples: dict[str, list[float]] = {}
    try:
        for d in args.devices:
            workers.append(Worker(d, args))
            ready = workers[-1].receive()
            info[f"mesh{d}"] = ready[f"mesh{d}"]
            print(
                f"  worker D={d} ready (compile + check: "
                f"{ready['compile_none_s'] + ready[f'compile_mesh{d}_s']:.0f}s)",
                flush=True,
            )
        for rep in range(args.repeats):
            shift = rep % len(workers)
            for w in workers[shift:] + workers[:shift]:
                for name, seconds in w.sample().items():
                    key = "none" + str(w.d) if name == "none" else name
                    samples.setdefault(key, []).append(seconds)
    finally:
        for w in workers:
            w.close()
    return samples, info


def section_devices(args: argparse.Namespace, table: list[str]) -> None:
    n, k, horizon = args.device_particles, args.k, args.horizon
    cores = num_cores()
    real = args.real_devices
    if real:
        available = jax.device_count()
        devices = [d for d in args.devices if d <= available]
        kind = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    else:
        devices = args.devices
        kind = f"forced host CPU devices, {cores} cores"
    args.devices = devices
    bad = [d for d in devices if n % d]
    if bad:
        raise SystemExit(f"--device-particles {n} is not a multiple of D in {bad}")
    print(
        f"\n2. Devices: {DESCRIPTION['digits']}; N={n}, K={k}, T={horizon}, stagger; "
        f"{kind}; one jitted call per update (milliseconds)",
        flush=True,
    )
    started = time.perf_counter()
    if real:
        candidates, info = device_candidates(devices, args)
        samples = compare(candidates, args.repeats)
        for d in devices:
            samples[f"none{d}"] = samples["none"]
    else:
        samples, info = forced_device_samples(args)
    d0 = devices[0]
    head = (
        f"{'D':>3} | {'mesh':>8} {f'vs D={d0}':>8} {'speed-up':>8} | "
        f"{'mesh=None':>9} {'mesh/None':>9} | sharded estimate == mesh=None"
    )
    header(head)
    for d in devices:
        mesh, none = samples[f"mesh{d}"], samples[f"none{d}"]
        vs_first = paired_ratio(mesh, samples[f"mesh{d0}"])
        check = info[f"mesh{d}"]
        verdict = "yes" if check["equal"] else "NO"
        if check["bitwise"]:
            verdict += ", bitwise"
        else:
            verdict += f", diff {check['relative_diff']:.1e}"
            if not check["elementwise"]:
                verdict += " (elementwise: no)"
        if not check["sharded"]:
            verdict += " NOT SHARDED"
        print(
            f"{d:3d} | {ms(median(mesh))} {vs_first:8.3f} {1 / vs_first:8.2f} | "
            f"{ms(median(none)):>9} {paired_ratio(mesh, none):9.3f} | {verdict}",
            flush=True,
        )
        table.append(
            f"| devices | digits N={n} K={k} D={d} ({'real' if real else 'forced'}) "
            f"| time vs D={d0} {vs_first:.2f}; estimate equal: {verdict} |"
        )
    print(f"({time.perf_counter() - started:.0f}s, compile included)")
    note = (
        f"notes: 'vs D={d0}': median of paired ratios of the mesh update's time to\n"
        f"  D={d0}'s (< 1: faster); 'mesh/None': the sharded update against the\n"
        "  unsharded one (mesh=None) timed in the same process; the check runs 3\n"
        "  updates from init on both and compares the estimates: allclose with\n"
        "  rtol 1e-5, atol 1e-5 x max |estimate|; 'diff' = max |difference| /\n"
        "  max |estimate|; '(elementwise: no)': fails atol 1e-6 on a component that\n"
        "  is a small difference of large terms (fewer particles per device can\n"
        "  change XLA's matmul kernels and so the last bit of the inner states)."
    )
    if not real:
        note += (
            f"\n  Each D is a separate process with D forced host devices, kept alive\n"
            f"  and sampled in turn. Forced host devices are not hardware: this\n"
            f"  machine has {cores} cores, so D > {cores} devices share them (no\n"
            f"  speed-up possible beyond {cores}, and XLA's per-device thread pools\n"
            f"  compete). On a multi-accelerator host run with --real-devices."
        )
    print(note)


# ------------------------------------------------------------------ 2b. processes --


def process_worker(args: argparse.Namespace) -> None:
    """One of P processes (JAX's multi-controller runtime on 127.0.0.1): set up, check,
    then on each 'sample' line run the same fixed number of updates as its peers."""
    from jax.experimental import multihost_utils

    # (The runtime was joined at import: _join_runtime_if_worker.)
    mesh = jax.make_mesh(
        (jax.device_count(),), ("particles",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    system = digits_system(args.horizon)
    theta = THETA0["digits"]
    zeros = jnp.zeros_like(theta)
    start = time.perf_counter()
    tx = make_pes(system, args.device_particles, args.k, mesh=mesh)
    estimates, state, update = run_updates(tx, theta, 3)
    gathered = multihost_utils.process_allgather(estimates, tiled=True)
    ready = {"ready": True, "compile_s": time.perf_counter() - start}
    if jax.process_index() == 0:
        emit({**ready, "estimates": np.asarray(gathered).tolist()})
    for line in sys.stdin:
        if line.strip() != "sample":
            break
        start = time.perf_counter()
        for _ in range(args.process_calls):
            state = update(zeros, state, theta)[1]
        block(state)
        seconds = (time.perf_counter() - start) / args.process_calls
        if jax.process_index() == 0:
            emit({"update": seconds})


class ProcessGroup:
    """P child processes of this script forming one multi-controller JAX runtime."""

    def __init__(self, p: int, args: argparse.Namespace):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.p = p
        self.workers = [
            Worker(
                p,
                args,
                command=child_command(
                    args,
                    "--process-worker",
                    str(i),
                    "--num-processes",
                    str(p),
                    "--port",
                    str(port),
                ),
                env=child_env(None),
            )
            for i in range(p)
        ]

    def ready(self) -> dict[str, Any]:
        return self.workers[0].receive()

    def sample(self) -> float:
        for w in self.workers:
            w.proc.stdin.write("sample\n")
            w.proc.stdin.flush()
        return self.workers[0].receive()["update"]

    def close(self) -> None:
        for w in self.workers:
            w.close()


def section_processes(args: argparse.Namespace, table: list[str]) -> None:
    n, k, horizon = args.device_particles, args.k, args.horizon
    bad = [p for p in args.processes if n % p]
    if bad:
        raise SystemExit(f"--device-particles {n} is not a multiple of P in {bad}")
    print(
        f"\n2b. Processes: {DESCRIPTION['digits']}; N={n}, K={k}, T={horizon}, "
        f"stagger; P processes on 127.0.0.1 (one CPU device each, {num_cores()} "
        f"cores); {args.process_calls} updates per sample (milliseconds per update)",
        flush=True,
    )
    started = time.perf_counter()
    reference, _, _ = run_updates(
        make_pes(digits_system(horizon), n, k), THETA0["digits"], 3
    )
    reference = np.asarray(reference)
    groups: list[ProcessGroup] = []
    samples: dict[int, list[float]] = {}
    checks: dict[int, tuple[bool, float]] = {}
    try:
        for p in args.processes:
            groups.append(ProcessGroup(p, args))
            ready = groups[-1].ready()
            got = np.asarray(ready["estimates"])
            scale = float(np.max(np.abs(reference)))
            checks[p] = (
                bool(np.allclose(got, reference, rtol=1e-5, atol=1e-5 * scale)),
                float(np.max(np.abs(got - reference))) / scale,
            )
            print(f"  P={p} ready ({ready['compile_s']:.0f}s set-up)", flush=True)
        for rep in range(args.repeats):
            shift = rep % len(groups)
            for g in groups[shift:] + groups[:shift]:
                samples.setdefault(g.p, []).append(g.sample())
    finally:
        for g in groups:
            g.close()
    p0 = args.processes[0]
    header(f"{'P':>3} | {'update':>8} {f'vs P={p0}':>8} | estimate == single process")
    for p in args.processes:
        vs = paired_ratio(samples[p], samples[p0])
        equal, diff = checks[p]
        verdict = ("yes" if equal else "NO") + f", diff {diff:.1e}"
        print(f"{p:3d} | {ms(median(samples[p]))} {vs:8.3f} | {verdict}", flush=True)
        table.append(
            f"| processes | digits N={n} K={k} P={p} | time vs P={p0} {vs:.2f}; "
            f"estimate equal: {verdict} |"
        )
    print(
        f"({time.perf_counter() - started:.0f}s, set-up included)\nnotes: 'vs P={p0}': "
        f"median of paired ratios of the update's time to P={p0}'s at the same N (per\n"
        "  particle, the same ratio); 'diff' = max |difference| / max |estimate| of\n"
        "  3 updates against this process's mesh=None run. The processes share this\n"
        "  machine's cores and talk through gloo on 127.0.0.1: the figure shows what\n"
        "  the runtime costs, not a speed-up; across hosts each process brings its\n"
        "  own devices."
    )


# ------------------------------------------------------------------ 3. memory ------


def pes_memory(n: int, k: int, horizon: int) -> dict[str, int]:
    system = digits_system(horizon)
    theta = THETA0["digits"]
    tx = make_pes(system, n, k)
    lowered = jax.jit(tx.update).lower(jnp.zeros_like(theta), tx.init(theta), theta)
    return memory_of(lowered.compile())


def bptt_memory(horizon: int) -> dict[str, int]:
    """`jax.grad` of one trajectory's summed episode loss (full unroll)."""
    system = digits_system(horizon)

    def episode_loss(theta):
        return jnp.sum(optax_pes.unroll(system, theta, jax.random.key(0)))

    return memory_of(jax.jit(jax.grad(episode_loss)).lower(THETA0["digits"]).compile())


def section_memory(args: argparse.Namespace, table: list[str]) -> None:
    n = args.device_particles
    horizons = sorted(args.horizons)
    print(
        f"\n3. Memory vs horizon: {DESCRIPTION['digits']}; PES N={n}, stagger; "
        "XLA memory_analysis of the compiled program (MiB)",
        flush=True,
    )
    started = time.perf_counter()
    pes = {
        (k, t): pes_memory(n, k, t)
        for k in args.memory_truncations
        for t in horizons
        if k <= t
    }
    bptt = {t: bptt_memory(t) for t in sorted(args.bptt_horizons)}
    ks = list(args.memory_truncations)
    head = f"{'T':>7} | " + " | ".join(
        f"{f'PES K={k} total':>15} {'temp':>9}" for k in ks
    )
    head += f" | {'BPTT total':>10} {'temp':>9} {'KiB/step':>8}"
    header(head)
    for t in sorted(set(horizons) | set(bptt)):
        row = f"{t:7d} | "
        row += " | ".join(
            f"{mib(pes[k, t]['total']):>15} {mib(pes[k, t]['temp'])}"
            if (k, t) in pes
            else f"{'-':>15} {'-':>9}"
            for k in ks
        )
        if t in bptt:
            b = bptt[t]
            row += (
                f" | {mib(b['total']):>10} {mib(b['temp'])} {b['temp'] / t / 1024:8.1f}"
            )
        else:
            row += f" | {'-':>10} {'-':>9} {'-':>8}"
        print(row)
    print(f"({time.perf_counter() - started:.0f}s, compile included)")
    t0, t1 = horizons[0], horizons[-1]
    for k in ks:
        if (k, t0) in pes and (k, t1) in pes:
            r = pes[k, t1]["total"] / pes[k, t0]["total"]
            print(f"  PES K={k}: total T={t1} / T={t0} = {r:.3f}")
            table.append(
                f"| memory | digits PES N={n} K={k} | total T={t1} / T={t0} {r:.3f} |"
            )
    if len(ks) > 1 and all((k, t1) in pes for k in ks):
        r = pes[ks[-1], t1]["total"] / pes[ks[0], t1]["total"]
        print(f"  PES T={t1}: total K={ks[-1]} / K={ks[0]} = {r:.3f}")
        table.append(
            f"| memory | digits PES N={n} T={t1} | total K={ks[-1]} / K={ks[0]} "
            f"{r:.3f} |"
        )
    if len(bptt) > 1:
        b0, b1 = min(bptt), max(bptt)
        r = bptt[b1]["total"] / bptt[b0]["total"]
        print(f"  BPTT: total T={b1} / T={b0} = {r:.1f} (T ratio {b1 / b0:.0f})")
        table.append(f"| memory | digits BPTT | total T={b1} / T={b0} {r:.1f} |")
    print(
        "notes: total = temp + arguments + outputs of the compiled program. PES keeps\n"
        f"  N inner states (here {n} x (MLP weights + momentum)) and K x N per-step\n"
        "  keys, whatever T is. BPTT is jax.grad of jnp.sum(optax_pes.unroll(...))\n"
        "  for ONE trajectory: the scan stores every step's residuals (temp grows\n"
        "  linearly with T). Only compiled, never run: nothing is allocated."
    )


# ------------------------------------------------------------------ main -----------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 3 min)")
    add_sampling_arguments(parser)
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["particles", "devices", "memory"],
        choices=["particles", "devices", "processes", "memory"],
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        default=None,
        choices=SYSTEM_NAMES,
        help="section 1's systems (default: digits infl; digits with --quick)",
    )
    parser.add_argument(
        "--particles", type=int, nargs="+", default=None, help="section 1's N values"
    )
    parser.add_argument("--k", type=int, default=10, help="K of sections 1 and 2")
    parser.add_argument(
        "--horizon", type=int, default=1000, help="T of sections 1 and 2"
    )
    parser.add_argument(
        "--devices", type=int, nargs="+", default=None, help="section 2's D values"
    )
    parser.add_argument(
        "--device-particles",
        type=int,
        default=None,
        help="N of sections 2 and 3 (a multiple of every D)",
    )
    parser.add_argument(
        "--real-devices",
        action="store_true",
        help="section 2 on jax.devices() in this process, no forced host devices",
    )
    parser.add_argument(
        "--horizons", type=int, nargs="+", default=None, help="section 3's T values"
    )
    parser.add_argument("--memory-truncations", type=int, nargs="+", default=None)
    parser.add_argument(
        "--bptt-horizons",
        type=int,
        nargs="+",
        default=None,
        help="T values of the full-unroll jax.grad in section 3",
    )
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=None,
        help="section 2b's P values (giving it adds the section; default 1 2)",
    )
    parser.add_argument(
        "--process-calls", type=int, default=5, help="updates per sample in 2b"
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--process-worker", type=int, default=None, help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--num-processes", type=int, default=None, help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.processes is not None and "processes" not in args.sections:
        args.sections.append("processes")
    quick = args.quick
    sampling_defaults(args, quick)
    defaults = {
        "systems": ["digits"] if quick else ["digits", "infl"],
        "particles": [8, 64] if quick else [8, 16, 32, 64, 128, 256],
        "devices": [1, 2] if quick else [1, 2, 4, 8],
        "processes": [1, 2],
        "device_particles": 16 if quick else 64,
        "horizons": [100, 1000, 100_000] if quick else [100, 1000, 10_000, 100_000],
        "memory_truncations": [10] if quick else [10, 100],
        "bptt_horizons": [100, 1000] if quick else [100, 1000, 10_000, 100_000],
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker(args)
        return
    if args.process_worker is not None:
        process_worker(args)
        return
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, backend "
        f"{jax.default_backend()}, {num_cores()} cores; repeats={args.repeats} "
        f"(median), ~{args.budget}s per sample"
    )
    table = ["| section | setting | result |", "| --- | --- | --- |"]
    started = time.perf_counter()
    if "particles" in args.sections:
        section_particles(args, table)
    if "devices" in args.sections:
        section_devices(args, table)
    if "processes" in args.sections:
        section_processes(args, table)
    if "memory" in args.sections:
        section_memory(args, table)
    print(f"\n(total {time.perf_counter() - started:.0f}s)\n\nSummary:")
    print("\n".join(table))


if __name__ == "__main__":
    main()
