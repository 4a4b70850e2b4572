"""Value read-outs: per-token values of a response, and predicted length from the prompt boundary.

Shapes: S sequence, D hidden, L response tokens. Position j of the trunk's output is the state that
ends at token j; the state s_0 ends at the last prompt token (LENVM.md §5), so a response of L tokens
has L + 1 states, s_0 … s_L. A state that ends with EOS is terminal: u = 0 and 0 tokens remain (R7).

    vm = ValueModel.load(source, policy_cfg, ...)      # configuration a (own trunk) or b (policy's)
    z, u = vm.values(x[R, D])                          # last hidden rows (pre final norm) -> fp32 [R]
    token_values(vm, trunk, prompt_ids, response_ids, eos_ids) -> TokenValues
    predict_lengths(vm, trunk, prompts) -> list[float]  # l̂ at s_0, EOS counted
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cpu_ops
from .config import ModelConfig
from .model import CausalLM, panel_packer, right_padded
from .tokenizer import Tokenizer
from .value_math import remaining_from_logit, td_residual
from .value_model import (
    ValueHeadWeights,
    ValueModelSource,
    check_same_vocabulary,
    load_value_head,
    read_gamma,
)
from .weights import load_weights, read_config


@dataclass(frozen=True)
class TokenValues:
    """Values along a response; list i describes the state after response token i.

    value           u = σ(z) ∈ [0, 1): larger means a longer predicted remainder (0 after EOS)
    remaining       predicted tokens left after token i, EOS counted (transformed-space horizon, not a
                    mean count: LENVM.md §1, Jensen caveat)
    td              δ_i = γ·u_i − u_{i−1} + (1−γ): > 0 where token i made the predicted remainder longer
    true_remaining  L − i when the response ends with EOS, else None
    """

    token_ids: list[int]
    tokens: list[str]
    logits: list[float]
    value: list[float]
    remaining: list[float]
    td: list[float]
    true_remaining: list[int] | None
    prompt_value: float
    prompt_remaining: float
    gamma: float


class ValueModel:
    """A value head plus the trunk it reads: its own (configuration a) or the policy's (b, trunk=None)."""

    def __init__(self, head: ValueHeadWeights, gamma: float, trunk: CausalLM | None, source: ValueModelSource,
                 eps: float) -> None:
        self.head = head
        self.gamma = gamma
        self.trunk = trunk
        self.source = source
        self._eps = eps
        self._final_norm: torch.Tensor | None = trunk.w.final_norm if trunk is not None else None

    @property
    def shared_trunk(self) -> bool:
        return self.trunk is None

    @staticmethod
    def load(source: ValueModelSource, policy: CausalLM, policy_tokenizer: Tokenizer, *, gamma: float | None,
             device: torch.device, dtype: torch.dtype) -> ValueModel:
        g = read_gamma(source, gamma)
        if source.backbone is None:
            head = load_value_head(source.head_file, policy.cfg.hidden_size, device=device, dtype=dtype)
            vm = ValueModel(head, g, None, source, policy.cfg.rms_norm_eps)
            vm._final_norm = policy.w.final_norm
            return vm
        cfg: ModelConfig = read_config(source.backbone)
        check_same_vocabulary(policy_tokenizer, Tokenizer(source.backbone), policy.cfg, cfg)
        return ValueModel.load_backbone(source, gamma=g, device=device, dtype=dtype)

    @staticmethod
    def load_backbone(source: ValueModelSource, *, gamma: float | None, device: torch.device,
                      dtype: torch.dtype) -> ValueModel:
        """A separate LenVM (configuration a) on its own, without a policy to check it against."""
        if source.backbone is None:
            raise ValueError(f"{source.head_file} is a head without a backbone; it needs the policy's trunk")
        g = read_gamma(source, gamma)
        cfg = read_config(source.backbone)
        head = load_value_head(source.head_file, cfg.hidden_size, device=device, dtype=dtype)
        weights = load_weights(source.backbone, cfg, device=device, dtype=dtype, with_lm_head=False,
                               pack=panel_packer(device, dtype))
        return ValueModel(head, g, CausalLM(cfg, weights), source, cfg.rms_norm_eps)

    def values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden rows x[R, D] of the value trunk (before its final norm) -> (z, u), fp32 [R].

        CPU fp32 rows take one native call (norm, skinny GEMM, silu and the output dot: csrc/value_head.h), which
        gives a row the same z in any batch; other devices and dtypes, and calls that need gradients, take
        `lenvm_rt.kernels.value_head` (Triton on CUDA, its torch reference elsewhere).
        """
        from .kernels.value_head import value_head

        h = self.head
        if (x.device.type == "cpu" and x.dtype == h.w1.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or h.w1.requires_grad))):
            z = cpu_ops.value_head(x, self._final_norm, self._eps, h.w1, h.b1, h.w2.reshape(-1), float(h.b2))
            return z, torch.sigmoid(z)
        return value_head(x, self._final_norm, h.w1, h.b1, h.w2, h.b2, eps=self._eps)


def _trunk(vm: ValueModel, policy: CausalLM) -> CausalLM:
    return policy if vm.trunk is None else vm.trunk


def token_values(vm: ValueModel, policy: CausalLM, tokenizer: Tokenizer, prompt_ids: list[int],
                 response_ids: list[int], eos_ids: frozenset[int]) -> TokenValues:
    """Values of every state from the last prompt token through the end of the response, in one forward."""
    if not response_ids:
        raise ValueError("response is empty; token_values needs at least one response token")
    trunk = _trunk(vm, policy)
    ids = prompt_ids + response_ids
    P, S = len(prompt_ids), len(ids)
    trunk.allocate(batch=1, capacity=S)
    with torch.inference_mode():
        x = trunk.prefill(torch.tensor([ids], device=trunk.device), [S], all_positions=True)[0]  # [S, D]
        z, u = vm.values(x[P - 1:])  # states s_0 .. s_L, [L + 1]
    ended = response_ids[-1] in eos_ids
    z_list, u_list = z.tolist(), u.tolist()
    remaining = remaining_from_logit(z.double(), vm.gamma).tolist()
    if ended:  # the terminal state: return 0 exactly
        u_list[-1], remaining[-1] = 0.0, 0.0
    td = [td_residual(u_list[i], u_list[i + 1], vm.gamma) for i in range(len(response_ids))]
    L = len(response_ids)
    return TokenValues(
        token_ids=list(response_ids),
        tokens=[tokenizer.decode([t], skip_special_tokens=False) for t in response_ids],
        logits=z_list[1:],
        value=u_list[1:],
        remaining=remaining[1:],
        td=td,
        true_remaining=[L - 1 - i for i in range(L)] if ended else None,
        prompt_value=u_list[0],
        prompt_remaining=remaining[0],
        gamma=vm.gamma,
    )


def predict_lengths(vm: ValueModel, policy: CausalLM, prompts: list[list[int]]) -> list[float]:
    """Predicted generation length (EOS counted) from each prompt's boundary state, one batched prefill."""
    trunk = _trunk(vm, policy)
    ids, lengths = right_padded(prompts)
    trunk.allocate(batch=len(prompts), capacity=max(lengths))
    with torch.inference_mode():
        z, _ = vm.values(trunk.prefill(ids.to(trunk.device), lengths))
    return remaining_from_logit(z.double(), vm.gamma).tolist()
