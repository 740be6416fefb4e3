"""The implicit half: fixed-point solvers, DEQ adjoints (SHINE) and bi-level SHINE.

`_flat` (a layer on flat vectors, used forward and backward), `_solvers` (forward:
Broyden, Anderson, fixed point), `_adjoints` (backward: Shine, Implicit, JacobianFree,
Phantom), `_deq` (the Equinox layer joining them), `_lbfgs` (optax's L-BFGS memory as
SHINE's inverse Hessian) and `_bilevel` (`shine_bilevel` and its methods).
"""
