"""Text quality of a response, judged by the unguided policy itself: length control must not ruin the text.

Shapes: B rows, P prompt tokens, L response tokens, S = P + L, D hidden, V vocabulary.

    q = text_quality(model, prompt_ids, response_ids, eos_ids)            # -> TextQuality
    q = quality_of_steps(token_ids, logprobs, ranks, eos_ids)             # from the decode loop's own logits
    qs = batch_quality(model, prompts_ids, responses_ids, eos_ids, batch=8)  # one per response, same order
    summarize_quality(qs) -> {"nll", "mean_rank", "mean_prob", "repetition_rate", "tokens", "n"}  (means)

Contract:
- One forward of prompt + response (right-padded prefill of x[B, S, D] at every position, no sampling
  filters, temperature 1); the state ending at position P − 1 + i scores response token i, so L tokens
  take the logits [L, V] of positions P − 1 … S − 2 (computed in blocks of POSITION_BLOCK positions).
  Guided, tilted and unguided responses are all judged by this same unguided distribution.
- nll: mean −log p(token) over the L response tokens, in nats; mean_prob: mean p(token); mean_rank:
  mean 1-based rank of each token in its distribution (1 + the number of tokens strictly more likely).
  A trailing EOS is scored like any token (it is part of what the policy generated); an EOS anywhere
  else is refused, since generation stops at the first one.
- repetition_rate: the share of the response's 4-grams of token ids that repeat an earlier 4-gram of the
  same response, over the response without its trailing EOS; 0 for fewer than 5 such tokens.
- Bad input (an empty prompt or response, ids outside [0, V), an EOS before the end, prompt + response
  longer than the context) raises ValueError before any work. The forward overwrites the model's KV cache
  rows 0..B−1: do not call it while a generation of the same model is being streamed.
- quality_of_steps computes the same measures from the log-probability and rank of each generated token under
  the policy's logits at its decoding step (Generation.token_logprobs / token_ranks): the same unguided
  distribution at temperature 1 without filters, so no second forward; equal to text_quality up to float
  rounding between the decode and prefill paths.
- summarize_quality averages per response (each response counts once, whatever its length); items
  without quality (None, or records written before these fields existed) are left out and counted out
  of `n`.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .model import CausalLM, right_padded

NGRAM = 4
POSITION_BLOCK = 256  # logits rows computed at once: bounds the [rows, V] fp32 buffer
FIELDS = ("nll", "mean_rank", "mean_prob", "repetition_rate")


@dataclass(frozen=True)
class TextQuality:
    """Quality of one response under the unguided policy (see the module contract)."""

    nll: float  # mean negative log-likelihood per token, nats
    mean_rank: float  # mean 1-based rank of the chosen tokens
    mean_prob: float  # mean probability of the chosen tokens
    repetition_rate: float  # share of 4-grams repeating an earlier one, in [0, 1)
    tokens: int  # response tokens scored (a trailing EOS included)
    ended: bool  # the response ends with an EOS id

    def fields(self) -> dict[str, float]:
        """The four per-record measures, as the eval records store them."""
        return {k: v for k, v in asdict(self).items() if k in FIELDS}


def repetition_rate(ids: Sequence[int], n: int = NGRAM) -> float:
    """Share of the n-grams of `ids` equal to an earlier n-gram of `ids`; 0 when len(ids) <= n."""
    if len(ids) <= n:
        return 0.0
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams)


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _check(model: CausalLM, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
           eos_ids: Iterable[int], max_context: int | None) -> tuple[list[list[int]], list[list[int]]]:
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    vocab = model.cfg.vocab_size
    context = model.cfg.max_position_embeddings if max_context is None else min(max_context,
                                                                                model.cfg.max_position_embeddings)
    eos = set(eos_ids)
    out_p, out_r = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        where = f"response {i}: " if len(prompts) > 1 else ""
        for name, ids in (("prompt", p), ("response", r)):
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not all(map(_is_id, ids)):
                raise ValueError(f"{where}the {name} must be a list of token ids")
            if not ids:
                raise ValueError(f"{where}the {name} is empty; text quality needs at least one {name} token")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{where}{name} token ids must lie in [0, {vocab}); got {bad[:5]}")
        inner = [j for j, t in enumerate(r[:-1]) if t in eos]
        if inner:
            raise ValueError(f"{where}the response holds an EOS id at position {inner[0]} before its end; generation "
                             "stops at the first EOS")
        if len(p) + len(r) > context:
            raise ValueError(f"{where}prompt + response ({len(p) + len(r)} tokens) exceed the context of {context} "
                             "tokens")
        out_p.append(list(p))
        out_r.append(list(r))
    return out_p, out_r


def _score_rows(model: CausalLM, prompts: list[list[int]], responses: list[list[int]],
                eos: frozenset[int]) -> list[TextQuality]:
    """One prefill of the right-padded prompt + response rows -> one TextQuality per row."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids, lengths = right_padded(seqs)
    model.allocate(batch=len(seqs), capacity=max(lengths))
    out = []
    with torch.inference_mode():
        x = model.prefill(ids.to(model.device), lengths, all_positions=True)  # [B, S, D]
        for b, (p, r) in enumerate(zip(prompts, responses)):
            target = torch.tensor(r, device=model.device)
            logp_sum, prob_sum, rank_sum = 0.0, 0.0, 0
            for start in range(0, len(r), POSITION_BLOCK):
                stop = min(start + POSITION_BLOCK, len(r))
                rows = x[b, len(p) - 1 + start:len(p) - 1 + stop]  # states that predict tokens start..stop-1
                logp = torch.log_softmax(model.logits(rows).float(), dim=-1)  # [l, V]
                chosen = logp.gather(1, target[start:stop, None])  # [l, 1]
                logp_sum += chosen.double().sum().item()
                prob_sum += chosen.double().exp().sum().item()
                rank_sum += int((logp > chosen).sum().item()) + (stop - start)
            n = len(r)
            ended = r[-1] in eos
            out.append(TextQuality(nll=-logp_sum / n, mean_rank=rank_sum / n, mean_prob=prob_sum / n,
                                   repetition_rate=repetition_rate(r[:-1] if ended else r), tokens=n, ended=ended))
    return out


def quality_of_steps(token_ids: Sequence[int], logprobs: Sequence[float], ranks: Sequence[int],
                     eos_ids: Iterable[int]) -> TextQuality:
    """TextQuality from per-token log-probabilities and 1-based ranks recorded while decoding."""
    n = len(token_ids)
    if n == 0 or len(logprobs) != n or len(ranks) != n:
        raise ValueError(f"need one log-probability and one rank per token; got {n} tokens, {len(logprobs)} "
                         f"log-probabilities, {len(ranks)} ranks")
    ended = token_ids[-1] in set(eos_ids)
    return TextQuality(nll=-math.fsum(logprobs) / n, mean_rank=sum(ranks) / n,
                       mean_prob=math.fsum(math.exp(lp) for lp in logprobs) / n,
                       repetition_rate=repetition_rate(list(token_ids[:-1] if ended else token_ids)), tokens=n,
                       ended=ended)


def generation_fields(generation: Any, eos_ids: Iterable[int]) -> dict[str, float | None]:
    """The four measures of a Generation as eval-record fields, from its decoding-step statistics."""
    if not generation.token_ids:
        return dict.fromkeys(FIELDS)
    return dict(quality_of_steps(generation.token_ids, generation.token_logprobs, generation.token_ranks,
                                 eos_ids).fields())


def batch_quality(model: CausalLM, prompts_ids: Sequence[Sequence[int]], responses_ids: Sequence[Sequence[int]],
                  eos_ids: Iterable[int], batch: int = 8, *, max_context: int | None = None) -> list[TextQuality]:
    """TextQuality of each (prompt, response) pair, `batch` pairs per forward; ValueError on bad input.

    max_context (default: the model's max_position_embeddings) bounds prompt + response.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1; got {batch!r}")
    eos = frozenset(eos_ids)
    prompts, responses = _check(model, prompts_ids, responses_ids, eos, max_context)
    out: list[TextQuality] = []
    for start in range(0, len(prompts), batch):
        out += _score_rows(model, prompts[start:start + batch], responses[start:start + batch], eos)
    return out


def text_quality(model: CausalLM, prompt_ids: Sequence[int], response_ids: Sequence[int], eos_ids: Iterable[int],
                 *, max_context: int | None = None) -> TextQuality:
    """TextQuality of one response to one prompt (token ids); ValueError on bad input."""
    return batch_quality(model, [prompt_ids], [response_ids], eos_ids, 1, max_context=max_context)[0]


def _value(item: TextQuality | Mapping[str, Any], key: str) -> float | None:
    v = getattr(item, key) if isinstance(item, TextQuality) else item.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def summarize_quality(items: Iterable[TextQuality | Mapping[str, Any] | None]) -> dict[str, float | int | None]:
    """Per-response means of nll, mean_rank, mean_prob, repetition_rate (and tokens where known), and n.

    Items are TextQuality objects or records holding the fields; those without an nll are left out.
    Every mean is None when n is 0.
    """
    rows = [item for item in items if item is not None and _value(item, "nll") is not None]
    out: dict[str, float | int | None] = {}
    for key in (*FIELDS, "tokens"):
        values = [v for v in (_value(item, key) for item in rows) if v is not None]
        out[key] = statistics.fmean(values) if values else None
    out["n"] = len(rows)
    return out
