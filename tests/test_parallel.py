"""Expert parallelism, global balancing statistics, FSDP2 / DDP and checkpoints across world sizes.

One ``torchrun --nproc-per-node 2`` launch (gloo, CPU) runs every two-process scenario, and one
with 4 processes trains on a 2 x 2 (data x expert) mesh; this file is their script. Each rank saves
what it computed; the tests compare that with single-process references computed here on the
concatenated global batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moiie.experts.gelu_mlp import GeluMLPExpertConfig
from moiie.layer import build_ffn
from moiie.losses import AuxLossConfig, aux_losses
from moiie.model import MoIIEForCausalLM, causal_lm_loss
from moiie.parallel import (
    ExpertParallelMoE,
    ParallelConfig,
    build_mesh,
    clip_grad_norm_,
    expert_parallel_layers,
    expert_slice,
    full_state_dict,
    load_pretrained,
    parallelize,
    save_pretrained,
    slice_experts,
    smoke,
    unwrap,
)
from moiie.presets import ARMS, tiny_lvlm

WORLD = 2
D_MODEL, D_FF, TOKENS = 16, 32, 24
LAYER_ARMS = [
    "moiie",
    "vanilla_moe",
    "intra_only",
    "inter_only",
    "modality_moe",
    "moiie_always_on",
    "moiie_gelu",
]
LAYOUTS = {  # data x expert, each with FSDP2 and with DDP: (processes, layout)
    "1x2-fsdp": (2, ParallelConfig(expert=2, data_parallel="fsdp")),
    "1x2-ddp": (2, ParallelConfig(expert=2, data_parallel="ddp")),
    "2x1-fsdp": (2, ParallelConfig(expert=1, data_parallel="fsdp")),
    "2x1-ddp": (2, ParallelConfig(expert=1, data_parallel="ddp")),
    "2x2-fsdp": (4, ParallelConfig(expert=2, data_parallel="fsdp")),
    "2x2-ddp": (4, ParallelConfig(expert=2, data_parallel="ddp")),
}
GLOBAL_BATCH, STEPS, LR, CLIP = 8, 3, 1e-2, 1.0
TIMEOUT_S = 150


# ---- shared by the reference (this process) and the ranks ---------------------------------------


def layer_config(arm: str):
    """A routed layer of ``arm`` with balancing and z losses strong enough to matter in gradients."""
    name = "moiie" if arm == "moiie_gelu" else arm
    cfg = ARMS[name]()
    update = {"aux_loss": AuxLossConfig(vision=1.0, text=1.0, joint=1.0, z_loss=0.1)}
    if arm == "moiie_gelu":
        update["expert"] = GeluMLPExpertConfig(d_ff=D_FF)
    return cfg.model_copy(update=update)


def build_layer(arm: str):
    torch.manual_seed(LAYER_ARMS.index(arm))
    return build_ffn(layer_config(arm), d_model=D_MODEL, d_ff=D_FF)


def layer_batch(arm: str):
    """Rank 0: text, an image block, text, padding. Rank 1: two text tokens, then padding, so some
    experts receive nothing from rank 1 (and with modality experts, rank 1 sends rank 0 nothing)."""
    g = torch.Generator().manual_seed(100 + LAYER_ARMS.index(arm))
    x = torch.randn(WORLD * TOKENS, D_MODEL, generator=g)
    out_grad = torch.randn(WORLD * TOKENS, D_MODEL, generator=g)
    modality = torch.zeros(WORLD * TOKENS, dtype=torch.long)
    modality[4:14] = 1
    modality[TOKENS - 3 : TOKENS] = -1
    modality[TOKENS + 2 :] = -1
    return x, modality, out_grad


def layer_loss(y, routing, out_grad, aux_config, aux_weight: float):
    aux = aux_losses([routing], aux_config)["total"]
    return (y * out_grad).sum() + aux_weight * aux, aux


def rank_rows(t: torch.Tensor, rank: int, world: int = WORLD) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


# ---- what each rank runs (python -m torch.distributed.run this_file OUT_DIR) --------------------


def _rank_layers(rank: int) -> dict:
    out = {}
    for arm in LAYER_ARMS:
        layer = build_layer(arm)
        ep = ExpertParallelMoE.from_layer(layer, group=dist.group.WORLD)
        x, modality, out_grad = (rank_rows(t, rank) for t in layer_batch(arm))
        x = x.clone().requires_grad_(True)
        y, routing = ep(x, modality)
        loss, aux = layer_loss(y, routing, out_grad, layer_config(arm).aux_loss, 1.0)
        loss.backward()
        out[arm] = {
            "y": y.detach(),
            "x_grad": x.grad,
            "aux": aux.detach(),
            "expert_ids": list(ep.expert_ids),
            "grads": {n: p.grad for n, p in ep.named_parameters()},
        }
    return out


def _rank_training(rank: int, folder: Path, layout: str) -> dict:
    world, config = LAYOUTS[layout]
    mesh = build_mesh(config)
    model = MoIIEForCausalLM.from_pretrained(folder / "init")
    model = parallelize(model, mesh, config)
    slices = {}
    for name, layer in expert_parallel_layers(unwrap(model)):
        w = layer.experts.gate_up
        slices[name] = (w.full_tensor() if hasattr(w, "full_tensor") else w).detach().clone()
    batch = {k: rank_rows(v, rank, world) for k, v in torch.load(folder / "batch.pt").items()}
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        out = model(**batch)
        out.loss.backward()
        norm = clip_grad_norm_(model, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        figures = torch.stack([out.loss.detach(), out.lm_loss.detach(), out.aux_loss.detach()])
        dist.all_reduce(figures)
        losses.append([*(figures / world).tolist(), norm.item()])
    save_pretrained(model, folder / f"ckpt-{layout}")
    return {"losses": losses, "slices": slices}


def _rank_reload(folder: Path) -> dict:
    """Load the single-process initial checkpoint into an already parallel model, then gather it."""
    config = ParallelConfig(expert=2)
    model = parallelize(
        MoIIEForCausalLM.from_pretrained(folder / "ckpt-1x2-fsdp"), build_mesh(config), config
    )
    load_pretrained(model, folder / "init")
    return {k: v.clone() for k, v in full_state_dict(model).items() if ".experts." in k}


def _rank_errors(rank: int) -> dict:
    errors = {}
    try:
        build_mesh(ParallelConfig(expert=2, data=2))
    except ValueError as err:
        errors["mesh"] = str(err)
    try:
        build_mesh(ParallelConfig(expert=2 if rank == 0 else 1))
    except ValueError as err:
        errors["mesh_mismatch"] = str(err)
    config = ParallelConfig(expert=2)
    mesh = build_mesh(config)
    three = ARMS["vanilla_moe"]().model_copy(
        update={"topology": ARMS["vanilla_moe"]().topology.model_copy(update={"shared": 3})}
    )
    try:
        parallelize(MoIIEForCausalLM.from_config(tiny_model_config(three)), mesh, config)
    except ValueError as err:
        errors["divisible"] = str(err)
    arm = "moiie" if rank == 0 else "vanilla_moe"
    try:
        parallelize(MoIIEForCausalLM.from_config(tiny_model_config(ARMS[arm]())), mesh, config)
    except ValueError as err:
        errors["mismatch"] = str(err)
    return errors


def tiny_model_config(ffn=None):
    """The tiny LVLM (2 layers, MoE at layer 1), with balancing losses weighted enough to show in the loss."""
    from moiie.data.tokenizer import digits_tokenizer

    cfg = tiny_lvlm("moiie", vocab_size=len(digits_tokenizer()), hidden=32, layers=2, ffn=64)
    ffn = cfg.ffn if ffn is None else ffn
    ffn = ffn.model_copy(update={"aux_loss": AuxLossConfig(vision=0.3, text=0.3, joint=0.3, z_loss=0.01)})
    return cfg.model_copy(update={"ffn": ffn})


def _rank_main(folder: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {}
    if world == WORLD:
        results = {"layers": _rank_layers(rank), "errors": _rank_errors(rank)}
    for layout, (processes, _) in LAYOUTS.items():
        if processes == world:
            results[layout] = _rank_training(rank, folder, layout)
    if world == WORLD:
        results["reload"] = _rank_reload(folder)
        small = ["--expert", "2", "--steps", "2", "--batch", "2", "--samples", "16"]
        results["smoke"] = smoke.main([*small, "--out", str(folder / "smoke")])
    torch.save(results, folder / f"rank{rank}-of-{world}.pt")
    dist.destroy_process_group()


# ---- the launch and the single-process references -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _perturb_experts(model: MoIIEForCausalLM) -> None:
    """Upcycled experts start as copies; make them distinct so a checkpoint mixing them up is caught."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def _global_batch() -> dict[str, torch.Tensor]:
    from moiie.processor import LVLMProcessor
    from moiie.train.config import DigitsDataConfig, TokenizerConfig
    from moiie.train.data import collate, encode_examples, load_task

    train, _, tokenizer = load_task(
        DigitsDataConfig(task={"samples_per_image_train": 1, "samples_per_image_eval": 1}), TokenizerConfig()
    )
    model = MoIIEForCausalLM.from_config(tiny_model_config())
    processor = LVLMProcessor(tokenizer, model.vision.preprocess, model.n_image_tokens)
    samples = encode_examples(train[:GLOBAL_BATCH], tokenizer, processor)
    return collate(processor, samples, list(range(GLOBAL_BATCH)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The initial single-process checkpoint (distinct experts) and the global batch."""
    folder = tmp_path_factory.mktemp("parallel")
    torch.manual_seed(0)
    model = MoIIEForCausalLM.from_config(tiny_model_config())
    _perturb_experts(model)
    model.save_pretrained(folder / "init")
    torch.save(_global_batch(), folder / "batch.pt")
    return folder


def _launch(folder: Path, processes: int) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(processes),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        __file__,
        str(folder),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": str(folder / "error.json")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return [torch.load(folder / f"rank{r}-of-{processes}.pt", weights_only=False) for r in range(processes)]


@pytest.fixture(scope="module")
def run(workdir) -> tuple[Path, list[dict]]:
    """Every two-process scenario, in one launch."""
    return workdir, _launch(workdir, WORLD)


@pytest.fixture(scope="module")
def run4(workdir) -> tuple[Path, list[dict]]:
    """Training on the 2 x 2 mesh."""
    return workdir, _launch(workdir, 4)


def _reference_layer(arm: str):
    layer = build_layer(arm)
    x, modality, out_grad = layer_batch(arm)
    x.requires_grad_(True)
    y, routing = layer(x, modality)
    # each rank adds the global balancing loss to its own loss: the ranks' losses sum to this
    loss, aux = layer_loss(y, routing, out_grad, layer_config(arm).aux_loss, float(WORLD))
    loss.backward()
    return layer, x, y, aux, routing


@pytest.mark.parametrize("arm", LAYER_ARMS)
def test_expert_parallel_layer_equals_single_process(run, arm):
    _, ranks = run
    layer, x, y, aux, routing = _reference_layer(arm)
    got = [r["layers"][arm] for r in ranks]
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([g["x_grad"] for g in got]), x.grad, rtol=1e-5, atol=1e-6)
    for g in got:  # the balancing loss is the global batch's on every rank
        torch.testing.assert_close(g["aux"], aux.detach(), rtol=1e-5, atol=1e-7)
    E = layer.experts.num_experts
    assert [g["expert_ids"] for g in got] == [list(expert_slice(E, r, WORLD)) for r in range(WORLD)]
    for name, p in layer.named_parameters():
        if name.startswith("experts."):  # sliced: each rank holds its experts' full gradient
            merged = torch.cat([g["grads"][name] for g in got])
        else:  # replicated: the ranks' gradients sum to the global one
            merged = sum(g["grads"][name] for g in got)
        torch.testing.assert_close(merged, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # the batch leaves at least one expert without tokens from rank 1
    from_rank1 = rank_rows(routing.expert_ids, 1)
    assert set(range(E)) - set(from_rank1[from_rank1 >= 0].tolist())


def _reference_training(folder: Path, world: int) -> tuple[list[list[float]], MoIIEForCausalLM]:
    model = MoIIEForCausalLM.from_pretrained(folder / "init")
    batch = torch.load(folder / "batch.pt")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        out = model(**batch)
        # data parallelism averages the ranks' losses: the mean of the per-rank LM losses
        lm = sum(
            causal_lm_loss(rank_rows(out.logits, r, world), rank_rows(batch["labels"], r, world))
            for r in range(world)
        )
        loss = lm / world + out.aux_loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append([loss.item(), lm.item() / world, out.aux_loss.item(), norm.item()])
    return losses, model


@pytest.fixture(scope="module")
def reference(workdir):
    """world -> (losses, model) of one process on the global batch, LM loss averaged over world parts."""
    cache = {}

    def get(world: int):
        if world not in cache:
            cache[world] = _reference_training(workdir, world)
        return cache[world]

    return get


def _ranks(request, layout: str) -> list[dict]:
    return request.getfixturevalue("run" if LAYOUTS[layout][0] == WORLD else "run4")[1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_steps_match_single_process(request, reference, layout):
    ref_losses, _ = reference(LAYOUTS[layout][0])
    for r in _ranks(request, layout):
        torch.testing.assert_close(
            torch.tensor(r[layout]["losses"]), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6
        )
    assert ref_losses[-1][0] < ref_losses[0][0]  # it trains


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_from_parallel_ranks_reloads_in_one_process(request, workdir, reference, layout):
    _ranks(request, layout)
    _, ref_model = reference(LAYOUTS[layout][0])
    folder = workdir
    loaded = MoIIEForCausalLM.from_pretrained(folder / f"ckpt-{layout}")
    ref = ref_model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == ref.keys()
    # AdamW moves every weight by about LR per step whatever its gradient's size, so a gradient near
    # zero whose sign differs by summation order (ranks vs one process) shifts a weight by up to
    # ~LR; 1% of one step is the tolerance.
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=LR * 1e-2, msg=key)
    for key, t in got.items():
        if key.endswith("experts.gate_up"):
            distinct = {tuple(t[e].flatten()[:8].tolist()) for e in range(t.shape[0])}
            assert len(distinct) == t.shape[0], f"{key}: experts are copies of each other"


def test_single_process_checkpoint_loads_as_slices(run):
    folder, ranks = run
    init = MoIIEForCausalLM.from_pretrained(folder / "init").state_dict()
    for rank, r in enumerate(ranks):
        for name, local in r["1x2-fsdp"]["slices"].items():
            full = init[f"{name}.experts.gate_up"]
            ids = expert_slice(full.shape[0], rank, WORLD)
            torch.testing.assert_close(local, full[ids.start : ids.stop], rtol=0, atol=0)
    for key, t in ranks[0]["reload"].items():
        torch.testing.assert_close(t, init[key], rtol=0, atol=0, msg=key)


def test_bad_layouts_fail_with_clear_errors_on_every_rank(run):
    _, ranks = run
    for r in ranks:
        errors = r["errors"]
        assert "larger than the world" in errors["mesh"]
        assert "3 experts per MoE layer cannot be split over 2" in errors["divisible"]
        assert "model and parallel config differs across ranks: ranks [1] disagree" in errors["mismatch"]
        assert "parallel config differs across ranks: ranks [1] disagree" in errors["mesh_mismatch"]


def test_smoke_run_trains_and_writes_a_loadable_model(run):
    folder, ranks = run
    assert ranks[0]["smoke"] == ranks[1]["smoke"] and len(ranks[0]["smoke"]) == 2
    assert all(torch.isfinite(torch.tensor(ranks[0]["smoke"])))
    assert MoIIEForCausalLM.from_pretrained(folder / "smoke").moe_layer_indices == [1, 3]


# ---- single-process checks -------------------------------------------------------------------------


def test_layout_problems_are_reported_before_any_process_group():
    assert ParallelConfig(expert=2).problems(4) == []
    assert ParallelConfig(expert=2).mesh_shape(4) == (2, 2)
    assert "larger than the world" in ParallelConfig(expert=4, data=2).problems(4)[0]
    assert "does not cover the world" in ParallelConfig(expert=2, data=1).problems(4)[0]
    problems = ParallelConfig(expert=4).problems(4, [4, 6])
    assert problems == [
        "parallel.expert: 6 experts per MoE layer cannot be split over 4 expert-parallel ranks; "
        "choose a divisor of 6"
    ]
    with pytest.raises(ValueError, match="cannot be split evenly"):
        expert_slice(4, 0, 3)
    assert ParallelConfig.from_yaml(ParallelConfig(expert=2).to_yaml()) == ParallelConfig(expert=2)


@pytest.mark.parametrize("arm", ["moiie", "moiie_gelu"])
def test_slice_experts_keeps_the_original_and_takes_the_slice(arm):
    layer = build_layer(arm)
    before = {k: v.clone() for k, v in layer.experts.state_dict().items()}
    local = slice_experts(layer.experts, range(2, 4))
    assert local.num_experts == 2 and layer.experts.num_experts == 4
    for key, t in local.state_dict().items():
        torch.testing.assert_close(t, before[key][2:4], rtol=0, atol=0)
        torch.testing.assert_close(layer.experts.state_dict()[key], before[key], rtol=0, atol=0)
    x = torch.randn(5, D_MODEL)
    counts = torch.tensor([3, 2])
    torch.testing.assert_close(local(x, counts), layer.experts(x, torch.tensor([0, 0, 3, 2])))


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
