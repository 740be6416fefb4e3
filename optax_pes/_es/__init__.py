"""The estimator half: unrolled systems, the window engine and the ES-family policies.

`_system` (what is differentiated), `_window` (the engine: K inner steps of every
particle), `_state` (the transformation's state), `_estimator` (the one factory every
estimator is a policy of), then one module per estimator.
"""
