"""optax_pes: PES-family hypergradients as optax transformations; SHINE DEQ layers."""

from optax_pes import tasks as tasks
from optax_pes._adjoints import (
    AbstractAdjoint as AbstractAdjoint,
    Implicit as Implicit,
    JacobianFree as JacobianFree,
    Phantom as Phantom,
    Shine as Shine,
)
from optax_pes._bilevel import (
    BilevelState as BilevelState,
    shine_bilevel as shine_bilevel,
)
from optax_pes._deq import DEQ as DEQ
from optax_pes._estimator import (
    Diagnostics as Diagnostics,
    EstimatorState as EstimatorState,
)
from optax_pes._nres import nres as nres
from optax_pes._pes import full_es as full_es, pes as pes
from optax_pes._serialisation import (
    tree_deserialise_leaves as tree_deserialise_leaves,
    tree_serialise_leaves as tree_serialise_leaves,
)
from optax_pes._solvers import (
    AbstractSolver as AbstractSolver,
    Anderson as Anderson,
    Broyden as Broyden,
    FixedPoint as FixedPoint,
    LowRankInverse as LowRankInverse,
    SolveInfo as SolveInfo,
)
from optax_pes._system import UnrolledSystem as UnrolledSystem, unroll as unroll
from optax_pes._tbptt import tbptt as tbptt
from optax_pes._truncated_es import truncated_es as truncated_es

__version__ = "0.1.0"
