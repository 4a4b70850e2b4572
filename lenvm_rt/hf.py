"""transformers adapter: length guidance as a logits processor for `model.generate`.

    from lenvm_rt.hf import LengthGuidanceLogitsProcessor
    proc = LengthGuidanceLogitsProcessor("path/to/lenvm", policy_tokenizer="path/to/policy",
                                         length=LengthTarget.equal(128), top_k=15)
    model.generate(input_ids, logits_processor=LogitsProcessorList([proc]), do_sample=False)

Contract (input_ids[B, S], scores[B, V]) -> new scores[B, V]. The processor scores the top-k of
`scores` with its own value model, which keeps its own KV cache: each call commits the token that
`generate` appended since the previous call (recomputing it only when it was not a scored
candidate) and runs one lookahead forward of k candidates per row. The cache is rebuilt whenever
input_ids does not extend the previous call's by exactly one token per row.

The processor makes the choice itself, with the same rules and seeded counter-based draws as
`Runtime.generate` (candidates from softmax(scores), i.e. temperature 1), and returns 0 for the
chosen token and -inf elsewhere, so greedy and sampled generation both emit it. It is not
argmax-invariant and costs one value-model forward per step. It needs a separate LenVM (a backbone
directory with value_head.safetensors) that shares the policy's tokenizer (checked when
policy_tokenizer names the policy's directory): transformers does not hand hidden states to
logits processors, so a head on the policy's own trunk cannot be fed here.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .config import LengthTarget, Sampling
from .guidance import CandidateSettings, EosRule, Guidance, build_candidates
from .model import right_padded
from .selector import make_selector
from .tokenizer import Tokenizer
from .value_model import check_same_vocabulary, locate
from .values import ValueModel
from .weights import read_config


class LengthGuidanceLogitsProcessor:
    """Steer `transformers` generation toward a length target with a LenVM."""

    def __init__(self, value_model: str | os.PathLike[str], *, length: LengthTarget | None = None,
                 tilt: float | None = None, top_k: int = 15, seed: int = 0, max_new_tokens: int = 4096,
                 gamma: float | None = None, eos_token_ids: list[int] | None = None,
                 pad_token_id: int | None = None, policy_tokenizer: str | os.PathLike[str] | None = None,
                 device: str = "cpu") -> None:
        guidance = Guidance.of(length, tilt)
        if guidance is None:
            raise ValueError("pass length=LengthTarget... or tilt=β")
        source = locate(value_model)
        if source.backbone is None:
            raise ValueError("LengthGuidanceLogitsProcessor needs a separate LenVM (backbone directory with "
                             "value_head.safetensors); a head-only file needs the policy's hidden states")
        dev = torch.device(device)
        self.value = ValueModel.load_backbone(source, gamma=gamma, device=dev, dtype=torch.float32)
        tokenizer = Tokenizer(source.backbone)
        cfg = self.value.trunk.cfg
        if policy_tokenizer is not None:
            policy_dir = Path(policy_tokenizer)
            check_same_vocabulary(Tokenizer(policy_dir), tokenizer, read_config(policy_dir), cfg)
        self.sampling = Sampling(temperature=1.0, top_k=top_k, seed=seed)
        eos = list(eos_token_ids) if eos_token_ids is not None else list(cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        if not eos:
            raise ValueError("no EOS ids known; pass eos_token_ids=[...]")
        self.eos = frozenset(eos)
        self.guidance = guidance
        self.max_new_tokens = max_new_tokens
        self.pad_token_id = pad_token_id
        self.device = dev
        self._reset_state()

    def _reset_state(self) -> None:
        self._seen: torch.Tensor | None = None
        self._positions: list[int] = []
        self._cand: torch.Tensor | None = None
        self._selector = None
        self._settings: CandidateSettings | None = None
        self._eos_rule: EosRule | None = None
        self._step = 0

    def _start(self, input_ids: torch.Tensor) -> None:
        """(Re)build the value model's cache from input_ids[B, S], leading pads removed."""
        rows = []
        for row in input_ids.tolist():
            start = 0
            while self.pad_token_id is not None and start < len(row) - 1 and row[start] == self.pad_token_id:
                start += 1
            rows.append(row[start:])
        ids, lengths = right_padded(rows)
        B = len(rows)
        trunk = self.value.trunk
        trunk.allocate(batch=B, capacity=max(lengths) + self.max_new_tokens + 1)
        with torch.inference_mode():
            trunk.prefill(ids.to(self.device), lengths)
        self._positions = lengths
        self._settings = CandidateSettings.of([self.sampling] * B, self.eos, self.device)
        self._eos_rule = EosRule([self.guidance] * B, self.device)
        seeds = np.array([self.sampling.seed] * B, dtype=np.uint64)
        self._selector = make_selector([self.guidance] * B, [self.sampling] * B, seeds, self.max_new_tokens,
                                       self.value.gamma, self.eos, self.device)
        self._step = 0

    def _commit_last(self, input_ids: torch.Tensor) -> None:
        """Put the token generate appended since the last call into the value model's cache."""
        trunk = self.value.trunk
        last = input_ids[:, -1].to(self.device)
        match = self._cand == last.view(-1, 1)  # [B, K]
        with torch.inference_mode():
            if bool(match.any(dim=1).all()):
                trunk.commit(match.int().argmax(dim=1), self._positions)
            else:
                trunk.decode_step(last, self._positions)
        self._positions = [p + 1 for p in self._positions]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        extends = (self._seen is not None and input_ids.shape[0] == self._seen.shape[0]
                   and input_ids.shape[1] == self._seen.shape[1] + 1
                   and torch.equal(input_ids[:, :-1].cpu(), self._seen))
        if extends:
            self._commit_last(input_ids)
        else:
            self._start(input_ids)
        self._seen = input_ids.cpu().clone()
        B = input_ids.shape[0]
        ban, force = self._eos_rule.masks(self._step)
        with torch.inference_mode():
            cand, logp, _ = build_candidates(scores.float().to(self.device), self._settings, ban, force,
                                             self._eos_rule.ending(self._step))
            x = self.value.trunk.lookahead(cand, self._positions)  # [B, K, D]
            z = self.value.values(x.reshape(B * cand.shape[1], -1))[0].view(B, -1)
            slot, token = self._selector.step(cand, logp, z)
        self._cand = cand
        self._step += 1
        out = torch.full_like(scores, float("-inf"))
        rows = torch.arange(B, device=scores.device)
        out[rows, token.to(scores.device)] = 0.0
        return out
