"""`merge_collection`: merge an `io.AdapterCollection` from disk, one shape group at a time.

What `hydraopt merge` does, as a library call:

* **Streaming.** Modules of one shape are loaded as one group (`AdapterCollection.load_group`),
  solved by one vmapped call (`merge_adapters`), added to the bundle and released before the
  next group is read.
* **Memory guard.** Before a group is solved its memory is estimated (`io.memory`) and
  compared with `max_memory` (default: 80% of the memory available); a group that does not
  fit is loaded and solved in module sub-batches that do, and a module that does not fit
  alone is refused (`io.memory.MemoryBudgetError`, naming it).
* **Checkpoints.** With `out` given, iterative solvers (`als`, `adam`, `lbfgs`) run in chunks
  of `checkpoint_every` steps per unit of modules and save an Orbax checkpoint in
  `OUT.hydraopt-ckpt/` after each chunk (`io.resume`). Each chunk continues the previous
  one's factors and solver state (Adam's moments and step count), so an interrupted run
  resumed with `resume=True` ends with the factors of an uninterrupted one. A checkpoint made
  from other inputs, plan or flags is refused, and so is a fresh run while one exists. The
  checkpoint is removed once the bundle is written.
* **Several processes.** In a JAX multi-controller run (`jax.distributed.initialize()`), or
  given `process=(index, count)`, each process reads and solves only its share of the
  modules (`split_modules`, balanced by size), writes it as a part beside the output
  (`io.parts`), and process 0 writes the bundle from all parts, atomically. Killed anywhere,
  the run leaves no bundle; resumed, it reuses the parts and checkpoints already written.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ._loss import adapter_task_weights
from ._merge import merge_adapters
from ._plan import SharingPlan
from ._solution import RESULTS, Solution
from ._solve import default_max_steps
from .io import AdapterCollection, AdapterError, Bundle, check_bundle_output, save_bundle
from .io._files import kill_point, map_safetensors
from .io.bundle_module import module_arrays
from .io.memory import budget, estimate_module_bytes, plan_batches
from .io.parts import load_part, parts_dir, remove_parts, save_part, wait_for_parts
from .io.resume import RunCheckpoint, arrays_sha256, checkpoint_dir, fingerprint

__all__ = ["DEFAULT_CHECKPOINT_EVERY", "PlanError", "merge_collection", "split_modules"]

DEFAULT_CHECKPOINT_EVERY = 50


class PlanError(ValueError):
    """The plan does not suit the collection or the solver (e.g. no closed form)."""


def plans_by_module(collection: AdapterCollection, plan, rank: int | None = None) -> dict:
    """`{module: SharingPlan}` over the collection's tasks from one plan, a per-module
    mapping, or a named plan (`"shared-a"`, ... at `rank`, default each module's rank)."""
    if isinstance(plan, str):
        plan = SharingPlan.named(plan, collection.num_tasks, rank)
    if isinstance(plan, SharingPlan):
        if plan.num_tasks != collection.num_tasks:
            raise PlanError(
                f"the plan has {plan.num_tasks} tasks, the collection {collection.num_tasks}"
            )
        return dict.fromkeys(collection.modules, plan)
    missing = [m for m in collection.modules if m not in plan]
    if missing:
        raise PlanError(f"no plan for module {missing[0]}")
    return {m: plan[m] for m in collection.modules}


def plan_summary(plan, plans: Mapping[str, SharingPlan]) -> dict:
    """The JSON description of a plan as bundles and `--json` report it."""
    if isinstance(plan, Mapping):
        return {"name": "per-module", "modules": {m: p.to_dict() for m, p in plans.items()}}
    first = next(iter(plans.values()))
    return {"name": first.name, **first.to_dict()}


def _module_bytes(
    collection, plans, names, exact: bool = False, covariance: bool = False
) -> dict[str, int]:
    """The memory guard's estimate for each module of one shape group (see io/memory.py);
    `exact`: solved in closed form; `covariance`: with an input covariance."""
    r_max = max(max(collection.modules[n].ranks) for n in names)
    out = {}
    for name in names:
        info = collection.modules[name]
        plan = plans[name].restrict(info.task_ids)
        k = plan.rank or max(info.ranks)
        out[name] = estimate_module_bytes(
            collection.num_tasks, r_max, info.d_in, info.d_out, k,
            plan.num_a_groups, plan.num_b_groups, exact=exact, covariance=covariance,
        )  # fmt: skip
    return out


def _check_closed_form(collection, plans) -> None:
    for module, module_plan in plans.items():
        if not module_plan.restrict(collection.modules[module].task_ids).has_closed_form:
            raise PlanError(
                f"the plan of {module} has no closed form (its A- and B-groups do not nest); "
                "use solver='als', 'adam' or 'lbfgs'"
            )


def split_modules(collection: AdapterCollection, plans, count: int) -> list[list[str]]:
    """The modules of each of `count` processes: a deterministic split balanced by each
    module's estimated solve memory (the largest first, to the least loaded process), in
    the collection's order within each process."""
    if count == 1:
        return [list(collection.modules)]
    sizes: dict[str, int] = {}
    for names in collection.shape_groups().values():
        sizes.update(_module_bytes(collection, plans, names))
    load, share = [0] * count, [[] for _ in range(count)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        p = min(range(count), key=lambda i: (load[i], i))
        load[p] += sizes[name]
        share[p].append(name)
    order = {name: i for i, name in enumerate(collection.modules)}
    return [sorted(names, key=order.get) for names in share]


def _resolve_process(process) -> tuple[int, int]:
    """`(index, count)`: given, or this process's place in a JAX multi-controller run."""
    if process is not None:
        index, count = (int(x) for x in process)
        if not (count >= 1 and 0 <= index < count):
            raise ValueError(
                f"process must be (index, count) with 0 <= index < count, got {process}"
            )
        return index, count
    import jax

    return jax.process_index(), jax.process_count()


def merge_collection(
    collection: AdapterCollection,
    plan: SharingPlan | Mapping[str, SharingPlan] | str = "shared-a",
    solver: str = "exact",
    *,
    out=None,
    rank: int | None = None,
    weights: str = "relative",
    max_steps: int | None = None,
    dtype: str = "float32",
    max_memory: int | None = None,
    resume: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    plan_source: str | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    process: tuple[int, int] | None = None,
    part_timeout: float | None = None,
    activation_covs: Mapping[str, Any] | None = None,
) -> Bundle:
    """Merge a collection read from disk, streaming it group by group (module docstring).

    **Arguments:**

    - `collection`: an `io.AdapterCollection` (`io.load_collection(dirs)`).
    - `plan`: one `SharingPlan` over the tasks, `{module: SharingPlan}` (e.g. a planner's
      `BudgetPlan.plans` or `planner.read_plan_file`), or a named plan (`"shared-a"`,
      `"shared-b"`, `"full-merge"`, `"separate"`) at `rank` (default: each module's rank).
    - `solver`: `"exact"`, `"als"`, `"adam"` or `"lbfgs"`.
    - `out`: a directory to write the bundle to (atomically); checkpoints of iterative solves
      go beside it (`OUT.hydraopt-ckpt`). Without `out` nothing is written.
    - `weights`: `"relative"`, `"uniform"` or `"adapter"` (as in `merge_adapters`: computed
      from every module in a first pass over the collection, one module in memory at a time;
      with several processes each reads every module in that pass, since a task's weight
      needs its whole adapter); `max_steps`: iterative solvers' step budget.
    - `dtype`: the bundle's stored dtype (`"float32"`, `"bfloat16"`, `"float16"`).
    - `max_memory`: bytes one solve may use (default 80% of the available memory).
    - `resume`, `checkpoint_every`: continue an interrupted run from its checkpoint (and,
      with several processes, its parts); the chunk length of iterative solves (0: none).
    - `plan_source`: where the plan came from (a plan file, a plan name), recorded with it.
    - `meta`: extra JSON-able entries for `hydraopt.json`.
    - `progress`: called as `progress(description, groups_done, groups_total)`.
    - `process`: `(index, count)` of this process in a multi-process merge (default: its
      place in a JAX multi-controller run, `jax.process_index()` / `process_count()`, which
      is `(0, 1)` in a plain one). Each process reads and solves only its share of the
      modules (`split_modules`) and writes it as a part beside `out`; process 0 waits for
      every part (a JAX barrier in a multi-controller run, else polling the files for up
      to `part_timeout` seconds), then writes the bundle. `out` must be on a file system all
      processes see.
    - `activation_covs`: optional `{module: E[x x^T]}` for every module (e.g.
      `io.calibration.load_calibration(path, collection).activation_covs`): the
      activation-aware objective, as in `merge_adapters`; the bundle's relative errors are
      then in that metric and its `hydraopt.json` records `"objective": "activation"`.

    **Returns:** the `io.Bundle` (saved to `out` when given); on processes other than 0 of
    a multi-process merge, only the modules that process solved; on process 0, the bundle
    with its factors memory-mapped from `out` (assembled one tensor at a time). Raises
    `io.AdapterError` for a bad input (naming it), `PlanError` for a plan that does not suit
    the solver, and `SolverError` when a solve diverges.

    ```python
    collection = hj.io.load_collection(["adapters/fr_qa", "adapters/de_qa"])
    bundle = hj.merge_collection(collection, "shared-a", out="merged")
    ```
    """
    if not isinstance(collection, AdapterCollection):
        raise TypeError(
            f"merge_collection takes an io.AdapterCollection, got {type(collection).__name__}; "
            "merge arrays in memory with merge_adapters"
        )
    index, count = _resolve_process(process)
    if count > 1 and out is None:
        raise ValueError("a multi-process merge needs out= (its processes meet in files there)")
    plans = plans_by_module(collection, plan, rank)
    if activation_covs is not None:
        missing = [m for m in collection.modules if m not in activation_covs]
        if missing:
            raise ValueError(
                f"activation_covs has no covariance for module {missing[0]!r} "
                f"({len(missing)} of {len(collection.modules)} missing)"
            )
        activation_covs = {m: activation_covs[m] for m in collection.modules}
    if solver == "exact":
        _check_closed_form(collection, plans)
    if out is not None:
        out = check_bundle_output(out)
    summary = plan_summary(plan, plans)
    iterative = solver != "exact"
    total_steps = default_max_steps(solver) if max_steps is None else max_steps
    flags = {
        "solver": solver,
        "steps": total_steps,
        "weighting": weights,
        "checkpoint_every": checkpoint_every if iterative else None,
    }
    if count > 1:
        flags["processes"] = count
    wants_checkpoint = out is not None and (
        (iterative and checkpoint_every > 0) or checkpoint_dir(out).exists()
    )
    if activation_covs is not None and (count > 1 or wants_checkpoint):
        flags["calibration"] = arrays_sha256(activation_covs)
    # What parts and checkpoints must match (hashes every input file): only when either is used.
    print_ = fingerprint(collection, summary, flags) if count > 1 or wants_checkpoint else None
    described = summary if plan_source is None else {**summary, "source": plan_source}
    full_meta = {"solver": solver, "weighting": weights, "plan": described}
    if activation_covs is not None:
        full_meta["objective"] = "activation"
    full_meta.update(meta or {})
    names = split_modules(collection, plans, count)[index]
    done = None
    if count > 1:
        done = load_part(out, index, count, print_, collection.num_tasks)
        if done is not None and not resume:
            raise AdapterError(
                parts_dir(out),
                f"part {index} of an interrupted run exists; pass --resume to continue it, or "
                "delete it to start over",
            )
    part = None if count == 1 else f"process-{index:04d}"
    checkpoint = None
    solve_weights = weights
    if weights == "adapter" and done is None:  # needs every module's update, not a group's
        solve_weights = adapter_task_weights(collection.iter_modules(), activation_covs)
    if done is None and wants_checkpoint:
        checkpoint = RunCheckpoint.open(out, print_, resume=resume, part=part)
        if not (iterative and checkpoint_every > 0):
            checkpoint = None  # a matching checkpoint with nothing to resume: ignored
    bundle = Bundle.empty(collection, dtype=dtype, meta=full_meta, carried=count == 1)
    created = checkpoint is not None and not checkpoint.resumed
    try:
        if done is None:
            _solve_all(
                collection, plans, names, solver, solve_weights, total_steps, checkpoint,
                checkpoint_every, max_memory, bundle, out, progress, activation_covs,
            )  # fmt: skip
        else:
            bundle.modules.update(done)
        if count == 1:
            if out is not None:
                save_bundle(bundle, out)
        elif done is None:
            save_part(out, index, count, print_, bundle.modules)
    except AdapterError:
        # a bad input found while solving (e.g. NaN in a later group): leave nothing behind
        if created:
            checkpoint.remove()
        raise
    if checkpoint is not None:
        checkpoint.remove()
    if count == 1:
        return bundle
    return _assemble(collection, out, index, count, print_, bundle, dtype, full_meta, part_timeout)


def _assemble(collection, out, index, count, print_, mine, dtype, meta, timeout) -> Bundle:
    """After every process wrote its part, process 0 writes the bundle from all parts."""
    import jax

    if jax.process_count() == count:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("hydraopt: every part written")
    elif index == 0:
        wait_for_parts(out, count, timeout)
    if index != 0:
        return mine
    bundle = Bundle.empty(collection, dtype=dtype, meta=meta)
    modules = dict(mine.modules)  # its own part is in memory
    for i in range(1, count):
        part = load_part(out, i, count, print_, collection.num_tasks)
        if part is None:
            raise AdapterError(parts_dir(out), f"part {i} of {count} is missing")
        modules.update(part)
    bundle.modules.update({m: modules[m] for m in collection.modules if m in modules})
    save_bundle(bundle, out)  # one tensor at a time: the parts' factors are fetched lazily
    remove_parts(out)
    mapped = map_safetensors(out / "factors.safetensors")
    # Arrays again, read from OUT on use (packed ones are unpacked to their padded form here).
    for name, module in bundle.modules.items():
        arrays = module_arrays(name, module.plan, module.core, module.packed, mapped.__getitem__)
        bundle.modules[name] = dataclasses.replace(module, **arrays)
    with contextlib.suppress(OSError):
        checkpoint_dir(out).rmdir()  # empty once every process removed its own
    return bundle


def _solve_all(
    collection, plans, names, solver, weights, total_steps, checkpoint, checkpoint_every,
    max_memory, bundle, out, progress, covs,
) -> None:  # fmt: skip
    """Solve the shape groups of the modules `names` (in memory-sized units, chunked and
    checkpointed if iterative) and add the solutions to `bundle`."""
    mine = set(names)
    groups = {
        key: tuple(n for n in group if n in mine)
        for key, group in collection.shape_groups().items()
        if any(n in mine for n in group)
    }
    kinds = {name: info.kind for name, info in collection.modules.items()}
    limit, source = budget(max_memory)
    # Split every group before solving any, so a module that cannot fit fails at once.
    # A resumed run keeps the split its checkpoint recorded (same units, same factors).
    splits = {}
    for (kind, d_in, d_out), module_names in groups.items():
        key = f"{kind}:{d_in}x{d_out}"
        batches = checkpoint.batches(key) if checkpoint is not None else None
        if batches is None or sorted(n for b in batches for n in b) != sorted(module_names):
            batches = plan_batches(
                module_names,
                _module_bytes(
                    collection,
                    plans,
                    module_names,
                    exact=solver == "exact",
                    covariance=covs is not None,
                ),  # fmt: skip
                limit,
                source,
            )
        splits[key] = batches
    for g, ((kind, d_in, d_out), module_names) in enumerate(groups.items()):
        if progress is not None:
            progress(f"{kind} {d_in}->{d_out} x{len(module_names)}", g, len(groups))
        key = f"{kind}:{d_in}x{d_out}"
        if checkpoint is not None:
            checkpoint.set_batches(key, splits[key])
        for b, batch in enumerate(splits[key]):
            group = collection.load_group(batch)
            solutions = _solve_unit(
                f"g{g:04d}b{b:02d}", group, plans, solver, weights, total_steps, checkpoint,
                checkpoint_every, None if covs is None else {n: covs[n] for n in group},
            )  # fmt: skip
            try:
                bundle.add_solutions(group, solutions, kinds)
            except ValueError as err:
                raise AdapterError(out if out is not None else "<bundle>", str(err)) from None
            del group, solutions
    if progress is not None:
        progress("done", len(groups), len(groups))


def _solve_unit(
    unit, group, plans, solver, weights, total_steps, checkpoint, checkpoint_every, covs
) -> dict[str, Solution]:
    """Solve one unit of modules; iterative solvers run in checkpointed chunks.

    Chunk `c` runs `min(N, total - c N)` steps on the modules not done yet, continuing the
    previous chunk's factors and solver state; a module is done when its solver converged
    (stopped before its step budget) or the total is spent. `Solution.steps` counts all
    chunks.
    """
    plans = {n: plans[n] for n in group}
    if checkpoint is None:
        solutions = merge_adapters(
            group, plans, solver, weights=weights, max_steps=total_steps, activation_covs=covs
        )
        kill_point("solve")
        return solutions
    saved = checkpoint.load_unit(unit)
    if saved is not None:
        solutions, extra = saved
        solutions = {n: solutions[n] for n in group if n in solutions}
        steps_done, done = int(extra["steps_done"]), set(extra["done"])
        if extra.get("complete"):
            return solutions
    else:
        solutions, steps_done, done = {}, 0, set()
    while True:
        active = [n for n in group if n not in done]
        if not active:
            break
        chunk = min(checkpoint_every, total_steps - steps_done)
        init = "relaxed" if not solutions else {n: solutions[n] for n in active}
        new = merge_adapters(
            {n: group[n] for n in active}, {n: plans[n] for n in active}, solver,
            weights=weights, max_steps=chunk, init=init,
            activation_covs=None if covs is None else {n: covs[n] for n in active},
        )  # fmt: skip
        kill_point("solve")
        steps_done += chunk
        for name, sol in new.items():
            before = solutions[name].steps if name in solutions else 0
            solutions[name] = sol.replace(steps=sol.steps + before)
            if int(sol.result) != RESULTS.max_steps_reached or steps_done >= total_steps:
                done.add(name)
        complete = all(n in done for n in group)
        checkpoint.save_unit(
            unit,
            solutions,
            {"steps_done": steps_done, "done": sorted(done), "complete": complete},
        )
    return {n: solutions[n] for n in group if n in solutions}
