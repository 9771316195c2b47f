"""Converters and files: PEFT adapters and PyTorch state dicts in, bundles, PEFT adapters
and Orbax checkpoints out.

Layout: `peft` (reading and checking one adapter), `collection` (many adapters, read one
shape group at a time), `export` (PEFT adapters from a bundle), `bundle`, `torch`, `flax`
(Flax NNX LoRAs in and out), `calibration` (input covariances and module weights from a
PyTorch model, and their file), `checkpoint` (Orbax `Solution` checkpoints), `resume` (a long
merge's checkpoints), `memory` (the memory guard), `_files` (errors, safetensors, atomic
directories).
"""

from . import calibration as calibration
from . import flax as flax
from ._files import AdapterError as AdapterError
from ._files import read_yaml as read_yaml
from ._files import tensor_bytes_read as tensor_bytes_read
from ._files import write_safetensors as write_safetensors
from .bundle import Bundle as Bundle
from .bundle import BundleModule as BundleModule
from .bundle import check_bundle_output as check_bundle_output
from .bundle import is_bundle as is_bundle
from .bundle import load_bundle as load_bundle
from .bundle import save_bundle as save_bundle
from .calibration import Calibration as Calibration
from .calibration import load_calibration as load_calibration
from .calibration import save_calibration as save_calibration
from .checkpoint import restore_solution as restore_solution
from .checkpoint import save_solution as save_solution
from .collection import AdapterCollection as AdapterCollection
from .collection import ModuleInfo as ModuleInfo
from .collection import load_collection as load_collection
from .export import EXPORT_MARKER as EXPORT_MARKER
from .export import export_peft as export_peft
from .export import export_peft_config as export_peft_config
from .parts import parts_dir as parts_dir
from .peft import PeftAdapter as PeftAdapter
from .peft import get_pattern_key as get_pattern_key
from .peft import load_peft_adapter as load_peft_adapter
from .torch import from_torch_state_dict as from_torch_state_dict
from .torch import to_torch_state_dict as to_torch_state_dict
