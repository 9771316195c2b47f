"""Read PEFT LoRA adapters: configs checked, tensors read on demand (per module group).

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with
keys `base_model.model.<module>.lora_A.weight` `[r, d_in]` and `...lora_B.weight`
`[d_out, r]` (embeddings: `lora_embedding_A` `[r, num]`, `lora_embedding_B` `[dim, r]`).
Each module's update is `dW = s B A` with `s = alpha / r` (`alpha / sqrt(r)` with rsLoRA),
`r` and `alpha` resolved per module from `rank_pattern` / `alpha_pattern` exactly as PEFT
does (`peft.utils.other.get_pattern_key`). We fold `s` into `B` and solve in float32.

`fan_in_fan_out` (GPT-2 `Conv1D`) does not change the stored factors: PEFT keeps `lora_A`
and `lora_B` in `nn.Linear` layout and transposes only the product
(`transpose(B @ A, fan_in_fan_out)`), so the flag is carried to the export unchanged.

Tensors of `modules_to_save` and the base embedding weights PEFT saves alongside an
embedding LoRA are carried through untouched (never merged, never dropped). DoRA, LoRA
bias and any other tensor are refused with an `AdapterError` naming the file and tensor.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ._files import (
    AdapterError,
    read_json,
    read_safetensors,
    read_safetensors_header,
)

__all__ = [
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "AdapterError",
    "ModuleSpec",
    "PeftAdapter",
    "adapter_from_tensors",
    "get_pattern_key",
    "load_peft_adapter",
    "parse_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": ("linear", "a"),
    ".lora_B.weight": ("linear", "b"),
    ".lora_embedding_A": ("embedding", "a"),
    ".lora_embedding_B": ("embedding", "b"),
}


def get_pattern_key(pattern_keys: Sequence[str], key_to_match: str) -> str:
    """PEFT's rule for `rank_pattern` / `alpha_pattern` (peft 0.21 `get_pattern_key`).

    The first pattern `p` (in the config's order) with `re.match(rf"(.*\\.)?({p})$", key)`
    wins; if none matches, `key_to_match` itself is returned (and so is not in the dict).
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """One adapted module of one adapter: where its factors are and how they scale."""

    name: str
    kind: str  # "linear" or "embedding"
    d_in: int
    d_out: int
    rank: int
    alpha: float
    scale: float
    a_key: str
    b_key: str


@dataclasses.dataclass
class PeftAdapter:
    """A PEFT LoRA adapter whose tensors are read on demand.

    Built by `load_peft_adapter` (from a directory) or `from_torch_state_dict` (from
    memory). `modules` maps module name (e.g. `model.layers.0.self_attn.q_proj`) to its
    `ModuleSpec`; `carried_keys` are tensors kept verbatim (`modules_to_save`, saved
    embedding base weights).
    """

    name: str
    path: Path | None
    config: dict
    modules: dict[str, ModuleSpec]
    carried_keys: tuple[str, ...]
    tensor_dtypes: dict[str, str]
    _tensors: dict[str, np.ndarray] | None = dataclasses.field(default=None, repr=False)
    source: str | None = None  # what errors name for an adapter held in memory

    @property
    def weights_file(self) -> str:
        if self.path is not None:
            return str(self.path / WEIGHTS_NAME)
        return self.source or f"<{self.name}>"

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def target_modules(self):
        return self.config.get("target_modules")

    @property
    def modules_to_save(self):
        return self.config.get("modules_to_save")

    def read_tensors(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Raw tensors in their stored dtype (bf16 as `ml_dtypes.bfloat16`)."""
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        return read_safetensors(self.path / WEIGHTS_NAME, keys)

    def load_factors(self, names: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """`{module: (A [r, d_in], s * B [d_out, r])}` in float32, scale folded into B.

        Raises `AdapterError` on NaN or Inf in a factor.
        """
        specs = [self.modules[n] for n in names]
        raw = self.read_tensors([k for s in specs for k in (s.a_key, s.b_key)])
        out = {}
        for spec in specs:
            a = np.asarray(raw[spec.a_key], dtype=np.float32)
            b = np.asarray(raw[spec.b_key], dtype=np.float32)
            for key, value in ((spec.a_key, a), (spec.b_key, b)):
                if not np.all(np.isfinite(value)):
                    raise AdapterError(self.weights_file, f"tensor {key} has NaN or Inf values")
            # ||s B A||_F^2 <= ||A||^2 ||s B||^2 must stay far inside float32 (the Grams and
            # losses square the update); legitimate adapters are many decades away from both
            # ends. float32 dot products (no copy); float64 only where they under/overflow.
            sq_a, sq_b = _sq_norm(a), _sq_norm(b)
            bound = sq_a * sq_b * spec.scale**2
            if 0.0 < bound < _MIN_SQ_NORM:
                raise AdapterError(
                    self.weights_file,
                    f"module {spec.name}: update norm bound ||A|| ||s B|| = {math.sqrt(bound):.3g}"
                    " is too small for float32 arithmetic (its squared norm would underflow); "
                    "rescale the adapter or leave the module out",
                )
            if bound > _MAX_SQ_NORM:
                raw_ok = sq_a * sq_b <= _MAX_SQ_NORM
                raise AdapterError(
                    self.path / CONFIG_NAME
                    if raw_ok and self.path is not None
                    else self.weights_file,
                    f"module {spec.name}: update norm bound ||A|| ||s B|| = "
                    f"{math.sqrt(sq_a * sq_b) * spec.scale:.3g} (scale s = {spec.scale:.3g}: "
                    "lora_alpha / r, or / sqrt(r) with rsLoRA) is too large for float32 "
                    "arithmetic",
                )
            scaled = b * np.float32(spec.scale)
            out[spec.name] = (a, scaled)
        return out


_MAX_SQ_NORM = 1e30  # bound on ||s B A||_F^2 (float32 max is 3.4e38)
_MIN_SQ_NORM = 1e-30  # and below (float32's smallest normal is 1.2e-38); exactly 0 is fine


def _sq_norm(x: np.ndarray) -> float:
    """`||x||_F^2` of a float32 array: a float32 dot product (no copy), redone in float64
    when it overflows, or underflows to 0 while `x` is not all zeros."""
    flat = x.reshape(-1)
    sq = float(np.dot(flat, flat))
    if math.isinf(sq) or (sq == 0.0 and flat.any()):
        wide = flat.astype(np.float64)
        sq = float(np.dot(wide, wide))
    return sq


def _strip(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def _matches_module(module: str, names) -> bool:
    """`module` is one of `names` or ends with `.name` (PEFT's modules_to_save rule)."""
    if not names:
        return False
    if isinstance(names, str):
        names = [names]
    return any(module == n or module.endswith("." + n) for n in names)


def _check_config(config: dict, where) -> None:
    if not isinstance(config, dict):
        raise AdapterError(where, "adapter config is not a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(
            where, f"peft_type is {peft_type!r}; only LoRA adapters (LORA) can be merged"
        )
    if config.get("use_dora"):
        raise AdapterError(
            where,
            "use_dora is true: DoRA adapters are not supported (their magnitude vector cannot be "
            "merged as a low-rank update)",
        )
    if config.get("lora_bias"):
        raise AdapterError(where, "lora_bias is true: LoRA bias is not supported")
    if config.get("bias", "none") not in ("none", None):
        raise AdapterError(
            where,
            f"bias={config.get('bias')!r}: adapters that train base biases are not supported; "
            "expected 'none'",
        )
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        # These inits rewrite the base weights; their saved factors are deltas against
        # that modified base, not against the base model the other adapters share.
        raise AdapterError(
            where,
            f"init_lora_weights={init!r} adapters are relative to a modified base model; "
            "save them converted to plain LoRA (PEFT's path_initial_model_for_weight_conversion)",
        )
    if config.get("target_parameters"):
        raise AdapterError(
            where, "target_parameters is set: LoRA on raw nn.Parameters is not supported"
        )
    for field in ("r", "lora_alpha"):
        if not _positive(config.get(field)):
            raise AdapterError(
                where, f"{field} must be a positive number, got {config.get(field)!r}"
            )
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise AdapterError(where, f"{field} must be a mapping, got {config.get(field)!r}")
        for key, value in pattern.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as err:
                raise AdapterError(
                    where, f"{field} key {key!r} is not a valid regular expression ({err})"
                ) from None
            if not _positive(value):
                raise AdapterError(
                    where, f"{field}[{key!r}] must be a positive number, got {value!r}"
                )
    mts = config.get("modules_to_save")
    if mts is not None and not isinstance(mts, str):
        if not isinstance(mts, list) or not all(isinstance(m, str) for m in mts):
            raise AdapterError(
                where, f"modules_to_save must be a list of module names, got {mts!r}"
            )


def _positive(value) -> bool:
    """A finite number > 0 (not a bool)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value > 0
    )


def parse_adapter(
    name: str,
    config: dict,
    header: Mapping[str, tuple[tuple[int, ...], str]],
    weights_file: str,
    config_file: str,
) -> tuple[dict[str, ModuleSpec], tuple[str, ...]]:
    _check_config(config, config_file)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    factors: dict[str, dict[str, tuple[str, str]]] = {}  # module -> side -> (key, kind)
    carried = []
    others = []
    for key in header:
        stripped = _strip(key)
        for suffix, (kind, side) in _SUFFIXES.items():
            if stripped.endswith(suffix):
                module = stripped[: -len(suffix)]
                entry = factors.setdefault(module, {})
                if side in entry:
                    raise AdapterError(
                        weights_file,
                        f"two {side.upper()} factors for module {module}: {entry[side][0]} and "
                        f"{key}",
                    )
                entry[side] = (key, kind)
                break
        else:
            others.append(key)
    for key in others:
        stripped = _strip(key)
        module = stripped.rsplit(".", 1)[0]
        if ".lora_magnitude_vector" in stripped:
            raise AdapterError(
                weights_file,
                f"tensor {key} is a DoRA magnitude vector; DoRA adapters are not supported",
            )
        if re.search(r"\.lora_[AB]\.bias$", stripped) or "lora_embedding_B.bias" in stripped:
            raise AdapterError(
                weights_file, f"tensor {key} is a LoRA bias; LoRA bias is not supported"
            )
        if _matches_module(module, config.get("modules_to_save")):
            carried.append(key)
        elif (
            stripped.endswith(".base_layer.weight")
            and factors.get(stripped[: -len(".base_layer.weight")], {}).get("a", (None, None))[1]
            == "embedding"
        ):
            # PEFT saves the base embedding matrix next to an embedding LoRA
            # (`save_embedding_layers`); it is part of the adapter, so we keep it.
            carried.append(key)
        else:
            raise AdapterError(
                weights_file,
                f"unknown tensor {key} (shape {list(header[key][0])}); expected LoRA factors "
                "(lora_A/lora_B, lora_embedding_A/B) or modules_to_save tensors",
            )
    modules = {}
    for module, entry in factors.items():
        if set(entry) != {"a", "b"}:
            have = next(iter(entry.values()))[0]
            missing = "B" if "a" in entry else "A"
            raise AdapterError(
                weights_file, f"module {module} has {have} but no LoRA {missing} factor"
            )
        (a_key, kind), (b_key, kind_b) = entry["a"], entry["b"]
        a_shape, b_shape = header[a_key][0], header[b_key][0]
        if kind != kind_b:
            raise AdapterError(weights_file, f"module {module} mixes {a_key} and {b_key}")
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterError(
                weights_file,
                f"tensor {a_key} has shape {list(a_shape)} and {b_key} has shape "
                f"{list(b_shape)}; only 2-D LoRA factors (Linear, Conv1D, Embedding) are "
                "supported, not convolution LoRA",
            )
        r = a_shape[0]
        if b_shape[1] != r:
            raise AdapterError(
                weights_file,
                f"tensor {b_key} has shape {list(b_shape)}, expected [{b_shape[0]}, {r}] to "
                f"match {a_key} of shape {list(a_shape)}",
            )
        r_key = get_pattern_key(list(rank_pattern), module)
        alpha_key = get_pattern_key(list(alpha_pattern), module)
        config_r = rank_pattern.get(r_key, config["r"])
        alpha = alpha_pattern.get(alpha_key, config["lora_alpha"])
        if config_r != r:
            raise AdapterError(
                weights_file,
                f"tensor {a_key} has rank {r} but {config_file} gives r={config_r} for module "
                f"{module} (r / rank_pattern)",
            )
        if r == 0:
            raise AdapterError(weights_file, f"module {module} has rank 0")
        if 0 in a_shape or 0 in b_shape:
            raise AdapterError(
                weights_file,
                f"module {module} has an empty dimension ({a_key} {list(a_shape)}, {b_key} "
                f"{list(b_shape)})",
            )
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = ModuleSpec(
            name=module,
            kind=kind,
            d_in=a_shape[1],
            d_out=b_shape[0],
            rank=r,
            alpha=float(alpha),
            scale=float(scale),
            a_key=a_key,
            b_key=b_key,
        )
    if not modules:
        raise AdapterError(weights_file, "no LoRA factors found (no lora_A/lora_B tensors)")
    return modules, tuple(carried)


def load_peft_adapter(path, name: str | None = None) -> PeftAdapter:
    """Read a PEFT LoRA adapter directory's config and tensor header (tensors stay on disk).

    **Arguments:**

    - `path`: a directory with `adapter_config.json` and `adapter_model.safetensors`.
    - `name`: the task name; defaults to the directory name.

    **Returns:** a `PeftAdapter`; `adapter.load_factors([...])` reads modules on demand.

    ```python
    adapter = load_peft_adapter("adapters/fr_qa")
    A, B = adapter.load_factors(["model.layers.0.self_attn.q_proj"])[...]   # B has s folded in
    ```
    """
    path = Path(path)
    if not path.exists():
        raise AdapterError(path, "no such adapter directory")
    if not path.is_dir():
        raise AdapterError(
            path,
            f"not a directory; expected a PEFT adapter directory with {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}",
        )
    config_file = path / CONFIG_NAME
    weights_file = path / WEIGHTS_NAME
    if not config_file.is_file():
        raise AdapterError(config_file, "missing; not a PEFT adapter directory")
    if not weights_file.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(
                path / "adapter_model.bin",
                f"pickled adapters are not read (unsafe); save with safetensors ({WEIGHTS_NAME})",
            )
        raise AdapterError(weights_file, "missing; not a PEFT adapter directory")
    config = read_json(config_file)
    header = read_safetensors_header(weights_file)
    modules, carried = parse_adapter(
        name or path.name, config, header, str(weights_file), str(config_file)
    )
    return PeftAdapter(
        name=name or path.resolve().name,
        path=path,
        config=config,
        modules=modules,
        carried_keys=carried,
        tensor_dtypes={k: v[1] for k, v in header.items()},
    )


def adapter_from_tensors(name: str, config: dict, tensors: Mapping[str, np.ndarray], where: str):
    """A `PeftAdapter` held in memory from PEFT-layout `tensors` and its `config`, checked
    like a directory (the same one-line errors, naming `where`)."""
    header = {key: (tuple(v.shape), str(v.dtype)) for key, v in tensors.items()}
    modules, carried = parse_adapter(name, config, header, where, f"<config {name}>")
    return PeftAdapter(
        name=name,
        path=None,
        config=config,
        modules=modules,
        carried_keys=carried,
        tensor_dtypes={k: v[1] for k, v in header.items()},
        _tensors=dict(tensors),
        source=where,
    )
