"""The DPO reference model, built from the policy as loaded (before any adapter or step).

``copy``: a full frozen copy (what TRL builds). ``shared``: a copy in which every tensor that never trains *is* the
policy's tensor (``copy.deepcopy`` with those parameters in its memo), so the reference's own memory is the initial
copies of what trains at some point (stacks, head, final norm); its forward takes the policy's hidden state at the
phase's cut (see :mod:`hf_stackwise.schedule.reference`) and runs only the blocks above it. Built before PEFT wraps
the policy, the reference has no adapters: with LoRA it is the base with adapters disabled, PEFT's way.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..rack.rack import arranged


def frozen_copy(model: nn.Module, share: list[nn.Parameter] = ()) -> nn.Module:
    """A frozen eval-mode copy of ``model`` whose parameters in ``share`` are the model's own tensors."""
    shared = {id(p): p for p in share}
    reference = copy.deepcopy(model, memo=dict(shared))
    for param in reference.parameters():
        if id(param) not in shared:
            param.requires_grad_(False)
    return reference.eval()


def own_bytes(reference: nn.Module, policy: nn.Module) -> int:
    """Bytes of the reference's parameters and buffers that the policy does not hold (what the reference costs)."""
    theirs = {id(t) for t in (*policy.parameters(), *policy.buffers())}
    tensors = {id(t): t for t in (*reference.parameters(), *reference.buffers()) if id(t) not in theirs}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _FromCut(nn.Module):
    """Stands at a prefix position of the reference's block list: passes the hidden state through, and at the last
    prefix position returns the policy's hidden state at the cut."""

    def __init__(self, bridge: SharedPrefix, last: bool):
        super().__init__()
        self.__dict__["bridge"] = bridge
        self.last = last

    def forward(self, hidden_states, *args, **kwargs):
        if not self.last:
            return hidden_states
        return self.bridge.take()


class SharedPrefix:
    """Carries the policy's hidden state at the cut into the reference's forward.

    ``capture(policy_blocks, cut)`` hooks the policy's block ``cut - 1`` for one loss computation (TRL runs the
    policy's forward, then the reference's, on the same batch: DPO's concatenated chosen/rejected rows; KTO's KL
    batch, then its completions, in the same order for both); the reference's forward, patched by :meth:`install`,
    runs its blocks from ``cut`` on the oldest state not yet taken."""

    def __init__(self, layers_path: str, num_blocks: int):
        self.layers_path = layers_path
        self.num_blocks = num_blocks
        self.cut = 0
        self.states: list = []

    def take(self):
        if not self.states:
            raise RuntimeError("hf_stackwise: the shared reference ran before the policy's forward gave its prefix")
        return self.states.pop(0)

    @contextlib.contextmanager
    def capture(self, blocks: nn.ModuleList, cut: int):
        """Record the output of ``blocks[cut - 1]`` during the policy's forward (nothing when the cut is 0)."""
        self.cut, self.states = cut, []
        if cut == 0:
            yield
            return

        def keep(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            self.states.append((value.detach(),) if isinstance(output, tuple) else value.detach())

        handle = blocks[cut - 1].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()
            self.states = []

    def install(self, reference: nn.Module) -> None:
        """Patch ``reference.forward`` (TRL's fused-head forward): above the cut only, from the captured state."""
        forward = reference.forward
        bridge = self

        def from_cut(*args, **kwargs):
            if bridge.cut == 0:
                return forward(*args, **kwargs)
            positions = {p: _FromCut(bridge, p == bridge.cut - 1) for p in range(bridge.cut)}
            with torch.no_grad(), arranged(reference, bridge.layers_path, list(range(bridge.num_blocks)), positions):
                return forward(*args, **kwargs)

        reference.forward = from_cut
