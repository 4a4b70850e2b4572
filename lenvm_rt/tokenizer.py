"""Tokenizer and chat template of a Hugging Face checkpoint directory, without transformers.

Reads `tokenizer.json` (fast tokenizer) and `tokenizer_config.json`; the chat template comes from
`chat_template.jinja`, `chat_template.json` or `tokenizer_config.json["chat_template"]`, rendered in
a sandboxed Jinja environment with transformers' conventions (trim_blocks, lstrip_blocks,
`raise_exception`, `strftime_now`, `add_generation_prompt`). A rendered chat is encoded without
adding special tokens, as transformers' `apply_chat_template` does.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _FastTokenizer

Message = dict[str, Any]


def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level alphabet's symbol -> byte: printable Latin-1 bytes stand for themselves, the other 68 bytes
    take the code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(shifted)}}


_BYTE_OF_SYMBOL = _byte_level_alphabet()


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode text and render chats for one checkpoint."""

    def __init__(self, directory: Path) -> None:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{directory} has no tokenizer.json (lenvm_rt needs the fast tokenizer file)")
        try:
            self._tok = _FastTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: cannot load tokenizer ({exc})") from exc
        config_path = directory / "tokenizer_config.json"
        self.config: dict[str, Any] = {}
        if config_path.is_file():
            with open(config_path, encoding="utf-8") as fh:
                self.config = json.load(fh)
        self.chat_template = self._find_template(directory)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    def _find_template(self, directory: Path) -> str | None:
        jinja = directory / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        as_json = directory / "chat_template.json"
        if as_json.is_file():
            with open(as_json, encoding="utf-8") as fh:
                return json.load(fh).get("chat_template")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    # ---- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @cached_property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for on its own: an added (special) token's text; under a byte-level decoder,
        its symbols mapped back to bytes (a piece of a multi-byte character stays that piece); a byte-fallback
        token `<0xHH>` its byte; any other token its decoded text; an id the tokenizer has no token for (a model's
        vocabulary padded beyond the tokenizer's) nothing, as decode() gives. ValueError for a negative id."""
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise ValueError(f"token id must be an int >= 0; got {token_id!r}")
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self.id_to_token(token_id)
        if piece is None:
            out = b""
        elif token_id in self._added_ids:
            out = piece.encode("utf-8")
        elif self._byte_level and all(c in _BYTE_OF_SYMBOL for c in piece):
            out = bytes(_BYTE_OF_SYMBOL[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and all(
                c in "0123456789ABCDEFabcdef" for c in piece[3:5]):
            out = bytes([int(piece[3:5], 16)])
        else:
            out = self.decode([token_id], skip_special_tokens=False).encode("utf-8")
        self._token_bytes[token_id] = out
        return out

    def token_text(self, token_id: int) -> str:
        """token_bytes as text (an incomplete UTF-8 piece shows U+FFFD): how a token reads on its own."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    @cached_property
    def _token_bytes(self) -> dict[int, bytes]:
        return {}

    @cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self._tok.get_added_tokens_decoder())

    @cached_property
    def _byte_level(self) -> bool:
        """Whether the decoder is (or contains) ByteLevel: tokens are spelled in the byte-level alphabet."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)

    # ---- text -----------------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to messages, as text."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template; pass a plain text prompt or token ids")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'; got {message!r}")
        return self._compiled_template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    @cached_property
    def _compiled_template(self) -> Any:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        return env.from_string(self.chat_template)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A digest of the vocabulary (token -> id, added tokens included) and the EOS token: equal for
    tokenizers that turn text into the same ids, different otherwise."""
    vocab = sorted(tokenizer.vocab.items(), key=lambda item: item[1])
    payload = json.dumps([vocab, tokenizer.eos_token], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        """The text this token completes ("" while a UTF-8 sequence is incomplete)."""
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        return "" if text.endswith("\ufffd") else self._advance(text)

    def finish(self) -> str:
        """The text not returned yet, an incomplete tail included as decode() gives it (U+FFFD): at the end of
        the ids, so that the pieces join to decode(ids)."""
        return self._advance(self._tok.decode(self._ids))

    def _advance(self, text: str) -> str:
        piece = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text
        return piece
