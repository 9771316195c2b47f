"""Converters: PEFT adapters and PyTorch state dicts in, bundles and PEFT adapters out."""

from ._files import AdapterError as AdapterError
from ._files import write_safetensors as write_safetensors
from .bundle import Bundle as Bundle
from .bundle import BundleModule as BundleModule
from .bundle import is_bundle as is_bundle
from .bundle import load_bundle as load_bundle
from .bundle import save_bundle as save_bundle
from .checkpoint import restore_solution as restore_solution
from .checkpoint import save_solution as save_solution
from .peft import AdapterCollection as AdapterCollection
from .peft import ModuleInfo as ModuleInfo
from .peft import PeftAdapter as PeftAdapter
from .peft import export_peft as export_peft
from .peft import export_peft_config as export_peft_config
from .peft import get_pattern_key as get_pattern_key
from .peft import load_collection as load_collection
from .peft import load_peft_adapter as load_peft_adapter
from .torch import from_torch_state_dict as from_torch_state_dict
from .torch import to_torch_state_dict as to_torch_state_dict
