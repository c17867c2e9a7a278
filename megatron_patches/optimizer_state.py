"""Checkpoint loading for megatron-core's torch-Adam fallback (no Apex, no TransformerEngine).

Written against megatron-core 0.16.1. Without Apex or TE (CPU runs; GPU machines without TE) the
optimizer is `torch.optim.Adam`, which keeps a per-parameter `step` tensor. Two places of the
'fully_reshardable' load path do not expect that:

1. `DistributedOptimizer.sharded_state_dict(is_loading=True)` calls `state_dict()` on the fresh,
   never-stepped optimizer, which asserts that all parameters share one `step`; a fresh torch Adam
   has no state at all. `init_empty_adam_state` creates the state a first step would create
   (zeros, step 0); the load overwrites it.
2. `_set_main_param_and_optimizer_states` copies every key of the parameter's current state from
   the loaded tensors, but the checkpoint stores `step` in the param groups, not per parameter
   (KeyError 'step'). The wrapper keeps the `step` that `load_state_dict` already restored.
3. `load_state_dict` assigns ONE step tensor object to every parameter's state; torch Adam then
   increments it in place once per parameter per step, so bias correction after a resume is wrong
   (resumed losses drift from the uninterrupted run's from the second step on). Each parameter
   gets its own copy.

1 is a helper that `solo.checkpoint.load_checkpoint` calls before a load; 2 and 3 are applied by
`megatron_patches.apply` (idempotent). Both are on load paths only (`load_state_dict`,
`load_parameter_state_from_*`), so a run that never resumes is untouched.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

_original_set_states = DistributedOptimizer._set_main_param_and_optimizer_states


def _set_states_keeping_step(self, model_param, tensors):
    if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        if "step" in state:
            tensors = {**tensors, "step": state["step"]}
    return _original_set_states(self, model_param, tensors)


_original_load_state_dict = DistributedOptimizer.load_state_dict


def _load_state_dict_with_own_steps(self, state_dict):
    _original_load_state_dict(self, state_dict)
    for state in self.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def apply() -> None:
    """Idempotent: the originals are captured once, at import."""
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_states_keeping_step
    DistributedOptimizer.load_state_dict = _load_state_dict_with_own_steps


def _torch_optimizers(optimizer):
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(inner, "optimizer", None) is not None:
            yield inner.optimizer


def init_empty_adam_state(optimizer) -> None:
    for torch_optimizer in _torch_optimizers(optimizer):
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
