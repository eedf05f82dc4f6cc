"""Units' weights moved to storage and back (SequentialConfig.offload_done, offload_pending)."""
from __future__ import annotations

import torch
from torch import nn

from diffptq.algo.driver.memory import move_module_tensors
from diffptq.models.units import Unit
from diffptq.quant.act import ActQuantizer


def _is_act_quantizer(module: nn.Module) -> bool:
    return isinstance(module, ActQuantizer)


class Offloader:
    """Moves units of `model` to `storage` and back to `device`: their parameters and buffers, but activation
    quantizers and tensors shared with modules outside the unit. `offloaded`: the units on storage now;
    `moved_bytes`: the bytes moved to storage since pop_bytes()."""

    def __init__(self, model: nn.Module, units: list[Unit], device: torch.device, storage: str):
        self.model, self.units, self.device, self.storage = model, units, device, storage
        self.offloaded: list[int] = []
        self.moved_bytes = 0

    def offload(self, k: int) -> None:
        """Move unit k's parameters and buffers to storage."""
        prefix = self.units[k].name + "."
        shared = {id(t) for name, m in self.model.named_modules(remove_duplicate=False)
                  if not (name + ".").startswith(prefix)
                  for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
        self.offloaded.append(k)  # first: a move that fails half-way is still undone
        self.moved_bytes += move_module_tensors(self.units[k].module, lambda t: t.to(self.storage), _is_act_quantizer,
                                                shared)

    def fetch(self, k: int) -> None:
        """Bring unit k back to the compute device if it is offloaded (a pending unit before its turn, or any at
        the end)."""
        if k in self.offloaded:
            move_module_tensors(self.units[k].module, lambda t: t.to(self.device), _is_act_quantizer)
            self.offloaded.remove(k)

    def pop_bytes(self) -> int:
        """Bytes moved to storage since the last call."""
        moved, self.moved_bytes = self.moved_bytes, 0
        return moved

    def restore(self) -> None:
        """Move every offloaded unit back to the compute device."""
        for k in list(self.offloaded):
            self.fetch(k)
