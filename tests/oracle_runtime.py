"""A runtime whose value model is an oracle with known answers, for end-to-end guided-decoding tests.

The oracle LenVM's single layer has its output projections zeroed, so the hidden state of a candidate is its
embedding row and the oracle can read the candidate's token id back from it. It predicts r(t) = ORACLE[t] tokens
left after a non-EOS token t. With `eos_on_top`, the policy's logits get +30 on EOS so that EOS is its most
probable token at every step: every candidate set contains EOS, and the rules alone decide when to stop.
"""
from __future__ import annotations

from pathlib import Path

import torch
from checkpoints import make_checkpoint, make_value_head

import lenvm_rt
from lenvm_rt.cpu_ops import PanelWeight
from lenvm_rt.value_math import logit_of_length
from lenvm_rt.values import ValueModel

EOS = 2
GAMMA = 0.98
ORACLE = (torch.arange(384) * 7 % 40 + 1).double()  # r(t) in 1..40


class OracleValues(ValueModel):
    """z = logit_of_length(r(token)) for the token whose embedding row is x."""

    def values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embed = self.trunk.w.embed
        embed = embed.unpacked() if isinstance(embed, PanelWeight) else embed.float()
        token = torch.cdist(x.float(), embed).argmin(dim=-1)
        z = logit_of_length(ORACLE[token], self.gamma).float()
        return z, torch.sigmoid(z)


def oracle_runtime(root: Path, eos_on_top: bool) -> lenvm_rt.Runtime:
    policy = make_checkpoint(root / "policy", "llama", seed=1)
    value = make_checkpoint(root / "lenvm", "llama", seed=2, tied=True, layers=1)
    make_value_head(value / "value_head.safetensors", 64, gamma=GAMMA)
    runtime = lenvm_rt.load(policy, value_model=value, device="cpu")
    vm = runtime.value
    layer = vm.trunk.w.layers[0]
    for matrix in (layer.o, layer.down):  # in place, so the native trunk reads the zeros too: hidden = embedding
        (matrix.panels if isinstance(matrix, PanelWeight) else matrix).zero_()
    runtime.value = OracleValues(vm.head, vm.gamma, vm.trunk, vm.source, 1e-5)
    if eos_on_top:
        policy_logits = runtime.model.logits
        boost = torch.zeros(384)
        boost[EOS] = 30.0

        def logits_with_eos_on_top(x: torch.Tensor) -> torch.Tensor:
            return policy_logits(x) + boost

        runtime.model.logits = logits_with_eos_on_top
    return runtime
