"""hydraopt_jax: shrink a collection of LoRA adapters with shared and task-specific factors.

HydraOpt (Ceritli et al., EMNLP 2025) in pure-functional, factored JAX.
"""

from ._xla_flags import apply_cpu_workarounds as _apply_cpu_workarounds

_apply_cpu_workarounds()  # before any computation: see _xla_flags.py

from . import baselines as baselines
from . import io as io
from ._loss import dense_loss_reference as dense_loss_reference
from ._loss import task_weights as task_weights
from ._merge import merge as merge
from ._merge import merge_adapters as merge_adapters
from ._plan import SharingPlan as SharingPlan
from ._planner import plan_budget as plan_budget
from ._solution import RESULTS as RESULTS
from ._solution import Solution as Solution

__version__ = "0.1.0"
