"""Serving from the merged form: a bundle's factors applied to a batch of mixed tasks.

`lora_apply` is pure JAX (no flax needed); `serve.nnx` wraps the layers of a Flax NNX
model with it (imported on use: it needs flax).
"""

from ._apply import ServedBundle as ServedBundle
from ._apply import ServedModule as ServedModule
from ._apply import grouped_project as grouped_project
from ._apply import lora_apply as lora_apply
from ._apply import prepare as prepare
