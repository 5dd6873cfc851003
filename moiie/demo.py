"""A tiny MoIIE layer routing one text + image + padding batch, printed (``moiie layer-demo``)."""

from __future__ import annotations

import torch

from moiie.layer import MoEConfig, build_ffn
from moiie.losses import aux_losses
from moiie.modality import MODALITY_NAMES


def layer_demo(seed: int = 0) -> None:
    torch.manual_seed(seed)
    config = MoEConfig(topology={"vision": 2, "shared": 2, "text": 2}, expert={"kind": "swiglu", "d_ff": 64})
    layer = build_ffn(config, d_model=32)
    T = 48
    modality = torch.zeros(T, dtype=torch.long)
    modality[8:24] = 1  # an image block inside text
    modality[-6:] = -1  # right padding
    x = torch.randn(T, 32)
    x[modality == 1] += 2.0  # image features live elsewhere in the space than text
    y, routing = layer(x, modality)
    topo = config.topology
    names = [f"{topo.group_of(e)[0]}{e}" for e in range(topo.num_experts)]
    print(
        f"MoIIE layer: topology vision={topo.vision} shared={topo.shared} text={topo.text}, "
        f"top_k={config.router.top_k}, d_model=32, d_ff=64"
    )
    print(
        f"tokens: {(modality == 0).sum().item()} text, {(modality == 1).sum().item()} vision, "
        f"{(modality == -1).sum().item()} padding\n"
    )
    print(
        "share of each modality's (token, slot) assignments per expert (v=vision-intra, s=shared, t=text-intra)"
    )
    print(f"{'modality':<10}" + "".join(f"{n:>8}" for n in names))
    for m in (1, 0):
        ids = routing.expert_ids[modality == m]
        ids = ids[ids >= 0]
        load = torch.bincount(ids, minlength=topo.num_experts).float() / max(1, ids.numel())
        print(f"{MODALITY_NAMES[m]:<10}" + "".join(f"{v:>8.2f}" for v in load.tolist()))
    print("\nfirst tokens of each kind: chosen experts and combine weights")
    for t in (0, 8, T - 1):
        ids = [names[i] if i >= 0 else "-" for i in routing.expert_ids[t].tolist()]
        print(
            f"  token {t:>2} ({MODALITY_NAMES.get(modality[t].item(), 'padding')}): experts {ids} "
            f"weights {[round(w, 3) for w in routing.weights[t].tolist()]}"
        )
    losses = aux_losses([routing], config.aux_loss)
    print(
        "\nbalancing losses (= top_k under uniform routing): "
        + ", ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
    )
    print(f"output: {tuple(y.shape)}, padding rows zero: {bool((y[modality == -1] == 0).all())}")
