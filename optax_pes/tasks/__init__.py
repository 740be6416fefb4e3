"""The PES paper's problems as ready `optax_pes.UnrolledSystem`s."""

from optax_pes.tasks._influence_balancing import (
    influence_balancing as influence_balancing,
    influence_balancing_optimum as influence_balancing_optimum,
)
from optax_pes.tasks._linear_quadratic import linear_quadratic as linear_quadratic
from optax_pes.tasks._toy_regression import (
    toy_regression as toy_regression,
    toy_regression_grid as toy_regression_grid,
)
