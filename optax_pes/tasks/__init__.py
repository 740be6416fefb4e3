"""Ready `optax_pes.UnrolledSystem`s: the PES paper's problems, model training and
control."""

from optax_pes.tasks._control import (
    ControlState as ControlState,
    GymnaxEnv as GymnaxEnv,
    GymnaxState as GymnaxState,
    MJXSwimmer as MJXSwimmer,
    SwimmerState as SwimmerState,
    control_system as control_system,
    from_gymnax as from_gymnax,
)
from optax_pes.tasks._hyperparameters import (
    lr_schedule as lr_schedule,
    per_layer_sgd as per_layer_sgd,
)
from optax_pes.tasks._influence_balancing import (
    influence_balancing as influence_balancing,
    influence_balancing_optimum as influence_balancing_optimum,
)
from optax_pes.tasks._learned_optimizer import (
    LearnedOptimizerState as LearnedOptimizerState,
    mlp_learned_optimizer as mlp_learned_optimizer,
)
from optax_pes.tasks._linear_quadratic import linear_quadratic as linear_quadratic
from optax_pes.tasks._policies import (
    linear_policy as linear_policy,
    mlp_policy as mlp_policy,
    observation_statistics as observation_statistics,
)
from optax_pes.tasks._toy_regression import (
    toy_regression as toy_regression,
    toy_regression_grid as toy_regression_grid,
)
from optax_pes.tasks._training import (
    TrainingState as TrainingState,
    accuracy_error as accuracy_error,
    training_system as training_system,
)
