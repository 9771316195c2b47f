"""Shared builders for the io / cli tests: tiny models from configs, real PEFT adapters.

No test functions here; other `test_io_*` / `test_cli_*` modules import these helpers.
Everything is built once per session (cached) in a temporary directory.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

PREFIX = "base_model.model."
LLAMA_TASKS = {
    # two languages x two applications, mixed ranks, rsLoRA, rank/alpha patterns, MLP
    "chat_fr": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "chat_de": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 3},
    ),
    "qa_fr": dict(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["lm_head"],
    ),
}


@functools.cache
def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="hydraopt-io-tests-"))
    atexit.register(shutil.rmtree, path, True)
    return path


class Quiet:
    def __enter__(self):
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def tiny_llama(hidden: int = 32):
    """Llama with grouped-query attention: 4 query heads, 2 key/value heads (k/v 16 wide)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    with Quiet():
        return LlamaForCausalLM(config).eval()


def tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50,
        n_positions=32,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    with Quiet():
        return GPT2LMHeadModel(config).eval()


def make_adapter(base, path: Path, seed: int, **lora_kwargs) -> Path:
    """A real PEFT adapter with both factors random (PEFT inits B = 0), saved to `path`."""
    import torch
    from peft import LoraConfig, get_peft_model

    with Quiet():
        model = get_peft_model(base, LoraConfig(**lora_kwargs))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
                elif "modules_to_save" in name:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.01)
        model.save_pretrained(str(path))
    return path


@functools.cache
def llama_adapters() -> tuple[Path, ...]:
    root = workdir() / "llama"
    return tuple(
        make_adapter(tiny_llama(), root / name, seed, **kwargs)
        for seed, (name, kwargs) in enumerate(LLAMA_TASKS.items())
    )


@functools.cache
def gpt2_adapter() -> Path:
    return make_adapter(
        tiny_gpt2(),
        workdir() / "gpt2" / "gpt2_task",
        7,
        r=4,
        lora_alpha=6,
        target_modules=["c_attn", "c_proj", "wte"],
        fan_in_fan_out=True,
    )


def load_peft(base, adapter_dir):
    from peft import PeftModel

    with Quiet():
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def peft_deltas(base, adapter_dir) -> dict[str, tuple[np.ndarray, bool, str]]:
    """`{module: (delta in the base weight's layout, fan_in_fan_out, kind)}` from PEFT."""
    from peft.tuners.lora import LoraLayer

    model = load_peft(base, adapter_dir)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            kind = "embedding" if "default" in module.lora_embedding_A else "linear"
            with Quiet():
                delta = module.get_delta_weight("default").detach().double().numpy()
            out[name.removeprefix(PREFIX)] = (
                delta,
                bool(getattr(module, "fan_in_fan_out", False)),
                kind,
            )
    return out


def as_update(delta: np.ndarray, fan_in_fan_out: bool, kind: str) -> np.ndarray:
    """PEFT's delta in our `[d_out, d_in]` layout (Conv1D and Embedding are transposed)."""
    return delta.T if (fan_in_fan_out or kind == "embedding") else delta


def rel_err(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def hand_solutions(collection, plan_name="shared_a", seed=0, rank_of=None):
    """Random `Solution`s for every module of `collection` (no solver involved).

    `rank_of(module) -> k` picks each module's shared rank (default 3).
    """
    import jax.numpy as jnp

    from hydraopt_jax import SharingPlan, Solution

    rng = np.random.default_rng(seed)
    groups = {}
    solutions = {}
    for _, group in collection.iter_groups():
        for name, (a, b, ranks) in group.items():
            present = tuple(t for t, r in enumerate(ranks) if r)
            k = rank_of(name) if rank_of else 3
            plan = SharingPlan.named(plan_name, len(present), k)
            solutions[name] = Solution(
                shared_a=jnp.asarray(
                    rng.normal(size=(plan.num_a_groups, k, a.shape[2])), jnp.float32
                ),
                shared_b=jnp.asarray(
                    rng.normal(size=(plan.num_b_groups, b.shape[1], k)), jnp.float32
                ),
                loss=jnp.array(0.5),
                relative_error=jnp.asarray(rng.uniform(size=len(present)), jnp.float32),
                task_sq_norms=jnp.asarray(
                    [np.sum((b[t].T @ b[t]) * (a[t] @ a[t].T)) for t in present], jnp.float32
                ),
                weights=jnp.ones(len(present)),
                steps=jnp.array(0),
                result=jnp.array(0),
                plan=plan,
                task_ranks=tuple(ranks[t] for t in present),
                task_ids=present,
            )
        groups.update(group)
    return groups, solutions


def hand_bundle(dirs, plan_name="shared_a", dtype="float32", rank_of=None, seed=0):
    from hydraopt_jax.io import Bundle, load_collection

    collection = load_collection(dirs)
    groups, solutions = hand_solutions(collection, plan_name, seed, rank_of)
    bundle = Bundle.empty(collection, dtype=dtype, meta={"solver": "hand"})
    bundle.add_solutions(groups, solutions, {n: i.kind for n, i in collection.modules.items()})
    return collection, solutions, bundle
