"""SRMIL and ABMIL on tiny random bags: shapes, attention, masking, learning, saving, seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from srmil.graph import grid_edges
from srmil.models import MODEL_NAMES, MILOutput, build_model, default_hparams

# Every variant the trainer can build: (model name, hparams overrides).
VARIANTS = [("srmil", {}), ("srmil", {"pooling": "attention"}), ("abmil", {})]
VARIANT_IDS = ["srmil-supernode", "srmil-attention", "abmil"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny bags run fastest on one thread; intra-op threads stall when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def grid_bag(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """n patches on a roughly square grid: features (n, dim), window-2 edges, grid cells."""
    side = int(np.ceil(np.sqrt(n)))
    cells = np.argwhere(np.ones((side, side), dtype=bool))[:n]
    edges = torch.from_numpy(grid_edges(cells * 224, 224, window=2))
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x, edges, cells


def inputs_to_projection(model) -> list[torch.Tensor]:
    """Record what SRMIL's input projection sees on each call (masked bags, super-node row)."""
    seen: list[torch.Tensor] = []
    model.input_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    return seen


@pytest.mark.parametrize(("name", "hparams"), VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize(("dim", "n_classes", "n"), [(8, 2, 1), (33, 3, 2), (16, 5, 17)])
def test_shapes_and_attention(name, hparams, dim, n_classes, n):
    torch.manual_seed(0)
    model = build_model(name, dim, n_classes, hparams)
    x, edges, _ = grid_bag(n, dim)
    for train in (True, False):
        model.train(train)
        out = model(x, edges)
        assert isinstance(out, MILOutput)
        assert out.logits.shape == (n_classes,) and out.attention.shape == (n,)
        assert torch.all(out.attention >= 0)
        assert out.attention.sum().item() == pytest.approx(1.0, abs=1e-5)
    model.train()
    loss, parts = model.training_loss(x, edges, n_classes - 1)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected = {"loss", "ce"} | ({"ce_masked", "ce_full", "rec"} if name == "srmil" else set())
    assert set(parts) == expected and all(isinstance(v, float) for v in parts.values())
    assert parts["loss"] == pytest.approx(loss.item())


def test_srmil_loss_parts_combine():
    torch.manual_seed(0)
    model = build_model("srmil", 12, 2, {"w_ce": 0.7, "w_rec": 1.5})
    x, edges, _ = grid_bag(20, 12)
    _, p = model.training_loss(x, edges, 1)
    assert p["ce"] == pytest.approx(1.3 * p["ce_masked"] + 0.7 * p["ce_full"], rel=1e-5)
    assert p["loss"] == pytest.approx(0.5 * p["ce"] + 1.5 * p["rec"], rel=1e-5)
    assert 0.0 <= p["rec"] <= 2.0  # 1 - cos lies in [0, 2]


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_mask_nodes_count(ratio):
    model = build_model("srmil", 8, 2, {"mask_ratio": ratio})
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 10, 101):
        ids = model.mask_nodes(n, gen)
        assert ids.dtype == torch.long and len(ids) == round(ratio * n)
        assert len(torch.unique(ids)) == len(ids)
        assert torch.all((ids >= 0) & (ids < n))  # the super-node is node n: never masked


def test_training_masks_patches_not_super_node():
    torch.manual_seed(0)
    model = build_model("srmil", 8, 2, {"mask_ratio": 0.7})
    n = 23
    x, edges, _ = grid_bag(n, 8)
    seen = inputs_to_projection(model)
    model.training_loss(x, edges, 0)
    # Calls: masked patch graph, masked graph + super-node, full graph + super-node.
    assert [len(s) for s in seen] == [n, n + 1, n + 1]
    token = model.enc_mask_token.detach()
    masked = torch.all(seen[0] == token, dim=1)
    assert masked.sum().item() == round(0.7 * n)
    assert torch.equal(seen[0][~masked], x[~masked])
    assert torch.equal(seen[1][:n], seen[0])  # the same nodes masked for classification
    assert torch.equal(seen[1][n], model.super_token.detach()[0])
    assert torch.equal(seen[2][:n], x)  # the full pass is unmasked


@pytest.mark.parametrize(("name", "hparams"), VARIANTS, ids=VARIANT_IDS)
def test_forward_unmasked_and_deterministic_in_eval(name, hparams):
    torch.manual_seed(0)
    model = build_model(name, 16, 3, hparams)
    x, edges, _ = grid_bag(30, 16)
    if name == "srmil":
        seen = inputs_to_projection(model)
        model.train()
        model(x, edges)  # forward never masks, even in train mode
        assert torch.equal(seen[-1][:30], x)
    model.eval()
    with torch.no_grad():
        a, b = model(x, edges), model(x, edges)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.attention, b.attention)


def test_srmil_edges_without_self_loops():
    # The model adds missing self-loops, so an edgeless bag still has every node attend to itself.
    torch.manual_seed(0)
    model = build_model("srmil", 8, 2).eval()
    x, edges, _ = grid_bag(9, 8)
    loops_only = torch.arange(9).repeat(2, 1)
    no_edges = torch.zeros((2, 0), dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(model(x, loops_only).logits, model(x, no_edges).logits)
        with_loops = edges
        without = edges[:, edges[0] != edges[1]]
        assert torch.allclose(model(x, with_loops).logits, model(x, without).logits)


def test_srmil_reconstruction_improves():
    torch.manual_seed(0)
    n, dim = 36, 16
    _, edges, cells = grid_bag(n, dim)
    # Spatially smooth features around a shared direction: predictable from the neighbours.
    gen = torch.Generator().manual_seed(1)
    pos = torch.from_numpy(cells).float() / 6
    basis = torch.randn(4, dim, generator=gen)
    x = torch.cat([torch.sin(pos), torch.cos(pos)], dim=1) @ basis + torch.randn(dim, generator=gen)
    model = build_model("srmil", dim, 2, {"w_rec": 2.0})  # reconstruction only
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rec = []
    for _ in range(50):
        loss, parts = model.training_loss(x, edges, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.append(parts["rec"])
    assert np.mean(rec[-5:]) < 0.5 * np.mean(rec[:5])


@pytest.mark.parametrize(("name", "hparams"), VARIANTS, ids=VARIANT_IDS)
def test_toy_problem_reduces_ce(name, hparams):
    torch.manual_seed(0)
    dim, n = 8, 16
    x_neg, edges, _ = grid_bag(n, dim, seed=1)
    x_pos, _, _ = grid_bag(n, dim, seed=2)
    x_pos[:3, :4] += 3.0  # a few positive instances with shifted features
    bags = [(x_neg, 0), (x_pos, 1)]
    model = build_model(name, dim, 2, hparams)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4 if name == "srmil" else 1e-3)

    def eval_ce() -> float:
        model.eval()
        with torch.no_grad():
            logits = torch.stack([model(x, edges).logits for x, _ in bags])
        model.train()
        return torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).item()

    before = eval_ce()
    for _ in range(15):
        for x, label in bags:
            loss, _ = model.training_loss(x, edges, label)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert eval_ce() < before


@pytest.mark.parametrize(("name", "hparams"), VARIANTS, ids=VARIANT_IDS)
def test_state_dict_round_trip(name, hparams, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, 12, 3, hparams).eval()
    x, edges, _ = grid_bag(10, 12)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(1)  # a differently initialised twin
    twin = build_model(name, 12, 3, hparams).eval()
    twin.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        a, b = model(x, edges), twin(x, edges)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.attention, b.attention)


@pytest.mark.parametrize(("name", "hparams"), VARIANTS, ids=VARIANT_IDS)
def test_same_seed_same_losses(name, hparams):
    x, edges, _ = grid_bag(20, 8)

    def run() -> list[float]:
        torch.manual_seed(123)
        model = build_model(name, 8, 2, hparams)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(3):
            loss, _ = model.training_loss(x, edges, step % 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    assert run() == run()


def test_hparams_interface():
    for name in MODEL_NAMES:
        hp = default_hparams(name)
        assert json.loads(json.dumps(hp)) == hp
        assert build_model(name, 8, 2, hp).config.__dict__ == hp
    assert default_hparams("srmil")["mask_ratio"] == 0.7
    assert build_model("srmil", 8, 2, {"mask_ratio": 0.5}).config.mask_ratio == 0.5
    with pytest.raises(ValueError, match="mask_rate"):
        build_model("srmil", 8, 2, {"mask_rate": 0.5})
    with pytest.raises(ValueError, match="pooling"):
        build_model("srmil", 8, 2, {"pooling": "max"})
    with pytest.raises(ValueError, match="transmil"):
        build_model("transmil", 8, 2)
    with pytest.raises(ValueError):
        build_model("abmil", 8, 1)
    with pytest.raises(ValueError):
        build_model("abmil", 8, 2).training_loss(torch.randn(3, 8), None, 2)
