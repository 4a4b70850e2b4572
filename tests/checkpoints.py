"""Tiny random Hugging Face checkpoints built inside tests (no network, no downloads).

make_checkpoint(dir, family, tied=..., dtype=...) writes config.json, model.safetensors,
generation_config.json and a small byte-level BPE tokenizer with a ChatML chat template, all through
transformers' own save_pretrained, so the files are exactly what real checkpoints look like.
"""
from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Length value models predict how many tokens remain in a generation.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 12 plus 30? Answer: 42.",
    "你好，世界。长度价值模型。",
]
VOCAB = 384


def make_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)


def make_checkpoint(directory: Path, family: str = "llama", *, tied: bool = False, dtype: torch.dtype = torch.float32,
                    seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A random 2-layer checkpoint of `family` in {"llama", "qwen2", "qwen3"} saved to directory."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden + 16, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied, bos_token_id=0, eos_token_id=2, rms_norm_eps=1e-5)
    if family == "llama":
        config = transformers.LlamaConfig(**common, rope_theta=10000.0)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1000000.0)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        config = transformers.Qwen3Config(**common, head_dim=24, rope_theta=1000000.0)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    with torch.no_grad():  # random norms and biases, so that parity tests exercise them
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    model.generation_config.eos_token_id = [2, 1]
    model.generation_config.save_pretrained(directory)
    make_tokenizer(directory)
    return directory


def make_value_head(path: Path, hidden: int, *, gamma: float | None, seed: int = 0) -> Path:
    """A random value_head.safetensors in the published LenVM layout, γ in its metadata."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {
        "v_head.fc.weight": torch.randn(hidden, hidden, generator=g) / hidden**0.5,
        "v_head.fc.bias": torch.randn(hidden, generator=g) * 0.1,
        "v_head.summary.weight": torch.randn(1, hidden, generator=g) / hidden**0.5,
        "v_head.summary.bias": torch.randn(1, generator=g),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"gamma": str(gamma)} if gamma is not None else None)
    return path
