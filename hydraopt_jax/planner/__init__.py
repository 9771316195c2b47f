"""The planner: per-module sharing plans and ranks under one global storage budget.

`plan_budget(collection, budget=0.3)` chooses, for every module, which side is shared (A,
B, both = one merged adapter, or neither = each task kept, possibly at a lower rank), how
tasks are grouped (all tasks together, by a task attribute such as application or language,
or task-specific) and the shared rank `k`, so that the total reconstruction loss summed over
modules is lowest while the stored parameters stay within `budget` times the original
adapters' parameters.

**Candidates.** Only plans with a closed form are considered: an A-grouping and a
B-grouping where one nests inside the other (the shared-A family when every B-group lies in
one A-group, the shared-B family otherwise). Groupings are `all`, one per task attribute,
and `task`. Ranks are multiples of each module's (largest) LoRA rank, by default
`r/8, r/4, r/2, r, 3r/2, 2r, 3r, 4r` (at least 1), capped at `min(d_in, d_out)`. The low
ranks matter at small budgets: a task kept on its own at rank `r/4` often fits better than
any sharing at the same storage.

**Evaluation, for every rank at once.** For a shared-A-family plan with A-groups `g` and
B-groups `j` (each inside one `g`), `M_j = sum_{t in j} w_t dW_t / W_j`, the optimum of
`sum_t w_t ||dW_t - Bh_j Ah_g||^2` at rank `k` is (see `_solvers/exact.py`)

    L(k) = sum_t w_t ||dW_t||^2 - sum_g sum_{i <= k} lambda_{g,i}

where `lambda_{g,i}` are the eigenvalues of `sum_{j in g} W_j M_j^T M_j`. Those are the
eigenvalues of the small `n_g r x n_g r` matrix `F_g^T P_g F_g` (`D_g = F_g F_g^T`), with
`P = [A_s A_t^T]` (the A Gram of the module, `C`-weighted under an activation covariance) and
`D_g = blockdiag_j [w_s w_t B_s^T B_t / W_j]`. So two Grams of size `T r x T r` per module
give every candidate's loss at every rank from one symmetric eigendecomposition per group:
no `d_out x d_in` matrix, no solver run and no compilation per candidate. The shared-B
family is the same with the roles of the two Grams swapped (the transposed problem).
`tests/test_planner.py` checks these losses against `merge`'s exact solver.

**Ranks per task** (`per_task_ranks=True`, `hydraopt plan --per-task-ranks`). Within a module
the tasks may also differ in rank: per-task truncation at a rank `j_t` per task
(`SharingPlan.own_ranks`) and, with nested ranks, a rank `j_t` per task inside each shared
factor. For a fixed shared factor each task's loss at each rank is known, so the choices a
price on storage can make are the steps along the tasks' lower convex hulls, merged by
slope (`per_task_rank_paths`: at most `T` times the number of ranks); those no other option
of the module beats on both storage and loss join its options.

**Allocation (multiple-choice knapsack).** Each module offers options `(params, loss)`;
one per module must be chosen with total params `<= budget * original`. We keep each
module's Pareto front and take the best feasible selection among:

1. *Lagrangian relaxation*: per module `argmin loss + lam * params`, bisection on `lam` for
   the smallest `lam` that fits (optimal for the convexified problem), followed by a
   *greedy fill* of the leftover budget (repeatedly the upgrade with the largest loss
   decrease per extra parameter that still fits);
2. *exact dynamic programming on a grid*: parameters rounded up to `budget / 4096` units
   (so the result is always feasible), then the same greedy fill;
3. every *uniform* selection (the same grouping pair and rank multiple on every module, e.g.
   shared-A at `k = r` everywhere) that fits, greedily filled.

(3) guarantees the planner is never worse than a uniform closed-form plan (named or grouped)
at the same or lower storage; in particular than per-task truncation (every task's own update
cut to one rank), which `per_task_truncation(groupings, options, storage)` returns as the
reference `hydraopt plan` prints beside its choice.

The result is a `BudgetPlan`: per module the chosen `SharingPlan` (over all tasks of the
collection), and `to_yaml(task_names)` writes the per-module plan file (`planfile`) that
`hydraopt merge --config` reads.

Layout: `_attributes` (task groupings), `_curves` (loss curves from the Grams), `_allocate`
(the knapsack), `_budget` (`plan_budget` and its result), `planfile` (read and write).
"""

from ._allocate import allocate as allocate
from ._attributes import task_attributes_from_names as task_attributes_from_names
from ._budget import MODULE_WEIGHTINGS as MODULE_WEIGHTINGS
from ._budget import BudgetPlan as BudgetPlan
from ._budget import ModuleChoice as ModuleChoice
from ._budget import TruncationLevel as TruncationLevel
from ._budget import choose as choose
from ._budget import collection_options as collection_options
from ._budget import per_task_truncation as per_task_truncation
from ._budget import plan_budget as plan_budget
from ._budget import truncation_levels as truncation_levels
from ._curves import DEFAULT_RANK_MULTIPLIERS as DEFAULT_RANK_MULTIPLIERS
from ._curves import NAMED_PAIRS as NAMED_PAIRS
from ._curves import PlanOption as PlanOption
from ._curves import module_options as module_options
from ._curves import module_stats as module_stats
from ._sweep import storage_sweep as storage_sweep
from .planfile import plan_file_text as plan_file_text
from .planfile import plans_from_config as plans_from_config
from .planfile import read_plan_file as read_plan_file
