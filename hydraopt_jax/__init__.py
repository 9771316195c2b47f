"""hydraopt_jax: shrink a collection of LoRA adapters with shared and task-specific factors.

HydraOpt (Ceritli et al., EMNLP 2025) in pure-functional, factored JAX.

Layers (imports point down): the numerical core (`_plan`, `_loss`, `_solution`, `_solve`,
`_merge`, `_solvers/`) imports no I/O; the library (`io/`, `planner/`, `baselines/`,
`_stream`, `serve/`) builds on it; the `hydraopt` command (`cli/`) only calls the library.
"""

from ._xla_flags import apply_cpu_workarounds as _apply_cpu_workarounds

_apply_cpu_workarounds()  # before any computation: see _xla_flags.py

from . import baselines as baselines
from . import io as io
from . import planner as planner
from . import serve as serve
from ._loss import dense_loss_reference as dense_loss_reference
from ._loss import task_weights as task_weights
from ._merge import SolverError as SolverError
from ._merge import merge as merge
from ._merge import merge_adapters as merge_adapters
from ._plan import SharingPlan as SharingPlan
from ._similarity import basis_overlap as basis_overlap
from ._similarity import orthonormal_basis as orthonormal_basis
from ._similarity import subspace_overlap as subspace_overlap
from ._solution import RESULTS as RESULTS
from ._solution import Solution as Solution
from ._solution import task_relative_errors as task_relative_errors
from ._stream import merge_collection as merge_collection
from .planner import plan_budget as plan_budget

__version__ = "0.1.0"
