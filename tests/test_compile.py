"""`optax_pes._compile.SharedJit`: what eager calls of the loops run as."""

import dataclasses
import gc
import warnings
import weakref

import jax.numpy as jnp
import numpy as np
import pytest

import optax_pes
from optax_pes import _compile
from optax_pes._compile import SharedJit, static_key


def test_static_leaves_are_keyed_with_their_type():
    # Equal in Python, but they trace to different programs.
    keys = {static_key(x) for x in (1, 1.0, True, 0.0, -0.0)}
    assert len(keys) == 5
    assert static_key(float("nan")) == static_key(float("nan"))
    assert static_key([object()]) is not None
    assert static_key([{}]) is not None  # an empty dict is a pytree node
    assert static_key([bytearray(b"x")]) is None  # unhashable


def test_one_program_per_static_structure():
    traces = []

    def fn(x, scale):
        traces.append(None)
        return x * scale

    shared = SharedJit(fn)
    for _ in range(3):
        np.testing.assert_allclose(shared(jnp.ones(2), 2.0), [2.0, 2.0])
    assert len(traces) == 1
    # -0.0 is another program, not the one of 0.0.
    assert np.signbit(shared(jnp.ones(2), -0.0)).all()
    assert not np.signbit(shared(jnp.ones(2), 0.0)).any()
    assert len(traces) == 3
    # A NumPy scalar is static, as it is op by op: usable as a slice bound.
    np.testing.assert_allclose(
        SharedJit(lambda x, n: x[:n])(jnp.arange(4.0), np.int64(2)), [0.0, 1.0]
    )


def test_unhashable_static_arguments_run_as_they_are():
    @dataclasses.dataclass
    class Scale:  # a dataclass with eq is unhashable
        value: float

    shared = SharedJit(lambda x, s: x * s.value)
    np.testing.assert_allclose(shared(jnp.ones(2), Scale(3.0)), [3.0, 3.0])


def test_programs_are_bounded_and_let_their_data_go():
    """A program's key holds what it names alive (a loss closing over its data):
    the cache keeps the 16 most recent."""

    class Data:
        def __init__(self, value):
            self.value = value

    shared = SharedJit(lambda x, f: f(x))
    refs = []
    for i in range(20):
        data = Data(float(i))
        refs.append(weakref.ref(data))
        shared(jnp.ones(()), lambda x, data=data: x * data.value)
        del data
    gc.collect()
    alive = [r() is not None for r in refs]
    assert not any(alive[:4]) and all(alive[4:])


def test_functions_closing_over_tracers_are_not_kept():
    import functools

    import jax

    from optax_pes._compile import captures_tracer

    shared = SharedJit(lambda x, f: f(x))

    class Scale:  # a callable object holding the traced array
        def __init__(self, w):
            self.w = w

        def __call__(self, x):
            return x * self.w

    def loss(w):
        assert captures_tracer([lambda x: x * w])
        assert captures_tracer([functools.partial(lambda w, x: x * w, w)])
        assert captures_tracer([lambda x, w=w: x * w])
        assert captures_tracer([Scale(w), Scale(w).__call__])
        nested = lambda: lambda: lambda: lambda: lambda: w  # noqa: E731
        assert captures_tracer([nested()()()()])
        return shared(jnp.ones(()), lambda x: x * w) + shared(jnp.ones(()), Scale(w))

    np.testing.assert_allclose(jax.jit(jax.grad(loss))(2.0), 2.0)
    assert len(shared._programs) == 0
    assert not captures_tracer([lambda x: x * 2.0, np.add, len, Scale(2.0)])

    class Odd:  # attributes that raise, a closure that is not a tuple
        __closure__ = 5

        @property
        def __defaults__(self):
            raise RuntimeError

    assert not captures_tracer([Odd()])


def test_a_compile_near_the_memory_mapping_limit_warns(monkeypatch):
    # XLA:CPU aborts a compile inside LLVM, naming nothing, once the process holds
    # vm.max_map_count memory mappings; a sweep that builds new transformations
    # (examples/swimmer.py over three seeds) got there. Warn before it does.
    counts = [(60_000, 65_530)]
    monkeypatch.setattr(_compile, "memory_mappings", lambda: counts[0])
    shared = SharedJit(lambda x, n: x * n)
    with pytest.warns(RuntimeWarning, match=r"60000 of the 65530 .*clear_caches") as w:
        shared(jnp.ones(2), 2)
    assert [r.filename for r in w] == [__file__]  # the user's line, not the cache's
    counts[0] = (1_000, 65_530)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shared(jnp.ones(2), 3)  # a new program, far from the limit: no warning
    counts[0] = None  # off Linux: nothing to read
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shared(jnp.ones(2), 4)


def test_memory_mappings_reads_this_process():
    counts = _compile.memory_mappings()
    if counts is None:
        pytest.skip("no /proc: not Linux")
    held, allowed = counts
    assert 0 < held < allowed


def test_an_eager_update_near_the_limit_warns_at_the_users_line(monkeypatch):
    # The estimators' eager program is built several calls deep (update_fn, the
    # cache): the warning names the line that called `tx.update`.
    monkeypatch.setattr(_compile, "memory_mappings", lambda: (60_000, 65_530))
    system = optax_pes.UnrolledSystem(
        init=lambda theta, key: jnp.zeros(()),
        step=lambda theta, s, key: (s + 1.0, jnp.sum(theta**2) + 0.0 * s),
        horizon=7,
    )
    tx = optax_pes.pes(system, num_particles=6, sigma=0.1, truncation_length=5, key=0)
    theta = jnp.array([0.5, 0.25, 0.125])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = tx.init(theta)
    with pytest.warns(RuntimeWarning, match="clear_caches") as record:
        tx.update(jnp.zeros(3), state, theta)
    assert [r.filename for r in record] == [__file__]
