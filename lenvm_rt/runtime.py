"""`load()` and `Runtime`: the public decoding API.

    rt = lenvm_rt.load("path/to/checkpoint" | "org/name" | "default", value_model=None, device=None, dtype=None)
    rt.generate(prompt, *, max_new_tokens=256, sampling=Sampling(), length=None, tilt=None, top_logprobs=0)
        -> Generation
    rt.generate_batch(prompts, *, max_new_tokens=256, sampling=..., length=..., tilt=..., top_logprobs=...)
        -> list[Generation]
    for event in rt.stream(prompt, *, ...): event.token_id, event.text, event.remaining
    rt.token_values(prompt, response) -> TokenValues;  rt.predict_length(prompts) -> list[float];  rt.gamma
    rt.text_quality(prompt, response) -> TextQuality (the policy's own NLL / rank / probability, 4-gram repetition)

A prompt is text (encoded as is, with the tokenizer's own special tokens), a list of chat messages
(rendered with the checkpoint's chat template and a generation prompt), or a list of token ids.
Generation stops at any EOS id (union of config, generation config and tokenizer EOS) or after
max_new_tokens. Inputs are validated before any work starts, so a rejected request leaves the
runtime as it was.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Generation, LengthTarget, ModelConfig, Sampling
from .decode import Emitted, decode
from .guidance import Guidance
from .model import CausalLM, panel_packer
from .quality import TextQuality, text_quality
from .tokenizer import IncrementalDecoder, Message, Tokenizer
from .value_model import locate
from .values import TokenValues, ValueModel, predict_lengths, token_values
from .weights import load_weights, read_config, resolve_checkpoint

Prompt = str | Sequence[Message] | Sequence[int]
DEFAULT_CONTEXT = 4096
MAX_TOP_LOGPROBS = 20  # most probable alternatives a request may ask for at each step


@dataclass(frozen=True)
class StreamEvent:
    """One generated token: its id, the text it completes (may be "" mid-character; the texts of a stream join to
    Generation.text), its index."""

    token_id: int
    text: str
    index: int
    finish_reason: str | None  # set on the last event
    remaining: float | None = None  # predicted tokens left after this one (EOS counted); needs a value model
    logprob: float | None = None  # log p of the token under the policy's logits of its step (temperature 1)
    rank: int | None = None  # the token's 1-based rank there (1 + tokens strictly more likely)
    top_logprobs: list[tuple[int, float]] | None = None  # the step's most probable tokens (id, log p), if asked


def top_logprobs_counts(top_logprobs: Any, n: int) -> list[int]:
    """How many alternatives each of n rows asks for: one int for all rows or a list of n."""
    counts = list(top_logprobs) if isinstance(top_logprobs, (list, tuple)) else [top_logprobs] * n
    if len(counts) != n:
        raise ValueError(f"top_logprobs must be a single int or a list of {n}")
    for c in counts:
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an int in [0, {MAX_TOP_LOGPROBS}]; got {c!r}")
    return counts


@dataclass(frozen=True)
class _Request:
    """A validated decode request: one entry per row."""

    encoded: list[list[int]]
    samplings: list[Sampling]
    guidances: list[Guidance | None]
    top_logprobs: list[int]
    max_new_tokens: int


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be like 'cpu' or 'cuda:0'; got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda; got {device!r}")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _pick_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype is None:
        if device.type == "cpu":
            return torch.float32  # CPU matmuls are fastest and exact in fp32
        return _DTYPES[cfg.torch_dtype] if cfg.torch_dtype != "float32" else torch.bfloat16
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype!r}")


def load(policy: str | os.PathLike[str], value_model: str | os.PathLike[str] | None = None,
         device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, *,
         gamma: float | None = None, max_context: int | None = None) -> Runtime:
    """Load a policy checkpoint (directory, hub id or "default": the embedded SmolLM2-135M-Instruct).

    value_model: a LenVM directory (backbone + value_head.safetensors: a separate value model), a
    value_head.safetensors file / head-only directory (a head on the policy's own trunk), or "default":
    the head shipped for the default model (trained on its frozen trunk; only with that policy). gamma
    overrides the discount recorded in the value model's checkpoint (required when it has none).
    """
    if str(policy) == "default":
        from .default_model import default_model_dir

        directory = default_model_dir()
    else:
        directory = resolve_checkpoint(policy)
    cfg = read_config(directory)
    dev = _pick_device(device)
    torch_dtype = _pick_dtype(dtype, cfg, dev)
    context = max_context if max_context is not None else min(cfg.max_position_embeddings, DEFAULT_CONTEXT)
    if not isinstance(context, int) or isinstance(context, bool) or context <= 1:
        raise ValueError(f"max_context must be an int > 1; got {max_context!r}")
    tokenizer = Tokenizer(directory)
    if value_model is None and gamma is not None:
        raise ValueError("gamma was given without a value model")
    if value_model is not None and str(value_model) == "default":
        from .default_model import default_head_dir

        value_model = default_head_dir(directory)
    source = locate(value_model) if value_model is not None else None
    model = CausalLM(cfg, load_weights(directory, cfg, device=dev, dtype=torch_dtype,
                                       pack=panel_packer(dev, torch_dtype)))
    value = None
    if source is not None:
        value = ValueModel.load(source, model, tokenizer, gamma=gamma, device=dev, dtype=torch_dtype)
    return Runtime(model, tokenizer, directory=directory, max_context=context, value=value)


class Runtime:
    """A loaded model with its tokenizer; create with `load()`."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, *, directory: Path, max_context: int,
                 value: ValueModel | None = None) -> None:
        self.model = model
        self.value = value
        self.tokenizer = tokenizer
        self.config = model.cfg
        self.directory = directory
        self.max_context = min(max_context, model.cfg.max_position_embeddings)
        eos = list(model.cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def gamma(self) -> float | None:
        """The value model's discount γ (checkpoint metadata), or None without a value model."""
        return self.value.gamma if self.value is not None else None

    def _value_model(self, what: str) -> ValueModel:
        if self.value is None:
            raise ValueError(f"{what} needs a value model; call load(..., value_model=...)")
        return self.value

    # ---- value read-outs ------------------------------------------------------------------------
    def token_values(self, prompt: Prompt, response: str | Sequence[int], *, append_eos: bool = False) -> TokenValues:
        """Value, predicted remaining tokens and TD residual after every response token.

        response is text (encoded without special tokens) or token ids; append_eos marks a finished
        response, which also yields the true remaining counts.
        """
        vm = self._value_model("token_values")
        prompt_ids = self.encode(prompt)
        if isinstance(response, str):
            response_ids = self.tokenizer.encode(response, add_special_tokens=False)
        elif isinstance(response, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in response):
            response_ids = list(response)
        else:
            raise ValueError(f"response must be text or a list of token ids; got {type(response).__name__}")
        if append_eos and response_ids:
            response_ids.append(min(self.eos_token_ids))
        bad = [t for t in response_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"response token ids must lie in [0, {self.config.vocab_size}); got {bad[:5]}")
        total = len(prompt_ids) + len(response_ids)
        if total > self.max_context:
            raise ValueError(f"prompt + response ({total} tokens) exceed the context of {self.max_context} tokens")
        return token_values(vm, self.model, self.tokenizer, prompt_ids, response_ids, self.eos_token_ids)

    def text_quality(self, prompt: Prompt, response: str | Sequence[int]) -> TextQuality:
        """The policy's own NLL, rank and probability of a response's tokens, and its 4-gram repetition.

        response is text (encoded without special tokens) or token ids; a trailing EOS id is scored
        (lenvm_rt/quality.py). Needs no value model; ValueError on an empty or too long response.
        """
        prompt_ids = self.encode(prompt)
        if isinstance(response, str):
            response = self.tokenizer.encode(response, add_special_tokens=False)
        return text_quality(self.model, prompt_ids, response, self.eos_token_ids, max_context=self.max_context)

    def predict_length(self, prompts: Prompt | Sequence[Prompt]) -> list[float]:
        """Predicted generation length (tokens, EOS counted) of each prompt, from its boundary state.

        A single prompt (text, messages or ids) is treated as a batch of one. The prediction is a
        transformed-space horizon softplus(z)/(-ln γ) (LENVM.md §5), not a mean token count.
        """
        vm = self._value_model("predict_length")
        single = isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and not isinstance(
            prompts[0], (str, list, tuple)))
        items = [prompts] if single else list(prompts)
        if not items:
            raise ValueError("prompts must not be empty")
        encoded = [self.encode(p) for p in items]
        for ids in encoded:
            if len(ids) > self.max_context:
                raise ValueError(f"prompt ({len(ids)} tokens) exceeds the context of {self.max_context} tokens")
        return predict_lengths(vm, self.model, encoded)

    # ---- prompts --------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt, a chat (messages) or ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.encode_chat(prompt)  # type: ignore[arg-type]
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)  # type: ignore[arg-type]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got {bad[:5]}")
        else:
            raise ValueError("prompt must be text, a list of chat messages ({'role', 'content'}) or a list "
                             f"of token ids; got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty (it encodes to no tokens)")
        return ids

    def _check_budget(self, n_prompt: int, max_new_tokens: Any) -> None:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
        if n_prompt + max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                f"{self.max_context} tokens"
            )

    # ---- decoding -------------------------------------------------------------------------------
    def _guidances(self, length: Any, tilt: Any, n: int) -> list[Guidance | None]:
        lengths = list(length) if isinstance(length, (list, tuple)) else [length] * n
        tilts = list(tilt) if isinstance(tilt, (list, tuple)) else [tilt] * n
        if len(lengths) != n or len(tilts) != n:
            raise ValueError(f"length and tilt must be single values or lists of {n}")
        guidances = [Guidance.of(ln, tl) for ln, tl in zip(lengths, tilts)]
        if any(g is not None for g in guidances):
            self._value_model("length guidance")
        return guidances

    def _samplings(self, sampling: Sampling | Sequence[Sampling], n: int) -> list[Sampling]:
        if isinstance(sampling, Sampling):
            return [sampling] * n
        items = list(sampling) if isinstance(sampling, (list, tuple)) else []
        if len(items) != n or not all(isinstance(s, Sampling) for s in items):
            raise ValueError(f"sampling must be a Sampling or a list of {n} Sampling objects")
        return items

    def _prepare(self, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Any, length: Any, tilt: Any,
                 top_logprobs: Any) -> _Request:
        """Validate everything before any work starts; a rejected request changes nothing."""
        encoded = [self.encode(p) for p in prompts]
        for ids in encoded:
            self._check_budget(len(ids), max_new_tokens)
        n = len(encoded)
        return _Request(encoded, self._samplings(sampling, n), self._guidances(length, tilt, n),
                        top_logprobs_counts(top_logprobs, n), max_new_tokens)

    def _decode(self, req: _Request) -> Iterator[list[Emitted | None]]:
        return decode(self.model, self.value, req.encoded, req.samplings, req.guidances, req.max_new_tokens,
                      self.eos_token_ids, self.max_context, top_logprobs=req.top_logprobs)

    def generate_batch(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 256,
                       sampling: Sampling | Sequence[Sampling] = Sampling(),
                       length: LengthTarget | Sequence[LengthTarget | None] | None = None,
                       tilt: float | Sequence[float | None] | None = None,
                       top_logprobs: int | Sequence[int] = 0) -> list[Generation]:
        """Decode several prompts together; each result equals the prompt decoded alone.

        sampling, length, tilt and top_logprobs take one value for every row or a list with one per row;
        rows with neither length nor tilt are unguided and keep their own sampling filters.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of prompts")
        req = self._prepare(prompts, max_new_tokens, sampling, length, tilt, top_logprobs)
        B = len(req.encoded)
        outputs: list[list[int]] = [[] for _ in range(B)]
        values: list[list[float]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        ranks: list[list[int]] = [[] for _ in range(B)]
        tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        start = time.perf_counter()
        first_token_at = start
        for step, emitted in enumerate(self._decode(req)):
            if step == 0:
                first_token_at = time.perf_counter()
            for b, item in enumerate(emitted):
                if item is not None:
                    outputs[b].append(item.token)
                    logprobs[b].append(item.logprob)
                    ranks[b].append(item.rank)
                    reasons[b] = item.finish_reason or reasons[b]
                    if item.remaining is not None:
                        values[b].append(item.remaining)
                    if item.top is not None:
                        tops[b].append(item.top)
        end = time.perf_counter()
        return [
            Generation(
                text=self.tokenizer.decode(out),
                token_ids=out,
                num_tokens=len(out),
                finish_reason=reasons[b],
                prompt_tokens=len(req.encoded[b]),
                prefill_seconds=first_token_at - start,
                decode_seconds=end - first_token_at,
                values=values[b],
                token_logprobs=logprobs[b],
                token_ranks=ranks[b],
                top_logprobs=tops[b],
            )
            for b, out in enumerate(outputs)
        ]

    def generate(self, prompt: Prompt, *, max_new_tokens: int = 256, sampling: Sampling = Sampling(),
                 length: LengthTarget | None = None, tilt: float | None = None, top_logprobs: int = 0) -> Generation:
        """Decode one prompt; `length` or `tilt` steer it with the value model; top_logprobs (0-20) also records
        each step's most probable tokens (Generation.top_logprobs)."""
        if not isinstance(sampling, Sampling):
            raise ValueError(f"sampling must be a Sampling; got {type(sampling).__name__}")
        return self.generate_batch([prompt], max_new_tokens=max_new_tokens, sampling=sampling, length=length,
                                   tilt=tilt, top_logprobs=top_logprobs_counts([top_logprobs], 1))[0]

    def stream(self, prompt: Prompt, *, max_new_tokens: int = 256, sampling: Sampling = Sampling(),
               length: LengthTarget | None = None, tilt: float | None = None,
               top_logprobs: int = 0) -> Iterator[StreamEvent]:
        """Yield each token as it is generated, with the live predicted remaining length when a value
        model is loaded; the last event carries the finish reason."""
        if not isinstance(sampling, Sampling):
            raise ValueError(f"sampling must be a Sampling; got {type(sampling).__name__}")
        return self._stream(self._prepare([prompt], max_new_tokens, sampling, length, tilt,
                                          top_logprobs_counts([top_logprobs], 1)))

    def _stream(self, req: _Request) -> Iterator[StreamEvent]:
        decoder = IncrementalDecoder(self.tokenizer)
        for index, emitted in enumerate(self._decode(req)):
            item: Emitted = emitted[0]  # type: ignore[assignment]  # a lone row runs until it ends, never None
            text = decoder.push(item.token) + (decoder.finish() if item.finish_reason is not None else "")
            yield StreamEvent(token_id=item.token, text=text, index=index, finish_reason=item.finish_reason,
                              remaining=item.remaining, logprob=item.logprob, rank=item.rank, top_logprobs=item.top)
