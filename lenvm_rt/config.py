"""Frozen configuration and result types of the public API.

ModelConfig   what the runtime needs from a Hugging Face `config.json` (Llama, Qwen2, Qwen3 families).
Sampling      per-request sampling settings, validated on construction.
Generation    the result of one request.

Every constructor validates its fields and raises ValueError naming the field, the expected
range and the value it got. Nothing here imports torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .quality import TextQuality

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `theta` base and optional scaling (`kind` in {"default", "linear", "llama3"})."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only checkpoint, read from its `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2 always; Llama, Qwen3 if attention_bias)
    o_bias: bool  # o_proj carries a bias (Llama, Qwen3 if attention_bias; never Qwen2)
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    torch_dtype: str  # dtype the checkpoint was saved in: float32 | bfloat16 | float16
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @staticmethod
    def from_hf(raw: dict[str, Any]) -> ModelConfig:
        """Build from a parsed `config.json`; ValueError names any missing or unsupported field."""
        model_type = raw.get("model_type")
        _require(
            model_type in SUPPORTED_MODEL_TYPES,
            f"unsupported model_type {model_type!r}; lenvm_rt loads {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            _require(_is_int(raw.get(key)) and raw[key] > 0,
                     f"config.json: {key} must be a positive int; got {raw.get(key)!r}")
        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        _require(_is_int(kv_heads) and kv_heads > 0 and heads % kv_heads == 0,
                 f"config.json: num_key_value_heads must divide num_attention_heads={heads}; got {kv_heads!r}")
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        rope = _rope_from_hf(raw)
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        _require(dtype in ("float32", "bfloat16", "float16"),
                 f"config.json: dtype must be float32, bfloat16 or float16; got {dtype!r}")
        qwen2 = model_type == "qwen2"
        return ModelConfig(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or bool(raw.get("attention_bias", False)),
            o_bias=not qwen2 and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            torch_dtype=dtype,
            eos_token_ids=_int_tuple(raw.get("eos_token_id")),
            bos_token_id=raw.get("bos_token_id") if _is_int(raw.get("bos_token_id")) else None,
        )


def _int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if _is_int(value):
        return (value,)
    return tuple(v for v in value if _is_int(v))


def _rope_from_hf(raw: dict[str, Any]) -> RopeConfig:
    # transformers 5 keeps rope settings in `rope_parameters`; older files use rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    _require(kind in ("default", "linear", "llama3"),
             f"config.json: rope type {kind!r} is not supported; expected default, linear or llama3")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


GREEDY_BELOW = 1e-5  # temperatures under this decode greedily


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn.

    temperature 0 means greedy (argmax), and so does any temperature below GREEDY_BELOW (1/t would overflow
    float32, and the softmax at such a temperature is the argmax anyway); otherwise the distribution
    softmax(logits / temperature) is filtered by top-k (None or 0: off), then top-p (1.0: off; exclusive
    prefix mass, full-vocabulary probabilities), then min-p (0.0: off; keep p >= min_p * p_max). The most
    likely token always survives. `seed` keys a counter-based RNG, so a seeded request draws the same tokens
    whatever batch or slot it runs in; None draws a fresh seed per request.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        _require(_is_real(t) and math.isfinite(t) and t >= 0,
                 f"temperature must be a finite number >= 0 (0 = greedy); got {t!r}")
        k = self.top_k
        _require(k is None or (_is_int(k) and k >= 0), f"top_k must be None or an int >= 0; got {k!r}")
        p = self.top_p
        _require(_is_real(p) and 0 < p <= 1, f"top_p must lie in (0, 1]; got {p!r}")
        m = self.min_p
        _require(_is_real(m) and 0 <= m <= 1, f"min_p must lie in [0, 1]; got {m!r}")
        s = self.seed
        _require(s is None or (_is_int(s) and 0 <= s < 2**64),
                 f"seed must be None or an int in [0, 2**64); got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


LENGTH_CONSTRAINTS = ("equal", "at_most", "at_least")
LENGTH_RULES = ("strict", "band", "soft")  # how a length target picks: the paper's rule, the band, or (Equal To
                                           # only) the tilt that hits the target in expectation (select_ref.py)
# Each constraint's rule when a LengthTarget names none, chosen by measurement on LIFEBench (README, "Which rule").
DEFAULT_RULES = {"equal": "band", "at_most": "band", "at_least": "band"}
DEFAULT_EQUAL_RULE = DEFAULT_RULES["equal"]


@dataclass(frozen=True)
class LengthTarget:
    """A length constraint on the response, counted in response tokens with EOS not counted.

    `LengthTarget.equal(128)` asks for 128 tokens of text followed by EOS (129 generated tokens:
    Generation.num_tokens counts the EOS). This is the count a user reads and LIFEBench scores.

    `rule` (None means the constraint's DEFAULT_RULES entry: band for every constraint):
    "strict" is the paper's rule: Equal To takes the candidate whose predicted remaining length is closest to
    the target's (EOS a candidate at every step), At Most the shortest, At Least the longest until the target
    and then the shortest. "band" follows the policy (samples by base probability, or takes its argmax when
    greedy) among the candidates the target allows: for Equal To those within max(2, 0.25·ρ) tokens of the
    remaining target ρ, for At Most those predicted to fit it (l̂ <= ρ), for At Least those predicted to reach
    it (l̂ >= ρ) and every candidate once it is reached; with none allowed it makes the strict choice. At Most
    and At Least band rows also end inside their ending window as soon as the policy gives EOS a probability of
    at least 1e-4 (guidance.py): the last max(2, ⌈N/4⌉) tokens before the limit, or as many tokens past the
    target, at whose end an At Least row ends anyway. "soft" (Equal To only; the reference's `eq_soft`) samples
    from the base distribution exponentially tilted in value so that the expected value of the chosen token
    equals the target's, and takes the closest when the target lies outside the candidates' values
    (lenvm_rt/select_ref.py). Band and soft Equal-To rows and every At Least
    row see no EOS before the target; every length row sees EOS from its target on, and At Most ends there.
    """

    constraint: str
    tokens: int
    rule: str | None = None

    def __post_init__(self) -> None:
        if self.rule is None:
            object.__setattr__(self, "rule", DEFAULT_RULES.get(self.constraint))
        _require(self.constraint in LENGTH_CONSTRAINTS,
                 f"length constraint must be one of {', '.join(LENGTH_CONSTRAINTS)}; got {self.constraint!r}")
        _require(_is_int(self.tokens) and self.tokens > 0,
                 f"length target must be a positive int number of tokens; got {self.tokens!r}")
        _require(isinstance(self.rule, str) and self.rule in LENGTH_RULES,
                 f"length rule must be one of {', '.join(LENGTH_RULES)}; got {self.rule!r}")
        _require(self.rule != "soft" or self.constraint == "equal",
                 f"length rule 'soft' applies to the equal constraint only; got {self.constraint!r}")

    @classmethod
    def equal(cls, tokens: int, rule: str | None = None) -> LengthTarget:
        return cls("equal", tokens, rule)

    @classmethod
    def at_most(cls, tokens: int, rule: str | None = None) -> LengthTarget:
        return cls("at_most", tokens, rule)

    @classmethod
    def at_least(cls, tokens: int, rule: str | None = None) -> LengthTarget:
        return cls("at_least", tokens, rule)

    @property
    def generated_target(self) -> int:
        """T: generated tokens including the final EOS."""
        return self.tokens + 1


@dataclass(frozen=True)
class Generation:
    """One finished request.

    token_ids      generated ids, EOS included when the model stopped on it
    num_tokens     len(token_ids): the single length counter (generated tokens, EOS included)
    finish_reason  "stop" (an EOS id was generated) or "length" (max_new_tokens reached)
    values         predicted remaining tokens (EOS counted) after each generated token; empty without
                   a value model
    token_logprobs log p of each generated token under the policy's own logits at its step (temperature 1,
                   no filters: the unguided judgement of guided text too)
    token_ranks    1-based rank of each generated token in that distribution
    top_logprobs   with generate(..., top_logprobs=n): each step's n most probable tokens in that distribution
                   as (id, log p), most probable first (equal log p: lower id first); empty otherwise
    """

    text: str
    token_ids: list[int]
    num_tokens: int
    finish_reason: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    values: list[float] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    token_ranks: list[int] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def ms_per_token(self) -> float:
        """Mean decode time per generated token after the first (the first comes from the prefill)."""
        steps = max(self.num_tokens - 1, 1)
        return 1000.0 * self.decode_seconds / steps

    @property
    def response_tokens(self) -> int:
        """The length a length target counts: generated tokens without the final EOS."""
        return self.num_tokens - (self.finish_reason == "stop")

    @property
    def quality(self) -> TextQuality | None:
        """The policy's own judgement of the generated tokens, from token_logprobs / token_ranks (quality.py:
        NLL per token, mean rank and probability, 4-gram repetition; a final EOS scored like any token); None
        without tokens."""
        from .quality import quality_of_steps

        if not self.token_ids:
            return None
        eos = {self.token_ids[-1]} if self.finish_reason == "stop" else set()
        return quality_of_steps(self.token_ids, self.token_logprobs, self.token_ranks, eos)
