"""Resumable quantization: after each finished unit, the quantizer state is written so that a killed run
continues from the last finished unit and ends exactly where an uninterrupted run would.

What is saved is all that reconstruction changes: every weight quantizer's scale, zero point and
hardened codes, every activation quantizer's step, zero point and "initialised" flag, the per-unit
report, the layers' bias corrections (``bias_shift``), and torch's global RNG state (every other
random stream is re-seeded per unit). The float weights and biases never change after preparation,
so they are not saved. ``meta.json`` is the commit point: the state file it names is written first,
then ``meta.json`` is replaced atomically.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .nn import QuantLayer
from .quantizers import ActQuantizer, WeightQuantizer

META = "meta.json"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed: it was made with different settings."""


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, WeightQuantizer):
            fields = ("scale", "zero_point", "codes")
        elif isinstance(m, ActQuantizer):
            fields = ("scale", "zero_point", "initialized")
        elif isinstance(m, QuantLayer) and m.bias_shift is not None:
            fields = ("bias_shift",)
        else:
            continue
        for field in fields:
            state[f"{name}.{field}"] = getattr(m, field).detach().cpu().clone()
    return state


@torch.no_grad()
def load_quantizer_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, m in model.named_modules():
        if isinstance(m, WeightQuantizer):
            device = m.scale.device
            for field in ("scale", "zero_point", "codes"):
                setattr(m, field, state[f"{name}.{field}"].to(device))
            m.alpha = None
        elif isinstance(m, ActQuantizer):
            m.scale.data = state[f"{name}.scale"].to(m.scale.device)
            m.zero_point.copy_(state[f"{name}.zero_point"])
            m.initialized.copy_(state[f"{name}.initialized"])
        elif isinstance(m, QuantLayer) and f"{name}.bias_shift" in state:
            m.bias_shift = state[f"{name}.bias_shift"].to(m.bias.device)


class Checkpoint:
    """The resume state of one quantization run in ``directory``, tied to ``identity`` (the settings
    that determine the result: a checkpoint made with other settings is refused, not mixed in)."""

    def __init__(self, directory: str | Path, identity: dict):
        self.dir = Path(directory)
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))

    def check(self) -> dict | None:
        """The saved metadata, if any, after checking that it was made with the same settings."""
        meta_path = self.dir / META
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        if meta["identity"] != self.identity:
            changed = sorted(k for k in set(meta["identity"]) | set(self.identity)
                             if meta["identity"].get(k) != self.identity.get(k))
            raise ResumeError(f"{self.dir} holds an unfinished run with different settings ({', '.join(changed)}); "
                              "rerun with the same arguments to resume, or pass --overwrite_output_dir to start fresh")
        return meta

    def load(self, model: nn.Module) -> tuple[int, list[dict]]:
        """Restore a saved state into ``model``: (units done, their report entries); (0, []) if none."""
        meta = self.check()
        if meta is None:
            return 0, []
        saved = torch.load(self.dir / meta["state"], map_location="cpu", weights_only=True)
        load_quantizer_state(model, saved["quantizers"])
        torch.set_rng_state(saved["rng"])
        return meta["units_done"], meta["units"]

    def save(self, model: nn.Module, units_done: int, units: list[dict]) -> None:
        if not distributed.is_main():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        state_name = f"state-{units_done:04d}.pt"
        tmp = self.dir / (state_name + ".tmp")
        torch.save({"quantizers": quantizer_state(model), "rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, self.dir / state_name)
        meta_tmp = self.dir / (META + ".tmp")
        meta_tmp.write_text(json.dumps({"identity": self.identity, "units_done": units_done, "units": units,
                                        "state": state_name}, indent=1))
        os.replace(meta_tmp, self.dir / META)
        for old in self.dir.glob("state-*.pt"):
            if old.name != state_name:
                old.unlink()

    def clear(self) -> None:
        if distributed.is_main():
            shutil.rmtree(self.dir, ignore_errors=True)
