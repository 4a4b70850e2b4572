"""Figures for value read-outs (matplotlib, headless Agg backend, imported lazily).

plot_token_values(tv, path): predicted remaining tokens per response position, the true remaining
count when the response ended with EOS, and the tokens whose TD residual passes ±threshold marked
(red: the prediction grew, the token made the answer longer; blue: it shrank) and labelled.
"""
from __future__ import annotations

from pathlib import Path

from .values import TokenValues


def plot_token_values(tv: TokenValues, path: str | Path, *, threshold: float = 0.01, max_labels: int = 16) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = list(range(1, len(tv.token_ids) + 1))
    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, len(positions) / 8)), 4.5))
    ax.plot([0] + positions, [tv.prompt_remaining] + tv.remaining, color="black", lw=1.5,
            label="predicted remaining")
    if tv.true_remaining is not None:
        ax.plot([0] + positions, [len(positions)] + tv.true_remaining, color="gray", ls="--", lw=1.2,
                label="true remaining")
    marked = [i for i, d in enumerate(tv.td) if abs(d) > threshold]
    for sign, color, name in ((1, "tab:red", f"TD > +{threshold}"), (-1, "tab:blue", f"TD < -{threshold}")):
        idx = [i for i in marked if sign * tv.td[i] > 0]
        ax.scatter([positions[i] for i in idx], [tv.remaining[i] for i in idx], color=color, s=18, zorder=3,
                   label=name)
    for i in sorted(marked, key=lambda i: -abs(tv.td[i]))[:max_labels]:
        text = tv.tokens[i].replace("\n", "\\n") or "␣"
        ax.annotate(text, (positions[i], tv.remaining[i]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7, color="tab:red" if tv.td[i] > 0 else "tab:blue")
    ax.set_xlabel("response position (tokens)")
    ax.set_ylabel("tokens remaining (EOS counted)")
    ax.set_title(f"LenVM token values (γ = {tv.gamma})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
