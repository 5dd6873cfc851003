"""Routing diagnostics per MoE layer, per modality, per expert.

Accumulated over any number of forwards (padding excluded):
- load: share of a modality's (token, slot) assignments each expert receives;
- entropy: mean entropy (nats) of the router distribution over a token's candidates;
- shared share: fraction of a modality's assignments that go to shared (vs intra) experts;
- purity: per expert, the largest share of its assignments that come from one modality;
- mutual information (bits) between the chosen expert and the token's modality;
- dropped: (token, slot) assignments dropped by capacity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moiie.modality import TEXT, VISION
from moiie.routers.base import Routing
from moiie.topology import ExpertTopology

MODALITIES = ((TEXT, "text"), (VISION, "vision"))


@dataclass
class RoutingStats:
    """Running sums; ``update`` with each forward's routings (one per FFN-slot layer, None for dense)."""

    topology: ExpertTopology
    n_layers: int

    def __post_init__(self) -> None:
        E = self.topology.num_experts
        self.counts = torch.zeros(self.n_layers, 2, E, dtype=torch.float64)
        self.tokens = torch.zeros(self.n_layers, 2, dtype=torch.float64)
        self.entropy = torch.zeros(self.n_layers, 2, dtype=torch.float64)
        self.entropy_tokens = torch.zeros(self.n_layers, 2, dtype=torch.float64)
        self.dropped = torch.zeros(self.n_layers, 2, dtype=torch.float64)

    @torch.no_grad()
    def update(self, routings: Iterable[Routing | None]) -> None:
        E = self.topology.num_experts
        for i, r in enumerate(routings):
            if r is None:
                continue
            ids, m = r.expert_ids.cpu(), r.modality.cpu()
            real = m >= 0
            valid = (ids >= 0) & real[:, None]
            key = m.clamp(min=0)[:, None] * E + ids.clamp(min=0)
            self.counts[i] += torch.bincount(key[valid], minlength=2 * E).view(2, E).double()
            self.tokens[i] += torch.bincount(m[real], minlength=2).double()
            if r.probs is not None:
                p = r.probs.detach().float().cpu()
                h = -(p * p.clamp(min=1e-12).log()).sum(-1)
                for mod, _ in MODALITIES:
                    sel = m == mod
                    self.entropy[i, mod] += h[sel].double().sum()
                    self.entropy_tokens[i, mod] += sel.sum()
            if r.dropped is not None:
                self.dropped[i] += r.dropped.cpu().double()

    def load(self) -> torch.Tensor:
        """(layers, 2, E) share of each modality's assignments per expert."""
        return self.counts / self.counts.sum(-1, keepdim=True).clamp(min=1)

    def summary(self) -> list[dict]:
        """One dict per layer with per-modality and per-expert figures (JSON-safe)."""
        shared = list(self.topology.group("shared"))
        out = []
        load = self.load()
        for i in range(self.n_layers):
            c = self.counts[i]
            total = c.sum()
            per_expert = c.sum(0)
            purity = (c.max(0).values / per_expert.clamp(min=1)).tolist()
            layer = {
                "layer": i,
                "mutual_information_bits": _mutual_information(c),
                "experts": {"purity": purity, "assignments": per_expert.tolist()},
            }
            for mod, name in MODALITIES:
                n_assign = c[mod].sum().item()
                layer[name] = {
                    "tokens": self.tokens[i, mod].item(),
                    "load": load[i, mod].tolist(),
                    "entropy": (self.entropy[i, mod] / self.entropy_tokens[i, mod]).item()
                    if self.entropy_tokens[i, mod] > 0
                    else None,
                    "shared_share": (c[mod, shared].sum().item() / n_assign) if n_assign and shared else 0.0,
                    "dropped": self.dropped[i, mod].item(),
                }
            layer["assignments"] = total.item()
            out.append(layer)
        return out

    def collapsed(self, top_k: int, threshold: float = 0.95) -> bool:
        """True when, in some layer, one modality's top_k busiest experts take >= threshold of its assignments
        although it has more candidates than top_k (its tokens piled onto a few experts)."""
        load = self.load()
        for i in range(self.n_layers):
            for mod, _ in MODALITIES:
                share = load[i, mod]
                used_candidates = int((self.counts[:, mod].sum(0) > 0).sum())
                if self.tokens[i, mod] == 0 or used_candidates <= top_k:
                    continue
                if share.sort(descending=True).values[:top_k].sum() >= threshold:
                    return True
        return False

    def table(self) -> str:
        """A text table: per layer and modality, load per expert, entropy, shared share, dropped; MI and purity."""
        E = self.topology.num_experts
        names = [f"{self.topology.group_of(e)[0]}{e}" for e in range(E)]
        lines = [
            f"{'layer':>5} {'modality':<8}"
            + "".join(f"{n:>7}" for n in names)
            + f"{'entropy':>9}{'shared':>8}{'dropped':>9}"
        ]
        for row in self.summary():
            for _, name in MODALITIES:
                d = row[name]
                ent = "-" if d["entropy"] is None else f"{d['entropy']:.3f}"
                lines.append(
                    f"{row['layer']:>5} {name:<8}"
                    + "".join(f"{v:>7.3f}" for v in d["load"])
                    + f"{ent:>9}{d['shared_share']:>8.3f}{int(d['dropped']):>9}"
                )
            lines.append(
                f"{'':>5} {'purity':<8}"
                + "".join(f"{v:>7.3f}" for v in row["experts"]["purity"])
                + f"   MI(expert; modality) = {row['mutual_information_bits']:.3f} bits"
            )
        return "\n".join(lines)


def _mutual_information(counts: torch.Tensor) -> float:
    """I(expert; modality) in bits from a (2, E) joint count table."""
    total = counts.sum().item()
    if total == 0:
        return 0.0
    p = counts / total
    pm, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return float(
        (p[nz] * (p[nz] / (pm.expand_as(p)[nz] * pe.expand_as(p)[nz])).log()).sum().item() / math.log(2)
    )


def save_heatmaps(stats: RoutingStats, path: str, title: str = "") -> None:
    """PNG: per modality, a layers x experts heatmap of load share."""
    names = [f"{stats.topology.group_of(e)[0]}{e}" for e in range(stats.topology.num_experts)]
    plot_load(stats.load().numpy(), path, title=title, names=names)


def plot_load(load, path, *, title: str = "", names: list[str] | None = None) -> None:
    """load: (layers, 2, E) share of assignments, modality index 0 text, 1 vision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    load = np.asarray(load)
    n_layers, _, E = load.shape
    names = names or [f"e{e}" for e in range(E)]
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 0.6 * E * 2, 1.2 + 0.5 * n_layers), squeeze=False)
    for ax, (mod, name) in zip(axes[0], MODALITIES):
        im = ax.imshow(load[:, mod, :], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{name} tokens")
        ax.set_xticks(range(E), names)
        ax.set_yticks(range(n_layers), [f"MoE {i}" if mod == MODALITIES[0][0] else "" for i in range(n_layers)])
        for li in range(n_layers):
            for e in range(E):
                ax.text(
                    e,
                    li,
                    f"{load[li, mod, e]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if load[li, mod, e] < 0.5 else "black",
                )
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of assignments")
    if title:
        fig.suptitle(title, y=1.02 + 0.08 / max(1, n_layers))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
