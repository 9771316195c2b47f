"""Calibration statistics for the output-aware objective, computed from a PyTorch model and
stored in one file that `hydraopt plan` and `hydraopt merge` read (`--calibration FILE`).

Two statistics, both from a few training-distribution batches (never held-out data):

* `activation_covs` `{module: E[x x^T]}` (`[d_in, d_in]`): the inputs each adapted module
  sees in the *base* model. The solvers then minimise `||(dW_t - dW_hat_t) L||_F^2` with
  `C = L L^T`, the error the layer's outputs see (`merge(..., activation_cov=C)`).
* `module_weights` `{module: w_m}` (mean 1): how much each module's output error costs the
  task losses, so that the planner spends storage where errors matter
  (`plan_budget(..., module_weights=W)`).

```python
from hydraopt_jax.io import calibration as cal

covs = cal.input_covariances(base_model, modules, batches)              # torch, no grad
weights = cal.output_sensitivities(base_model, modules, task_batches)   # one backward per task
cal.save_calibration("calibration.safetensors", covs, weights)
stats = cal.load_calibration("calibration.safetensors", collection)     # checked against it
plan = hj.plan_budget(collection, 0.1, activation_covs=stats.activation_covs,
                      module_weights=stats.module_weights)
```

`modules` are the collection's module names (`collection.modules`), which are the *base*
model's module names (`model.layers.0.self_attn.q_proj`), not those of a PEFT-wrapped model.

File format: safetensors with tensors `covariance/<module>` (`[d_in, d_in]`, float32) and
`module_weight/<module>` (`[1]`, float32), metadata `{"format": "hydraopt-calibration",
"version": "1"}`; written atomically. torch is imported on use only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .._loss import regularized_covariance
from ._files import AdapterError, write_file_atomically, write_safetensors

__all__ = [
    "CALIBRATION_FORMAT",
    "Calibration",
    "input_covariances",
    "load_calibration",
    "output_sensitivities",
    "save_calibration",
]

CALIBRATION_FORMAT = "hydraopt-calibration"
_VERSION = "1"
_COV, _WEIGHT = "covariance/", "module_weight/"
# A covariance is symmetric positive semi-definite; float32 round-off allows this much.
_SYMMETRY_TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What a calibration file holds; either part may be absent (`None`).

    - `activation_covs`: `{module: E[x x^T]}`, float32 `[d_in, d_in]`.
    - `module_weights`: `{module: w_m}`, finite and non-negative.
    """

    activation_covs: dict[str, np.ndarray] | None = None
    module_weights: dict[str, float] | None = None


# ----------------------------------------------------------------------------- computing
def _named(model, modules: Sequence[str]) -> dict:
    named = dict(model.named_modules())
    for m in modules:
        if m not in named:
            raise ValueError(
                f"module {m!r} is not a module of the model (pass the base model, not a "
                "PEFT-wrapped one: the collection's module names are the base model's)"
            )
    return {m: named[m] for m in modules}


def input_covariances(model, modules: Sequence[str], batches: Iterable) -> dict[str, np.ndarray]:
    """`{module: E[x x^T]}` (float32) of each module's input over the unpadded positions.

    **Arguments:**

    - `model`: a PyTorch causal LM (the base model), called as
      `model(input_ids=..., attention_mask=..., use_cache=False)`.
    - `modules`: names of linear modules of `model`.
    - `batches`: `(input_ids, attention_mask)` pairs of torch tensors `[n, L]`; positions
      where the mask is 0 are left out. Sums are accumulated in float64.
    """
    from .torch import _torch

    torch = _torch()
    named = _named(model, modules)
    sums: dict[str, np.ndarray] = {}
    keep: list[np.ndarray] = []

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0]
            if not torch.is_floating_point(x):
                raise ValueError(f"module {name!r} takes {x.dtype} inputs, not activations")
            x = x.detach().double().cpu().numpy().reshape(-1, x.shape[-1])[keep[0]]
            sums[name] = sums.get(name, 0.0) + x.T @ x

        return fn

    handles = []
    count = 0
    try:
        for m in modules:  # appended one by one: a failure leaves none registered
            handles.append(named[m].register_forward_pre_hook(hook(m)))
        with torch.no_grad():
            for ids, mask in batches:
                keep[:] = [np.asarray(mask.cpu()).reshape(-1).astype(bool)]
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                count += int(keep[0].sum())
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("input_covariances: the batches hold no unpadded position")
    return {m: (sums[m] / count).astype(np.float32) for m in modules}


def output_sensitivities(
    model, modules: Sequence[str], task_batches: Iterable[tuple[object, tuple]]
) -> dict[str, float]:
    """`{module: w_m}`, mean 1 over `modules`: how much each module's output error costs the
    task losses, for the planner's `module_weights` (a module then counts by what its errors
    do downstream, not by its relative error alone).

    **Arguments:**

    - `model`: the base PyTorch causal LM (left as given: gradients are only taken with
      respect to activations, and every parameter's `requires_grad` is restored).
    - `modules`: names of linear modules of `model`.
    - `task_batches`: per task, `(lora, (input_ids, attention_mask, labels))`: the task's
      own adapter, as `{module: (A [r, d_in], B [d_out, r])}` with the scale folded into `B`
      or as an `io.PeftAdapter`, and a batch whose `labels` are -100 outside the answers.

    For each task, with its own LoRA applied: `f = sum ||dL/dy_m||^2 / (n d_out)` (the mean
    squared gradient of the summed answer cross-entropy `L` with respect to the module's
    output `y_m`, over the `n` unpadded positions) and `u = sum ||dW_m x||^2` (the energy of
    the LoRA's own output change); `f u` is the second-order loss increase of a whole-update
    sized error in an isotropic-Fisher approximation. Each task's `f u` are divided by their
    sum over modules (each task counts equally, as under the planner's `relative` task
    weights), then averaged over tasks, and the result divided by its mean. A module a task
    does not adapt contributes 0 for that task.
    """
    from .torch import _torch, lora_applied

    torch = _torch()

    named = _named(model, modules)
    per_task: dict[str, list[float]] = {m: [] for m in modules}
    outputs, inputs = {}, {}  # of the current task's forward pass

    def hook(name):
        def fn(_module, args, out):
            out.retain_grad()  # the LoRA branch adds to it: the same gradient
            outputs[name], inputs[name] = out, args[0].detach()

        return fn

    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        for lora, (ids, mask, labels) in task_batches:
            if hasattr(lora, "load_factors"):  # an io.PeftAdapter
                lora = lora.load_factors(list(lora.modules))
            handles = []
            try:  # registered before the LoRA branches: each hook sees the base output
                for m in modules:
                    handles.append(named[m].register_forward_hook(hook(m)))
                with lora_applied(model, lora):
                    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                    logits = model(
                        inputs_embeds=embeds, attention_mask=mask, use_cache=False
                    ).logits
                    loss = torch.nn.functional.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                        labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum",
                    )  # fmt: skip
                    loss.backward()
            finally:
                for h in handles:
                    h.remove()
            keep = torch.as_tensor(mask).bool()
            task = {}
            for m in modules:
                if m not in lora:  # the task does not adapt this module
                    task[m] = 0.0
                    continue
                rows = keep.to(outputs[m].device)  # the mask may live elsewhere (CPU)
                g, x = outputs[m].grad[rows].double(), inputs[m][rows].double()
                a, b = (
                    torch.as_tensor(np.asarray(f, np.float64), device=x.device) for f in lora[m]
                )
                u = float((((x @ a.T) @ b.T) ** 2).sum())
                task[m] = float((g**2).sum()) / (g.shape[0] * g.shape[1]) * u
            total = sum(task.values())
            for m in modules:  # each task counts equally, as under `relative` task weights
                per_task[m].append(task[m] / total if total > 0 else 0.0)
    finally:  # the model is left as it was given
        for p, flag in zip(params, trainable, strict=True):
            p.requires_grad_(flag)
    weights = {m: float(np.mean(v)) if v else 0.0 for m, v in per_task.items()}
    mean = float(np.mean(list(weights.values())))
    if not mean > 0:
        raise ValueError("output sensitivities: every module's weight is 0 (no LoRA update?)")
    return {m: w / mean for m, w in weights.items()}


# ------------------------------------------------------------------------------- the file
def save_calibration(
    path,
    activation_covs: Mapping[str, object] | None = None,
    module_weights: Mapping[str, float] | None = None,
) -> Path:
    """Write a calibration file (atomically: a temporary name, then a rename).

    The values are checked as `load_calibration` checks them, so a file this writes always
    reads back; raises `ValueError` naming the first bad entry.
    """
    if not activation_covs and not module_weights:
        raise ValueError("save_calibration: nothing to save (no covariances, no module weights)")
    tensors = {}
    with np.errstate(over="ignore"):  # out of float32's range becomes Inf, refused below
        for name, cov in (activation_covs or {}).items():
            tensors[_COV + name] = np.asarray(cov, dtype=np.float32)
        for name, weight in (module_weights or {}).items():
            tensors[_WEIGHT + name] = np.asarray(weight, dtype=np.float32).reshape(1)
    path = Path(path)
    _check(path, tensors, error=ValueError)
    metadata = {"format": CALIBRATION_FORMAT, "version": _VERSION}
    write_file_atomically(path, lambda tmp: write_safetensors(tmp, tensors, metadata))
    return path


def load_calibration(
    path, collection=None, parts: Sequence[str] = ("activation_covs", "module_weights")
) -> Calibration:
    """Read a calibration file written by `save_calibration`.

    **Arguments:**

    - `path`: the file.
    - `collection`: optional `io.AdapterCollection`; then each part read must cover every
      module of the collection (covariances of its `d_in`), and only the entries of its
      modules are read.
    - `parts`: which parts to read and check (`"activation_covs"`, `"module_weights"`); a
      merge needs only the covariances.

    **Returns:** a `Calibration` (float32 covariances). Raises `AdapterError(path)` (one
    line) for a file that is missing, not safetensors, not a calibration file, or holds a
    bad entry among those read (shape, NaN/Inf, not positive semi-definite, zero or out of
    float32's comfortable range, negative weights).
    """
    path = Path(path)
    metadata, stored = _read_header(path)
    if metadata.get("format") != CALIBRATION_FORMAT:
        raise AdapterError(
            path, f"not a calibration file (metadata format {metadata.get('format')!r})"
        )
    if metadata.get("version") != _VERSION:
        raise AdapterError(
            path, f"calibration format version {metadata.get('version')!r}; this reads {_VERSION}"
        )
    unknown = [k for k in stored if not k.startswith((_COV, _WEIGHT))]
    if unknown:
        raise AdapterError(
            path, f"unknown entry {unknown[0]!r} (expected {_COV}<module> or {_WEIGHT}<module>)"
        )
    wanted = {"activation_covs": _COV, "module_weights": _WEIGHT}
    prefixes = tuple(wanted[p] for p in parts)
    modules = None if collection is None else collection.modules
    keys = [
        k for k in stored
        if k.startswith(prefixes) and (modules is None or k.split("/", 1)[1] in modules)
    ]  # fmt: skip
    with np.errstate(over="ignore"):  # a foreign float64 file: out of range becomes Inf
        tensors = {k: np.asarray(v, np.float32) for k, v in _read_tensors(path, keys).items()}
    _check(path, tensors, error=AdapterError, empty_ok=True)
    covs, weights = {}, {}
    for key, value in tensors.items():
        if key.startswith(_COV):
            covs[key.removeprefix(_COV)] = value
        else:
            weights[key.removeprefix(_WEIGHT)] = float(value.reshape(-1)[0])
    if modules is not None:
        for prefix, part, what in ((_COV, covs, "input covariance"), (_WEIGHT, weights,
                                   "module weight")):  # fmt: skip
            if prefix not in prefixes or not any(k.startswith(prefix) for k in stored):
                continue  # not read, or not in the file
            missing = [m for m in modules if m not in part]
            if missing:
                raise AdapterError(
                    path, f"has no {what} for module {missing[0]!r} of the adapters "
                    f"({len(missing)} of {len(modules)} modules missing)",
                )  # fmt: skip
        for m, cov in covs.items():
            if cov.shape[0] != modules[m].d_in:
                raise AdapterError(
                    path, f"covariance of {m!r} is {cov.shape[0]} x {cov.shape[1]}; the "
                    f"adapters' d_in is {modules[m].d_in}",
                )  # fmt: skip
    if weights and not sum(weights.values()) > 0:
        raise AdapterError(path, "every module weight is 0")
    return Calibration(covs or None, weights or None)


def _read_header(path: Path) -> tuple[dict, list[str]]:
    """`(metadata, keys)` of the file, one opening, no tensor read."""
    if not path.is_file():
        raise AdapterError(path, "no such calibration file")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise AdapterError(path, f"not a readable safetensors file ({err})") from None


def _read_tensors(path: Path, keys) -> dict[str, np.ndarray]:
    """The tensors `keys` (not counted in `tensor_bytes_read`: that counts adapter factors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return {key: f.get_tensor(key) for key in keys}
    except Exception as err:
        raise AdapterError(path, f"cannot read tensors ({err})") from None


# A covariance's mean diagonal must lie in this range: the whitened factors `A L` and the
# squared norms of their updates stay far inside float32 (as the adapters' own bound does).
_COV_RANGE = (1e-20, 1e20)


def _check(path, tensors: Mapping[str, np.ndarray], error, empty_ok: bool = False) -> None:
    """Every entry well-formed: `error(path, ...)` / `error(...)` naming the first that is not."""

    def fail(message):
        raise (error(path, message) if error is AdapterError else error(f"{path}: {message}"))

    if not tensors and not empty_ok:
        fail("holds no covariance and no module weight")
    for key, value in tensors.items():
        if key.startswith(_COV):
            if value.ndim != 2 or value.shape[0] != value.shape[1] or value.shape[0] == 0:
                fail(f"{key} has shape {list(value.shape)}, not a square [d_in, d_in]")
            if not np.all(np.isfinite(value)):
                fail(f"{key} has NaN or Inf values")
            _check_covariance(key, value.astype(np.float64), fail)
        elif value.size != 1 or not np.isfinite(value).all() or float(value.reshape(-1)[0]) < 0:
            # a module weight (save builds only the two kinds; load refuses other keys first)
            fail(f"{key} must be one finite non-negative number, got {value.tolist()}")


def _check_covariance(key: str, cov: np.ndarray, fail) -> None:
    """Symmetric, positive semi-definite (up to the ridge every solver adds), in range."""
    diag = np.diag(cov)
    if np.any(diag < 0) or not np.allclose(cov, cov.T, rtol=0, atol=_SYMMETRY_TOL * diag.max()):
        fail(f"{key} is not a covariance (not symmetric with a non-negative diagonal)")
    mean = float(np.mean(diag))
    if not _COV_RANGE[0] <= mean <= _COV_RANGE[1]:
        fail(
            f"{key}: mean variance {mean:.3g} is outside [{_COV_RANGE[0]:g}, {_COV_RANGE[1]:g}] "
            "(zero, or too large or small for float32 arithmetic)"
        )
    try:  # the Cholesky factor merge whitens with, in float64
        np.linalg.cholesky(regularized_covariance(cov))
    except np.linalg.LinAlgError:
        fail(f"{key} is not a covariance (not positive semi-definite)")
