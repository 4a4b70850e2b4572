"""Convert a llama-architecture GGUF file into a standard Hugging Face model directory.

    convert_gguf(gguf_path, out_dir, progress=True) -> out_dir

`out_dir` must not exist yet. It appears atomically (written into a temporary sibling, then renamed) and holds
config.json, generation_config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json,
special_tokens_map.json and COMPLETE_MARKER (JSON: source file name, CONVERTER_VERSION).

Weights are dequantized with the `gguf` package's numpy code. llama.cpp stores the rows of each q/k head
interleaved for its rotary kernel; they are put back into Hugging Face's half-split order, so the result
equals the original checkpoint up to the quantisation error. The tokenizer is rebuilt with the `tokenizers`
library the way the original model's tokenizer.json is laid out (byte-level BPE, pre-tokenizer chosen by
`tokenizer.ggml.pre`).

ValueError: the file is not GGUF, is truncated, or has an architecture, tokenizer, tensor or quantisation
type this converter does not handle (SUPPORTED_QUANT_TYPES). FileExistsError: `out_dir` exists. Nothing is
left behind on error.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm.auto import tqdm

CONVERTER_VERSION = 1
COMPLETE_MARKER = ".lenvm_rt_complete"

_Q = GGMLQuantizationType
SUPPORTED_QUANT_TYPES = frozenset({
    _Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
    _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K,
})

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer. These split every digit off first and then apply the
# GPT-2 regex, which the original tokenizer.json writes as Digits(individual_digits) + ByteLevel.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact"})
_GPT2_PRE = frozenset({"default", "gpt-2"})

# llama.cpp token types.
_CONTROL, _UNKNOWN, _USER_DEFINED = 3, 2, 4


def convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Write the Hugging Face directory for `gguf_path` at `out_dir` and return `out_dir`."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it first")
    reader = _open(gguf_path)
    meta = {name: _field_value(field) for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: unsupported architecture {arch!r}; only 'llama' is supported")
    config = _model_config(meta, reader)
    tokenizer = _build_tokenizer(meta, gguf_path)
    entries = _tensor_plan(reader, config, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_safetensors(tmp / "model.safetensors", entries, progress)
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, content in _json_files(meta, config).items():
            _write_json(tmp / name, content)
        _write_json(tmp / COMPLETE_MARKER, {"source": gguf_path.name, "converter_version": CONVERTER_VERSION})
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _open(path: Path) -> GGUFReader:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error) as exc:
        raise ValueError(f"{path} is not a readable GGUF file (truncated or corrupt): {exc}") from exc
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ValueError(f"{path} is truncated: tensor {tensor.name} ends past the end of the file")
    return reader


def _field_value(field: Any) -> Any:
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]][0].item()


def _shortest_float(value: float) -> float:
    """GGUF stores float32; print it the shortest way that reads back, as config.json had it (1e-05)."""
    return float(str(np.float32(value)))


def _model_config(meta: dict[str, Any], reader: GGUFReader) -> dict[str, Any]:
    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return meta[f"llama.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _shortest_float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _shortest_float(meta.get("llama.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "torch_dtype": "float32",
    }
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        factor = _shortest_float(meta["llama.rope.scaling.factor"])
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling != "none":
        raise ValueError(f"unsupported rope scaling {scaling!r}; only 'linear' is supported")
    for role, key in (("bos", "bos"), ("pad", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[f"{role}_token_id"] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    eos = _eos_ids(meta)
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return config


def _eos_ids(meta: dict[str, Any]) -> list[int]:
    ids = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _tensor_plan(
    reader: GGUFReader, config: dict[str, Any], path: Path
) -> list[tuple[str, list[int], Callable[[], np.ndarray]]]:
    """(HF name, shape, producer of the fp32 array) in the order Hugging Face checkpoints list them."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    layers = config["num_hidden_layers"]
    planned: dict[str, tuple[list[int], Callable[[], np.ndarray]]] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, layers)
        if name is None:
            raise ValueError(f"{path}: tensor {tensor.name!r} has no place in a LlamaForCausalLM")
        if tensor.tensor_type not in SUPPORTED_QUANT_TYPES:
            raise ValueError(
                f"{path}: tensor {tensor.name} uses quantisation type {tensor.tensor_type.name}, which is "
                f"not supported; supported: {sorted(t.name for t in SUPPORTED_QUANT_TYPES)}"
            )
        rotary_heads = heads if ".attn_q." in tensor.name else kv_heads if ".attn_k." in tensor.name else 0
        shape = [int(d) for d in reversed(tensor.shape.tolist())]
        if rotary_heads and shape[0] != rotary_heads * config["head_dim"]:
            raise ValueError(f"{path}: {tensor.name} has {shape[0]} rows, not {rotary_heads} heads of "
                             f"{config['head_dim']}")
        planned[name] = (shape, _producer(tensor, shape, rotary_heads))
    order = list(_hf_names(layers, config["tie_word_embeddings"]))
    missing = [name for name in order if name not in planned]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    return [(name, *planned[name]) for name in order]


def _hf_name(gguf_name: str, layers: int) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in _LAYER_TENSORS:
        return None
    if not parts[1].isdigit() or int(parts[1]) >= layers:
        return None
    return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.weight"


def _hf_names(layers: int, tied: bool) -> Iterator[str]:
    yield "model.embed_tokens.weight"
    for i in range(layers):
        for module in _LAYER_TENSORS.values():
            yield f"model.layers.{i}.{module}.weight"
    yield "model.norm.weight"
    if not tied:
        yield "lm_head.weight"


def _producer(tensor: Any, shape: list[int], rotary_heads: int) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if rotary_heads:
            weights = _rotary_rows_to_hf(weights, rotary_heads)
        return weights

    return produce


def _rotary_rows_to_hf(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order.

    Within a head of `d` rows, Hugging Face keeps the two rotary halves apart (row j*d/2 + i for half j),
    while llama.cpp's converter interleaves them (row 2*i + j) because ggml rotates adjacent pairs.
    """
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _write_safetensors(
    path: Path, entries: list[tuple[str, list[int], Callable[[], np.ndarray]]], progress: bool
) -> None:
    """Stream fp32 tensors into the safetensors layout, one tensor in memory at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in entries:
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        bar = tqdm(entries, desc="Converting GGUF", unit="tensor", disable=not progress)
        for name, shape, produce in bar:
            weights = np.ascontiguousarray(produce(), dtype="<f4")
            if list(weights.shape) != shape:
                raise ValueError(f"tensor {name}: got shape {list(weights.shape)}, expected {shape}")
            out.write(weights.tobytes())


def _build_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: unsupported tokenizer model {kind!r}; only byte-level BPE ('gpt2') works")
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2_PRE:
        pre_tokenizer = byte_level
    else:
        supported = sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE)
        raise ValueError(f"{path}: unsupported pre-tokenizer {pre!r}; supported: {supported}")

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: the vocabulary repeats tokens")
    merges = [tuple(merge.split(" ")) for merge in meta.get("tokenizer.ggml.merges", [])]
    if any(len(merge) != 2 for merge in merges):
        raise ValueError(f"{path}: a merge is not two tokens separated by one space")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(meta, tokens)

    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer.add_special_tokens([
        AddedToken(tokens[i], normalized=False, special=True) for i, kind in enumerate(types)
        if kind in (_CONTROL, _UNKNOWN)
    ])
    tokenizer.add_tokens([
        AddedToken(tokens[i], normalized=False, special=False) for i, kind in enumerate(types)
        if kind == _USER_DEFINED
    ])
    return tokenizer


def _post_processor(meta: dict[str, Any], tokens: list[str]) -> Any:
    byte_level = processors.ByteLevel(trim_offsets=False)
    bos = meta.get("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token") else None
    eos = meta.get("tokenizer.ggml.eos_token_id") if meta.get("tokenizer.ggml.add_eos_token") else None
    if bos is None and eos is None:
        return byte_level
    head = [f"{tokens[bos]}:0"] if bos is not None else []
    tail = [f"{tokens[eos]}:0"] if eos is not None else []
    special = [(tokens[i], int(i)) for i in (bos, eos) if i is not None]
    single = [*head, "$A:0", *tail]
    pair = [*single, *head, "$B:1", *tail]
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return processors.Sequence([byte_level, template])


def _json_files(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    special: dict[str, Any] = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            special[f"{role}_token"] = tokens[int(meta[f"tokenizer.ggml.{key}_token_id"])]
    special["additional_special_tokens"] = [tokens[i] for i, kind in enumerate(types) if kind == _CONTROL]
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    return {
        "config.json": config,
        "generation_config.json": generation,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special,
    }


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
