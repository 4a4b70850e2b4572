"""Evaluation suites of the runtime (LENVM.md §7); submodules are imported on use.

lifebench   token-level LIFEBench: prompts, guided and unguided runs, scores (`lifebench_score`)
tradeoff    pass@1 vs mean tokens: value tilting per β against hard token budgets (paper Fig. 2)
mre         prompt-boundary length prediction error against sampled completions (paper Table 3)
length_tokens  tokens whose TD residual lengthens or shortens the prediction (paper Fig. 4)
answers, arithmetic, data   answer extraction, GSM8K-style test problems, JSONL input with line-numbered errors
"""
