"""The PEFT side of `speed.py`: a torch model of `layers` bare `q_proj` linears with the
adapters loaded by PEFT's own loader. Imports only torch and peft, so the fresh PEFT process
of the cold-command comparison loads nothing of ours but this file."""

from __future__ import annotations


def build_peft_model(dirs, names, d: int, layers: int):
    import torch
    from peft import PeftModel
    from torch import nn

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.utils.skip_init(nn.Linear, d, d, bias=False)

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer() for _ in range(layers)])

    model = PeftModel.from_pretrained(Base(), str(dirs[0]), adapter_name=names[0])
    for name, path in zip(names[1:], dirs[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
    return model
