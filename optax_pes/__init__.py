"""optax_pes: PES-family hypergradients as optax transformations; SHINE DEQ layers."""

from optax_pes import models as models, tasks as tasks
from optax_pes._es._ask_tell import (
    Ask as Ask,
    AskTell as AskTell,
    ask_tell as ask_tell,
)
from optax_pes._es._nres import NRESNoise as NRESNoise, nres as nres
from optax_pes._es._pes import PESNoise as PESNoise, full_es as full_es, pes as pes
from optax_pes._es._state import (
    Diagnostics as Diagnostics,
    EpisodeTotals as EpisodeTotals,
    EstimatorState as EstimatorState,
    NoNoise as NoNoise,
)
from optax_pes._es._system import (
    InitFn as InitFn,
    StepFn as StepFn,
    UnrolledSystem as UnrolledSystem,
    unroll as unroll,
)
from optax_pes._es._tbptt import tbptt as tbptt
from optax_pes._es._truncated_es import truncated_es as truncated_es
from optax_pes._implicit._adjoints import (
    AbstractAdjoint as AbstractAdjoint,
    Implicit as Implicit,
    JacobianFree as JacobianFree,
    Phantom as Phantom,
    Shine as Shine,
)
from optax_pes._implicit._bilevel import (
    BilevelState as BilevelState,
    shine_bilevel as shine_bilevel,
)
from optax_pes._implicit._deq import DEQ as DEQ
from optax_pes._implicit._solvers import (
    AbstractSolver as AbstractSolver,
    Anderson as Anderson,
    Broyden as Broyden,
    FixedPoint as FixedPoint,
    LowRankInverse as LowRankInverse,
    SolveInfo as SolveInfo,
)
from optax_pes._loop import History as History, outer_loop as outer_loop
from optax_pes._serialisation import (
    tree_deserialise_leaves as tree_deserialise_leaves,
    tree_serialise_leaves as tree_serialise_leaves,
)

__version__ = "0.1.0"
