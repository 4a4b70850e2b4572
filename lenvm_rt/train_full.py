"""Full fine-tuning of a separate LenVM: backbone plus value head, all trainable (configuration a, LENVM.md §2, §3).

    manifest = train_full("policy", "runs/train", "runs/heldout", "lenvms/v1", FullTrainSettings(epochs=2))
    # -> lenvms/v1: config.json, model.safetensors, tokenizer files, value_head.safetensors,
    #    lenvm_config.json, manifest.json; load it with load("policy", value_model="lenvms/v1")

The backbone (default: the policy checkpoint itself) is read with `safetensors` under its Hugging Face
tensor names and trained in fp32 with a differentiable pure-torch forward (Llama, Qwen2, Qwen3: RMSNorm,
GQA, RoPE per the config, q/k/v biases, q/k norm), next to a fresh value head (default nn.Linear init):

    hn = Backbone.hidden_states(ids[B, S])          # final-normed hidden states [B, S, D], right padding
    z  = state_logits(backbone, head, rollouts)     # per completion: z[L + 1] of the states s_0 … s_L

State i of a completion of L tokens after a P-token prompt sits at position P − 1 + i of prompt+completion.
The loss is the token-mean ½·MSE of −σ(z) against the dense targets in fp64 over the masked states of the
`batch` completions of an update (shuffled per epoch), with AdamW, gradient clipping and a linear warm-up
into a cosine schedule. Validation runs after every epoch, and a checkpoint (out/checkpoint.pt) is written;
resume=True continues from it. The output directory is a complete Hugging Face checkpoint (every tensor
under its original name in fp32; an untied LM head is kept unchanged) plus the LenVM head files.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .model import right_padded, rope_inv_freq
from .rollouts import Rollout
from .targets import GAMMA_RULE, choose_gamma
from .tokenizer import Tokenizer, tokenizer_fingerprint
from .train_head import FORMAT, TrainSettings, ValueHead
from .training import MANIFEST_FILE, Split, half_mse, load_split, lr_at, read_split, save_head, validation_metrics
from .value_model import LENVM_CONFIG_FILE, VALUE_HEAD_FILE, check_same_vocabulary
from .weights import read_config, resolve_checkpoint, safetensors_files

CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "model.safetensors"
EMBED, LM_HEAD, FINAL_NORM = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_NOT_COPIED = {WEIGHTS_FILE, "model.safetensors.index.json", VALUE_HEAD_FILE, LENVM_CONFIG_FILE, MANIFEST_FILE}
_COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")


@dataclass(frozen=True)
class FullTrainSettings(TrainSettings):
    """TrainSettings with full fine-tuning's defaults, plus the forward's micro-batch."""

    epochs: int = 2
    batch: int = 8  # completions per update
    lr: float = 2e-5
    micro_batch: int = 4  # completions per forward (gradient accumulation; the loss is the same)

    def check(self) -> None:
        super().check()
        if not isinstance(self.micro_batch, int) or isinstance(self.micro_batch, bool) or self.micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive int; got {self.micro_batch!r}")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every trunk tensor of a checkpoint by Hugging Face name (the LM head excluded) and its shape."""
    D, dh, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * dh, cfg.num_kv_heads * dh
    shapes: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, D), FINAL_NORM: (D,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       a + "o_proj.weight": (D, q_out), m + "gate_proj.weight": (inter, D),
                       m + "up_proj.weight": (inter, D), m + "down_proj.weight": (D, inter)})
        for name, rows in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes[a + name + ".weight"] = (rows, D)
            if cfg.qkv_bias:
                shapes[a + name + ".bias"] = (rows,)
        if cfg.o_bias:
            shapes[a + "o_proj.bias"] = (D,)
        if cfg.qk_norm:
            shapes[a + "q_norm.weight"] = (dh,)
            shapes[a + "k_norm.weight"] = (dh,)
        if cfg.mlp_bias:
            shapes.update({m + "gate_proj.bias": (inter,), m + "up_proj.bias": (inter,), m + "down_proj.bias": (D,)})
    return shapes


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Backbone:
    """A causal LM's trunk as fp32 leaf tensors under their Hugging Face names, with a differentiable forward.

    `params` are the trainable tensors (requires_grad); an untied `lm_head` is kept frozen on the CPU
    only to be saved back, since a LenVM never runs it.
    """

    def __init__(self, cfg: ModelConfig, params: dict[str, torch.Tensor], lm_head: torch.Tensor | None) -> None:
        self.cfg = cfg
        self.params = params
        self.lm_head = lm_head

    @staticmethod
    def load(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> Backbone:
        """Read and shape-check every tensor; ValueError names a missing, misshapen or unexpected one."""
        from safetensors.torch import load_file

        d = Path(directory)
        cfg = read_config(d)
        raw: dict[str, torch.Tensor] = {}
        for path in safetensors_files(d):
            raw.update(load_file(str(path)))
        if cfg.tie_word_embeddings and EMBED not in raw and LM_HEAD in raw:
            raw[EMBED] = raw.pop(LM_HEAD)  # a tied checkpoint may store only the LM head
        lm_head = None if cfg.tie_word_embeddings else raw.pop(LM_HEAD, None)
        raw.pop(LM_HEAD, None)
        shapes = expected_shapes(cfg)
        extra = sorted(n for n in raw if n not in shapes and not n.endswith(_IGNORED_SUFFIXES))
        if extra:
            raise ValueError(f"{d}: unexpected tensors for model_type {cfg.model_type!r}: {', '.join(extra[:5])}")
        params = {}
        for name, shape in shapes.items():
            if name not in raw:
                raise ValueError(f"{d}: missing tensor {name!r} (expected shape {list(shape)})")
            if tuple(raw[name].shape) != shape:
                raise ValueError(f"{d}: tensor {name!r} has shape {list(raw[name].shape)}, expected {list(shape)}")
            params[name] = raw[name].to(device=device, dtype=torch.float32).requires_grad_(True)
        if lm_head is not None:
            if tuple(lm_head.shape) != (cfg.vocab_size, cfg.hidden_size):
                raise ValueError(f"{d}: tensor {LM_HEAD!r} has shape {list(lm_head.shape)}")
            lm_head = lm_head.to(torch.float32)
        return Backbone(cfg, params, lm_head)

    @property
    def device(self) -> torch.device:
        return self.params[EMBED].device

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.params[name + ".weight"], self.params.get(name + ".bias"))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.params[name], eps=self.cfg.rms_norm_eps)

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """ids[B, S] (right-padded) -> final-normed hidden states [B, S, D] fp32; rows past a length are junk."""
        cfg = self.cfg
        B, S = ids.shape
        H, Hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        freqs = torch.outer(torch.arange(S, dtype=torch.float32), rope_inv_freq(cfg.rope, dh))
        angles = torch.cat((freqs, freqs), dim=-1).to(self.device)  # [S, Dh]
        cos, sin = angles.cos(), angles.sin()
        x = F.embedding(ids.to(self.device), self.params[EMBED])
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            h = self._norm(x, p + "input_layernorm.weight")
            q = self._linear(a + "q_proj", h).view(B, S, H, dh)
            k = self._linear(a + "k_proj", h).view(B, S, Hkv, dh)
            v = self._linear(a + "v_proj", h).view(B, S, Hkv, dh).transpose(1, 2)
            if cfg.qk_norm:
                q, k = self._norm(q, a + "q_norm.weight"), self._norm(k, a + "k_norm.weight")
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H|Hkv, S, Dh]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            # Right padding: a real query only sees earlier, hence real, keys, so the causal mask suffices.
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
            x = x + self._linear(a + "o_proj", attn.transpose(1, 2).reshape(B, S, H * dh))
            h = self._norm(x, p + "post_attention_layernorm.weight")
            x = x + self._linear(m + "down_proj", F.silu(self._linear(m + "gate_proj", h)) * self._linear(
                m + "up_proj", h))
        return self._norm(x, FINAL_NORM)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor to save, detached on the CPU, under its Hugging Face name."""
        out = {n: t.detach().cpu().contiguous() for n, t in self.params.items()}
        if self.lm_head is not None:
            out[LM_HEAD] = self.lm_head.contiguous()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, t in self.params.items():
                t.copy_(tensors[name])


def state_logits(backbone: Backbone, head: ValueHead, rollouts: Sequence[Rollout]) -> list[torch.Tensor]:
    """One right-padded forward: z[L + 1] (fp32) of the states s_0 … s_L of every completion."""
    ids, _ = right_padded([r.prompt_ids + r.completion_ids for r in rollouts])
    hn = backbone.hidden_states(ids)
    return [head(hn[b, len(r.prompt_ids) - 1:len(r.prompt_ids) + r.length]) for b, r in enumerate(rollouts)]


def predict(backbone: Backbone, head: ValueHead, rollouts: Sequence[Rollout], micro_batch: int = 4
            ) -> list[np.ndarray]:
    """state_logits without gradients, as float64 arrays, in micro-batches of similar lengths."""
    order = sorted(range(len(rollouts)), key=lambda i: len(rollouts[i].prompt_ids) + rollouts[i].length)
    out: list[np.ndarray] = [np.empty(0)] * len(rollouts)
    with torch.no_grad():
        for s in range(0, len(order), micro_batch):
            chunk = order[s:s + micro_batch]
            for i, z in zip(chunk, state_logits(backbone, head, [rollouts[i] for i in chunk])):
                out[i] = z.double().cpu().numpy()
    return out


def _resolve(name: str | os.PathLike[str]) -> Path:
    if str(name) == "default":
        from .default_model import default_model_dir

        return default_model_dir()
    return resolve_checkpoint(name)


def _check_ids(split: Split, cfg: ModelConfig) -> None:
    for e in split.examples:
        r = e.rollout
        ids = r.prompt_ids + r.completion_ids
        if not r.prompt_ids or min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise ValueError(f"{split.directory}: prompt {r.id!r} sample {r.sample} has token ids outside "
                             f"[0, {cfg.vocab_size}) or no prompt")
        if len(ids) > cfg.max_position_embeddings:
            raise ValueError(f"{split.directory}: prompt {r.id!r} sample {r.sample} has {len(ids)} tokens, more "
                             f"than the backbone's {cfg.max_position_embeddings} positions")


def save_backbone(backbone: Backbone, source: Path, out: Path) -> None:
    """model.safetensors (fp32, Hugging Face names) plus config, tokenizer and generation files of `source`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in _NOT_COPIED and (f.suffix in _COPIED_SUFFIXES
                                                           or f.name.startswith("tokenizer")):
            shutil.copyfile(f, out / f.name)
    tmp = out / (WEIGHTS_FILE + ".partial")
    save_file(backbone.tensors(), str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_FILE)


def train_full(model: str | os.PathLike[str], train_dir: str | os.PathLike[str], val_dir: str | os.PathLike[str],
               out_dir: str | os.PathLike[str], settings: FullTrainSettings = FullTrainSettings(), *,
               backbone: str | os.PathLike[str] | None = None, resume: bool = False, progress: bool = True,
               device: str | torch.device | None = None) -> dict[str, Any]:
    """Fine-tune backbone + head on the policy's rollouts, validate every epoch, save; returns the manifest.

    model: the policy (directory, hub id or "default"); backbone: the LenVM's initial checkpoint (default:
    the policy); device: where to train (default: CUDA when available, else the CPU).
    """
    from tqdm.auto import tqdm

    settings.check()
    policy_dir = _resolve(model)
    backbone_dir = _resolve(backbone) if backbone is not None else policy_dir
    out = Path(out_dir)
    if out.resolve() == backbone_dir.resolve():
        raise ValueError(f"{out} is the backbone's own directory; write the LenVM to a new --out")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = read_config(backbone_dir)
    tokenizer = Tokenizer(backbone_dir)
    if backbone_dir.resolve() != policy_dir.resolve():
        check_same_vocabulary(Tokenizer(policy_dir), tokenizer, read_config(policy_dir), cfg)
    fingerprint = tokenizer_fingerprint(tokenizer)
    gamma = settings.gamma
    if gamma is None:
        gamma = choose_gamma(read_split(train_dir, fingerprint)[1])
    train = load_split(train_dir, fingerprint, gamma, settings.censoring)
    val = load_split(val_dir, fingerprint, gamma, settings.censoring)
    _check_ids(train, cfg)
    _check_ids(val, cfg)
    out.mkdir(parents=True, exist_ok=True)

    net = Backbone.load(backbone_dir, dev)
    torch.manual_seed(settings.seed)
    head = ValueHead(cfg.hidden_size).to(dev)
    params = net.parameters() + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    per_epoch = math.ceil(len(train.examples) / settings.batch)
    total = per_epoch * settings.epochs
    warmup = max(1, int(settings.warmup * total))
    history: list[dict[str, Any]] = []
    first_epoch = 0
    checkpoint = out / CHECKPOINT_FILE
    run_key = {"settings": asdict(settings), "gamma": gamma, "backbone": str(backbone_dir),
               "train": train.manifest["resume_key"], "val": val.manifest["resume_key"]}
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=dev, weights_only=False)
        if state["run_key"] != run_key:
            raise ValueError(f"{checkpoint} belongs to another run (other data, backbone or settings); "
                             "use a new --out")
        net.load_tensors(state["backbone"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        history, first_epoch = state["history"], state["epoch"]
    rng = np.random.default_rng(settings.seed)
    for _ in range(first_epoch):
        rng.permutation(len(train.examples))  # the same shuffles as an uninterrupted run
    examples = train.examples
    bar = tqdm(total=total, initial=first_epoch * per_epoch, desc="train LenVM", unit="update", disable=not progress)
    for epoch in range(first_epoch, settings.epochs):
        order = rng.permutation(len(examples))
        train_loss, train_count = 0.0, 0
        for b in range(per_epoch):
            step = epoch * per_epoch + b
            chosen = [examples[i] for i in order[b * settings.batch:(b + 1) * settings.batch]]
            count = int(sum(e.mask.sum() for e in chosen))  # the token mean is over the whole update
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, settings.lr)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for s in range(0, len(chosen), settings.micro_batch):
                micro = chosen[s:s + settings.micro_batch]
                zs = state_logits(net, head, [e.rollout for e in micro])
                part = sum(half_mse(z[torch.from_numpy(e.mask).to(dev)], torch.from_numpy(e.targets[e.mask]).to(dev))
                           for z, e in zip(zs, micro))
                (part / count).backward()
                loss_sum += float(part.detach())
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            train_loss, train_count = train_loss + loss_sum, train_count + count
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", refresh=False)
        metrics = validation_metrics(val, predict(net, head, [e.rollout for e in val.examples], settings.micro_batch),
                                     gamma)
        history.append({"epoch": epoch + 1, "train_loss": train_loss / train_count, "val": metrics})
        bar.write(f"epoch {epoch + 1}: train loss {train_loss / train_count:.5f}  val loss {metrics['loss']:.5f}  "
                  f"MRE {metrics['mre']:.3f}  {json.dumps(metrics['mre_by_domain'])}")
        torch.save({"run_key": run_key, "backbone": {n: t.detach() for n, t in net.params.items()},
                    "head": head.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
                    "epoch": epoch + 1}, checkpoint)
    bar.close()
    manifest = {
        "format": FORMAT, "mode": "full", "policy": str(policy_dir), "backbone": str(backbone_dir),
        "tokenizer": fingerprint, "dtype": "float32",
        "gamma": gamma, "gamma_rule": "given" if settings.gamma is not None else GAMMA_RULE,
        "settings": asdict(settings),
        "data": {name: {"rollouts": str(s.directory), **s.stats, "rollout_settings": s.manifest.get("settings"),
                        "resume_key": s.manifest.get("resume_key")} for name, s in (("train", train), ("val", val))},
        "history": history, "final": history[-1]["val"] if history else None,
    }
    save_backbone(net, backbone_dir, out)
    save_head(head.checkpoint_tensors(), out, gamma, manifest)
    return manifest
