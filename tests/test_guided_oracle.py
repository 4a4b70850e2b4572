"""Guided decoding against a recompute-everything oracle built on transformers.

The oracle runs the full sequence through transformers at every step (no cache), scores every
candidate by a fresh forward of prefix + candidate through the value trunk with a plain torch head,
and applies the reference rules of select_ref. The runtime's cached lookahead, KV commits and
controller must produce the same tokens, in both configurations.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import make_checkpoint, make_value_head
from safetensors.torch import load_file

import lenvm_rt
from lenvm_rt import LengthTarget, Sampling, _native
from lenvm_rt.guidance import EOS_BANNED_BEFORE_TARGET, CandidateSettings, Guidance, build_candidates, ending_window
from lenvm_rt.select_ref import AT_LEAST_BAND, AT_MOST_BAND, GUIDANCE_STREAM, TILT, RowState, select_row

GAMMA = 0.97


def _hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _oracle(policy, trunk, head, prompt, sampling, guidance, eos, max_new):
    settings = CandidateSettings.of([sampling], eos, torch.device("cpu"))
    row = RowState(rule=guidance.rule, target=guidance.target, generated=0, max_new=max_new, gamma=GAMMA,
                   beta=guidance.beta, seed=sampling.seed, greedy=sampling.greedy)
    ids, out = list(prompt), []
    with torch.no_grad():
        for step in range(max_new):
            logits = policy(torch.tensor([ids])).logits[:, -1].float()
            ban = torch.tensor([guidance.rule in EOS_BANNED_BEFORE_TARGET and step + 1 < guidance.target])
            force = torch.tensor([guidance.rule != TILT and step + 1 >= guidance.target])
            count, T, w = step + 1, guidance.target, ending_window(guidance.target)
            in_window = (guidance.rule == AT_MOST_BAND and T - w <= count < T) or (
                guidance.rule == AT_LEAST_BAND and T <= count < T + w)
            must_end = guidance.rule == AT_LEAST_BAND and count >= T + w
            ending = (torch.tensor([in_window]), torch.tensor([must_end]))
            cand, logp, filled = build_candidates(logits, settings, ban, force, ending)
            hn = torch.stack([trunk.model(torch.tensor([ids + [int(c)]])).last_hidden_state[0, -1] for c in cand[0]])
            z = (torch.nn.functional.silu(hn @ head["v_head.fc.weight"].T + head["v_head.fc.bias"])
                 @ head["v_head.summary.weight"].T + head["v_head.summary.bias"])[:, 0]
            u = _native.philox_uniform(np.array([sampling.seed], dtype=np.uint64), np.array([step], dtype=np.uint32),
                                       GUIDANCE_STREAM)[0]
            cand_ids = torch.where(filled, cand, -1)[0].to(torch.int32).numpy()
            choice = select_row(cand_ids, logp[0].numpy(), z.numpy(), row, sorted(eos), float(u))
            row.generated += 1
            out.append(choice.token)
            ids.append(choice.token)
            if choice.done:
                break
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    policy = make_checkpoint(root / "policy", "qwen2", seed=1)
    value = make_checkpoint(root / "lenvm", "qwen2", seed=2)
    make_value_head(value / "value_head.safetensors", 64, gamma=GAMMA, seed=3)
    head = make_value_head(root / "head" / "value_head.safetensors", 64, gamma=GAMMA, seed=4)
    return policy, value, head


CASES = [
    (Sampling(temperature=1.0, top_k=6, seed=1), LengthTarget.equal(9), None),
    (Sampling(temperature=0.7, top_k=8, top_p=0.9, seed=2), None, -2.0),
    (Sampling(temperature=1.0, top_k=5, min_p=0.05, seed=3), LengthTarget.at_least(6), None),
    (Sampling(temperature=0.0, top_k=5, seed=5), LengthTarget.at_most(8), None),
    (Sampling(temperature=1.0, top_k=6, seed=6), LengthTarget.at_least(4, "strict"), None),
    (Sampling(temperature=0.0, top_k=4, seed=0), None, 1.5),
]


@pytest.mark.parametrize("config", ["separate", "shared"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_guided_tokens_equal_the_recompute_oracle(dirs, config, case):
    policy_dir, value_dir, head_file = dirs
    sampling, length, tilt = CASES[case]
    value_model = value_dir if config == "separate" else head_file
    rt = lenvm_rt.load(policy_dir, value_model=value_model, device="cpu")
    prompt = [5, 17, 42, 99, 3]
    got = rt.generate(prompt, max_new_tokens=12, sampling=sampling, length=length, tilt=tilt)
    policy = _hf(policy_dir)
    trunk = _hf(value_dir) if config == "separate" else policy
    head = load_file(value_dir / "value_head.safetensors" if config == "separate" else head_file)
    want = _oracle(policy, trunk, head, prompt, sampling, Guidance.of(length, tilt), rt.eos_token_ids, 12)
    assert got.token_ids == want
