"""The problems the benchmark scripts measure on.

- Unrolled systems for PES (`pes_overhead.py`, `scaling.py`): `SYSTEMS[name](horizon)`
  and `THETA0[name]`, with `bare_window` (the vmapped K-step unroll a PES window
  wraps, without the estimator) and `perturbed` (the thetas it evaluates).
- The DEQ layer `tanh(W z + U x + b)` of `deq_backward.py`.
- The l2-regularised logistic regression on breast-cancer of `bilevel.py`
  (`logistic_regression()`, float64: enable x64 before calling it).

Imported as `import _problems` by the scripts next to it. Data sets are loaded on
first use, not on import.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_pes

# ------------------------------------------------------------------ PES systems ----


def mlp_system(
    horizon: int, in_dim: int = 8, hidden: int = 64, batch: int = 64
) -> optax_pes.UnrolledSystem:
    """Inner problem: SGD on a 2-layer tanh MLP, synthetic regression, theta = log lr.

    Each step draws a fresh batch from its key (so antithetic pairs share batches),
    takes one SGD step at learning rate exp(theta[0]) and returns the batch's loss.
    """
    rng = np.random.default_rng(1234)
    t1 = jnp.asarray(rng.normal(size=(in_dim, 16)) / np.sqrt(in_dim), jnp.float32)
    t2 = jnp.asarray(rng.normal(size=(16, 1)) / 4.0, jnp.float32)

    def init(theta, key):
        k1, k2 = jax.random.split(key)
        return {
            "w1": jax.random.normal(k1, (in_dim, hidden)) / np.sqrt(in_dim),
            "b1": jnp.zeros((hidden,)),
            "w2": jax.random.normal(k2, (hidden, 1)) / np.sqrt(hidden),
            "b2": jnp.zeros((1,)),
        }

    def mse(params, x, y):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)

    def step(theta, params, key):
        kx, kn = jax.random.split(key)
        x = jax.random.normal(kx, (batch, in_dim))
        y = jnp.sin(x @ t1) @ t2 + 0.1 * jax.random.normal(kn, (batch, 1))
        loss, grads = jax.value_and_grad(mse)(params, x, y)
        lr = jnp.exp(jnp.reshape(theta, ()))
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return params, loss

    return optax_pes.UnrolledSystem(init=init, step=step, horizon=horizon)


@functools.cache
def digits_data() -> tuple[jax.Array, jax.Array]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    return x, jnp.asarray(digits.target, jnp.int32)


def digits_system(horizon: int, batch: int = 32) -> optax_pes.UnrolledSystem:
    """SGD (momentum 0.9, `lr_schedule(theta)`) on a 64-32-10 MLP, digits."""

    def make(key):
        return eqx.nn.MLP(64, 10, 32, 1, activation=jax.nn.relu, key=key)

    def loss(model, x, y):
        logits = jax.vmap(model)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def optimizer(theta):
        return optax.sgd(optax_pes.tasks.lr_schedule(theta), momentum=0.9)

    return optax_pes.tasks.training_system(
        make(jax.random.key(0)),
        loss,
        optimizer,
        digits_data(),
        horizon=horizon,
        batch_size=batch,
        model_init=make,
    )


def influence_balancing_system(horizon: int) -> optax_pes.UnrolledSystem:
    """The PES paper's influence-balancing system (n = 23)."""
    return optax_pes.tasks.influence_balancing(horizon=horizon)


SYSTEMS: dict[str, Callable[[int], optax_pes.UnrolledSystem]] = {
    "mlp": mlp_system,
    "digits": digits_system,
    "infl": influence_balancing_system,
}
THETA0 = {
    "mlp": jnp.array([np.log(0.05)], jnp.float32),
    "digits": jnp.array([np.log(0.05), np.log(1.0)], jnp.float32),
    "infl": jnp.array([0.5], jnp.float32),
}


def bare_window(system: optax_pes.UnrolledSystem, n: int, k: int):
    """One window of the bare unroll: (thetas, inner, key) -> (inner, key, losses)."""
    vstep = jax.vmap(system.step)

    def window(thetas, inner, key):
        key, sub = jax.random.split(key)
        keys = jax.random.split(sub, (k, n))

        def body(carry, ks):
            state, total = carry
            state, loss = vstep(thetas, state, ks)
            return (state, total + loss), None

        (inner, total), _ = jax.lax.scan(body, (inner, jnp.zeros(n)), keys)
        return inner, key, total

    return window


def perturbed(theta: jax.Array, n: int, sigma: float) -> jax.Array:
    """N antithetic perturbations of theta (what a PES window evaluates)."""
    normal = jax.random.normal(jax.random.key(1), (n // 2,) + theta.shape)
    return jnp.concatenate([theta + sigma * normal, theta - sigma * normal])


# ------------------------------------------------------------------ DEQ layer ------


class Layer(eqx.Module):
    """f(z, x) = tanh(W z + U x + b)."""

    w: jax.Array
    u: jax.Array
    b: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.w @ z + self.u @ x + self.b)


def make_layer(d: int, rho: float, key) -> Layer:
    """A random layer with ||W||_2 = rho."""
    kw, ku, kb = jax.random.split(key, 3)
    w = jax.random.normal(kw, (d, d)) / np.sqrt(d)
    w = rho * w / jnp.linalg.norm(w, ord=2)
    u = jax.random.normal(ku, (d, d)) / np.sqrt(d)
    b = 0.1 * jax.random.normal(kb, (d,))
    return Layer(w, u, b)


class ConvLayer(eqx.Module):
    """f(z, x) = tanh(gain * layernorm(conv3x3(z)) + x), one (H, W, C) sample, NHWC."""

    kernel: jax.Array  # (3, 3, C, C), HWIO
    gain: float = eqx.field(static=True)

    def __call__(self, z, x):
        y = jax.lax.conv_general_dilated(
            z[None],
            self.kernel,
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )[0]
        y = (y - y.mean()) / (y.std() + 1e-5)
        return jnp.tanh(self.gain * y + x)


def make_conv_layer(channels: int, gain: float, key) -> ConvLayer:
    """A random 3x3 convolutional DEQ layer on (H, W, channels) states."""
    kernel = jax.random.normal(key, (3, 3, channels, channels)) / np.sqrt(9 * channels)
    return ConvLayer(kernel, gain)


# ------------------------------------------------------------------ bi-level -------


@dataclasses.dataclass(frozen=True)
class LogisticRegression:
    """l2-regularised logistic regression, lambda = log of the l2 weights.

    inner loss `mean log-loss(train) + 0.5 sum(exp(lam) w^2)`, outer loss
    `mean log-loss(held out)`; `lam` scalar or one per feature.
    """

    x_train: jax.Array
    y_train: jax.Array
    x_val: jax.Array
    y_val: jax.Array
    inner_loss: Callable[[jax.Array, jax.Array], jax.Array]
    outer_loss: Callable[[jax.Array, jax.Array], jax.Array]
    newton_solution: Callable[[jax.Array], jax.Array]  # w*(lam), jitted
    held_out: Callable[[jax.Array], jax.Array]  # outer loss at w*(lam), jitted
    exact_hypergradient: Callable[[jax.Array], jax.Array]  # dense, jitted

    @property
    def dim(self) -> int:
        return self.x_train.shape[1]

    def grid_minimum(self) -> tuple[float, float]:
        """(held-out loss, lambda) minimising over 241 scalar lambdas on [-10, 2]."""
        lams = jnp.linspace(-10.0, 2.0, 241)
        losses = jax.vmap(self.held_out)(lams)
        i = int(jnp.argmin(losses))
        return float(losses[i]), float(lams[i])


def breast_cancer_split():
    """Half for training, half held out (shuffled with seed 0, standardised with the
    training half's statistics), as in `tests/test_bilevel.py`."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(y))
    x, y = x[order], y[order].astype(np.float64)
    n = len(y) // 2
    x = (x - x[:n].mean(0)) / x[:n].std(0)
    return (jnp.asarray(x[:n]), jnp.asarray(y[:n])), (
        jnp.asarray(x[n:]),
        jnp.asarray(y[n:]),
    )


@functools.cache
def logistic_regression() -> LogisticRegression:
    """The bi-level problem on breast-cancer (30 weights), in float64."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError("logistic_regression() is float64: enable jax_enable_x64")
    (x_train, y_train), (x_val, y_val) = breast_cancer_split()
    dim = x_train.shape[1]

    def log_loss(w, x, y):
        z = x @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    def inner_loss(w, lam):
        return log_loss(w, x_train, y_train) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)

    def outer_loss(w, lam):
        return log_loss(w, x_val, y_val)

    @jax.jit
    def newton_solution(lam):
        """w*(lam) by 30 Newton steps from 0 (no line search)."""

        def step(w, _):
            hess = jax.hessian(inner_loss)(w, lam)
            return w - jnp.linalg.solve(hess, jax.grad(inner_loss)(w, lam)), None

        return jax.lax.scan(step, jnp.zeros(dim), None, length=30)[0]

    @jax.jit
    def held_out(lam):
        return outer_loss(newton_solution(lam), lam)

    @jax.jit
    def exact_hypergradient(lam):
        """Dense reference: grad_h g - (d_h grad_w f)^T H^-1 grad_w g at w*."""
        w = newton_solution(lam)
        hess = jax.hessian(inner_loss)(w, lam)
        v = jnp.linalg.solve(hess, jax.grad(outer_loss)(w, lam))
        mixed = jax.jacobian(lambda h: jax.grad(inner_loss)(w, h))(lam)
        return jax.grad(outer_loss, argnums=1)(w, lam) - jnp.tensordot(v, mixed, axes=1)

    return LogisticRegression(
        x_train,
        y_train,
        x_val,
        y_val,
        inner_loss,
        outer_loss,
        newton_solution,
        held_out,
        exact_hypergradient,
    )


@dataclasses.dataclass(frozen=True)
class HighDimLogisticRegression:
    """The SHINE paper's regime: more features than samples (generated, no download).

    `make_classification(n_samples, n_features, n_informative=50, flip_y=0.05,
    random_state=0)`, first half for training, second half held out, float64. The
    data travel as the `data=(x_train, y_train, x_val, y_val, x_train**2)` keyword
    argument (`shine_bilevel(..., loss_kwargs=("data",))`), not as closed-over
    constants: XLA would constant-fold products with a 2000 x 20000 matrix at every
    compile. (The squares are for `hessian_diag`: squaring the matrix at every call
    costs more than the two-loop recursion.)
    """

    data: tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]

    @property
    def dim(self) -> int:
        return self.data[0].shape[1]

    @staticmethod
    def inner_loss(w, lam, *, data):
        x, y = data[0], data[1]
        z = x @ w
        reg = 0.5 * jnp.sum(jnp.exp(lam) * w**2)
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + reg

    @staticmethod
    def outer_loss(w, lam, *, data):
        x, y = data[2], data[3]
        z = x @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    @staticmethod
    def hessian_diag(w, lam, *, data):
        """The exact diagonal of the inner Hessian (`shine_bilevel`'s
        `hessian_diag`): (x**2)^T p (1 - p) / n + exp(lam)."""
        x, x_squared = data[0], data[4]
        p = jax.nn.sigmoid(x @ w)
        return (p * (1 - p)) @ x_squared / x.shape[0] + jnp.exp(lam)

    def reference(self, lam, w0=None, inner_tol=1e-10, cg_tol=1e-12):
        """(exact hypergradient, tight w*): L-BFGS to `inner_tol` from `w0` (zeros),
        then CG to `cg_tol` on the Hessian there."""
        tx, update = _reference_update(self.dim, inner_tol, cg_tol)
        state = tx.init(lam)
        if w0 is not None:
            state = state._replace(inner_params=w0)
        grad, state = update(jnp.zeros_like(lam), state, lam, self.data)
        return grad, state.inner_params

    def held_out(self, lam, w0=None) -> float:
        """The outer loss at a tight inner solution (1e-8) for `lam`."""
        _, w = self.reference(lam, w0, inner_tol=1e-8, cg_tol=1e-2)
        return float(self.outer_loss(w, lam, data=self.data))


@functools.cache
def _reference_update(dim: int, inner_tol: float, cg_tol: float):
    tx = optax_pes.shine_bilevel(
        HighDimLogisticRegression.inner_loss,
        HighDimLogisticRegression.outer_loss,
        inner_init=jnp.zeros(dim),
        method="implicit",
        inner_tol=inner_tol,
        inner_max_steps=5000,
        implicit_tol=cg_tol,
        implicit_max_steps=5000,
        loss_kwargs=("data",),
    )
    return tx, jax.jit(lambda u, s, lam, data: tx.update(u, s, lam, data=data))


@functools.cache
def highdim_logistic_regression(
    n_samples: int = 4000, n_features: int = 20000
) -> HighDimLogisticRegression:
    """The issue-12 problem (float64: enable jax_enable_x64 before calling it)."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError("highdim_logistic_regression() is float64: enable x64")
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples, n_features, n_informative=50, flip_y=0.05, random_state=0
    )
    n = n_samples // 2
    y = y.astype(np.float64)
    data = tuple(jnp.asarray(a) for a in (x[:n], y[:n], x[n:], y[n:], x[:n] ** 2))
    return HighDimLogisticRegression(data)
