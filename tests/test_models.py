"""SRMIL and ABMIL on tiny random bags: the sparse GAT layer against torch-geometric's, shapes,
attention, masking, reconstruction, learning, saving, seeds, the reference architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_geometric

from srmil.graph import grid_edges
from srmil.mil.models import MODEL_NAMES, MILOutput, build_model, default_hparams, gat
from srmil.mil.models.base import FeatureScaler
from srmil.mil.models.gat import SparseGATConv, SparseGraph, _AttentionAggregate

# Every variant the trainer can build: (model name, hparams overrides).
VARIANTS = [("srmil", {}), ("srmil", {"pooling": "gat"}), ("srmil", {"pooling": "gated"}),
            ("srmil", {"identity_residual": True}), ("abmil", {})]
VARIANT_IDS = ["srmil-supernode", "srmil-gat", "srmil-gated", "srmil-identity-residual",
               "abmil"]


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


def inputs_to(module) -> list[torch.Tensor]:
    """Record the first input of every call of `module`."""
    seen: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


# --- the sparse graph attention layer ---------------------------------------------------------


def random_grid_edges(seed: int = 0) -> tuple[torch.Tensor, int]:
    """A window-2 grid graph with holes, its edges shuffled."""
    cells = np.argwhere(np.random.default_rng(seed).random((9, 11)) < 0.7)
    edges = torch.from_numpy(grid_edges(cells * 224, 224, window=2))
    shuffle = torch.randperm(edges.shape[1], generator=torch.Generator().manual_seed(seed))
    return edges[:, shuffle], len(cells)


@pytest.mark.parametrize(("heads", "channels", "concat"), [(4, 8, True), (1, 13, False),
                                                           (3, 5, False)])
def test_sparse_gat_equals_torch_geometric_gatconv(heads, channels, concat):
    torch.manual_seed(0)
    edges, n = random_grid_edges()
    layer = SparseGATConv(16, channels, heads=heads, concat=concat).double()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(n, 16, dtype=torch.double, requires_grad=True)
    out, alpha = layer(x, SparseGraph.from_edge_index(edges, n), return_attention_weights=True)
    # The same module through torch-geometric's own forward (self-loops already in the edges).
    ref, (ref_edges, ref_alpha) = torch_geometric.nn.GATConv.forward(
        layer, x, edges, return_attention_weights=True)
    assert torch.allclose(out, ref, atol=1e-12)
    order = torch.argsort(ref_edges[1] * n + ref_edges[0])  # our edge order: (target, source)
    assert torch.allclose(alpha, ref_alpha[order], atol=1e-12)
    weights = torch.randn_like(out)
    ours = torch.autograd.grad((out * weights).sum(), [x, *layer.parameters()])
    theirs = torch.autograd.grad((ref * weights).sum(), [x, *layer.parameters()])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(ours, theirs, strict=True))


def test_sparse_aggregate_gradcheck():
    edges, n = random_grid_edges(1)
    graph = SparseGraph.from_edge_index(edges, n)
    alpha = torch.rand(len(graph.src), 2, dtype=torch.double, requires_grad=True)
    x = torch.randn(n, 2, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, h: _AttentionAggregate.apply(a, h, graph),
                                    (alpha, x))


def test_index_aggregation_equals_sparse_products(monkeypatch):
    # The path taken on CUDA in deterministic mode (cuSPARSE is not bit-wise reproducible there),
    # forced here on the CPU, in small edge chunks.
    edges, n = random_grid_edges(2)
    graph = SparseGraph.from_edge_index(edges, n)
    alpha = torch.rand(len(graph.src), 3, dtype=torch.double, requires_grad=True)
    x = torch.randn(n, 3, 4, dtype=torch.double, requires_grad=True)
    weights = torch.randn(n, 3, 4, dtype=torch.double)
    sparse = _AttentionAggregate.apply(alpha, x, graph)
    sparse_grads = torch.autograd.grad((sparse * weights).sum(), [alpha, x])
    monkeypatch.setattr(gat, "_by_index", lambda _x: True)
    monkeypatch.setattr(gat, "CHUNK_ELEMENTS", 50)  # several chunks of 4 edges
    indexed = _AttentionAggregate.apply(alpha, x, graph)
    indexed_grads = torch.autograd.grad((indexed * weights).sum(), [alpha, x])
    assert torch.allclose(indexed, sparse, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12)
               for a, b in zip(indexed_grads, sparse_grads, strict=True))
    assert torch.autograd.gradcheck(lambda a, h: _AttentionAggregate.apply(a, h, graph),
                                    (alpha, x))


def test_sparse_graph_layouts():
    edges = torch.tensor([[2, 0, 1, 2, 0], [0, 1, 2, 2, 2]])
    graph = SparseGraph.from_edge_index(edges, 3)
    assert graph.edge_index.tolist() == [[2, 0, 0, 1, 2], [0, 1, 2, 2, 2]]  # by (target, source)
    assert graph.crow.tolist() == [0, 1, 2, 5]
    assert graph.t_crow.tolist() == [0, 2, 3, 5]  # source 0 has 2 edges, 1 has 1, 2 has 2
    assert graph.src[graph.t_perm].tolist() == [0, 0, 1, 2, 2]
    assert graph.t_col.tolist() == [1, 2, 2, 0, 2]
    with pytest.raises(ValueError, match="outside"):
        SparseGraph.from_edge_index(edges, 2)


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


@pytest.mark.parametrize("ratio", [0.0, 0.29, 0.3, 0.5, 0.7, 1.0])
def test_mask_nodes_count(ratio):
    model = build_model("srmil", 8, 2, {"mask_ratio": ratio})
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 10, 100, 101):
        ids = model.mask_nodes(n, gen)
        # floor(ratio * n), as the reference; exact where ratio * n is whole (0.29 * 100 = 29).
        expected = int(np.floor(round(ratio * n, 9)))
        assert ids.dtype == torch.long and len(ids) == expected
        assert len(torch.unique(ids)) == len(ids)
        assert torch.all((ids >= 0) & (ids < n))  # the super-node is node n: never masked


@pytest.mark.parametrize(("ratio", "n"), [(0.7, 23), (0.5, 40), (0.3, 10)])
def test_training_masks_exactly_the_ratio_of_patches(ratio, n):
    torch.manual_seed(0)
    model = build_model("srmil", 8, 2, {"mask_ratio": ratio})
    x, edges, _ = grid_bag(n, 8)
    projected = inputs_to(model.input_proj)
    encoded = inputs_to(model.encoder[0])
    decoded = inputs_to(model.decoder[0])
    model.training_loss(x, edges, 0)

    # The projection sees the masked bag, the super-node token, the full bag, the token again.
    assert [len(s) for s in projected] == [n, 1, n, 1]
    token = model.enc_mask_token.detach()
    masked = torch.all(projected[0] == token, dim=1)
    assert masked.sum().item() == int(ratio * n + 1e-9)
    assert torch.equal(projected[0][~masked], x[~masked])  # the others are untouched
    assert torch.equal(projected[1], model.super_token.detach())  # the super-node: never masked
    assert torch.equal(projected[2], x)  # the full pass is unmasked

    # Encoder passes: masked patch graph, the same masked bag + super-node, the full bag.
    assert [len(s) for s in encoded] == [n, n + 1, n + 1]
    assert torch.equal(encoded[1][:n], encoded[0])
    # The decoder re-masks exactly the same patches with its own token.
    remasked = torch.all(decoded[0] == model.dec_mask_token.detach(), dim=1)
    assert torch.equal(remasked, masked)


def test_reconstruction_loss_counts_only_masked_patches():
    torch.manual_seed(0)
    n = 30
    model = build_model("srmil", 12, 2)
    x, edges, _ = grid_bag(n, 12)
    drawn: list[torch.Tensor] = []
    draw = model.mask_nodes

    def recording_draw(count: int) -> torch.Tensor:  # the real draw, remembered
        drawn.append(draw(count))
        return drawn[-1]

    model.mask_nodes = recording_draw
    outputs: list[torch.Tensor] = []
    model.decoder[-1].register_forward_hook(lambda _m, _a, out: outputs.append(out[0].detach()))
    _, parts = model.training_loss(x, edges, 1)
    (ids,) = drawn
    x_hat = outputs[0]
    assert x_hat.shape == (n, 12)
    expected = (1 - torch.cosine_similarity(x_hat[ids], x[ids], dim=-1)).mean()
    assert parts["rec"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(("name", "hparams"), VARIANTS, ids=VARIANT_IDS)
def test_forward_unmasked_and_deterministic_in_eval(name, hparams):
    torch.manual_seed(0)
    model = build_model(name, 16, 3, hparams)
    x, edges, _ = grid_bag(30, 16)
    if name == "srmil":
        seen = inputs_to(model.input_proj)
        model.train()
        model(x, edges)  # forward never masks, even in train mode
        assert torch.equal(seen[0], x)
        seen.clear()
        model.eval()
        with torch.no_grad():
            model(x, edges)
        assert torch.equal(seen[0], x)  # nor at evaluation
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
    with pytest.raises(ValueError, match="nosuchmodel"):
        build_model("nosuchmodel", 8, 2)
    with pytest.raises(ValueError):
        build_model("abmil", 8, 1)
    with pytest.raises(ValueError):
        build_model("abmil", 8, 2).training_loss(torch.randn(3, 8), None, 2)


def test_reference_defaults_and_architecture():
    hp = default_hparams("srmil")
    assert {k: hp[k] for k in ("heads", "hidden_per_head", "encoder_layers", "decoder_layers",
                               "decoder_out_heads", "feat_dropout", "attn_dropout",
                               "negative_slope", "mask_ratio", "token_init_std", "rec_alpha",
                               "pooling", "cls_hidden", "cls_dropout", "w_ce", "w_rec",
                               "init_gain", "residual", "identity_residual")} == {
        "heads": 4, "hidden_per_head": 64, "encoder_layers": 2, "decoder_layers": 2,
        "decoder_out_heads": 1, "feat_dropout": 0.11, "attn_dropout": 0.15,
        "negative_slope": 0.2, "mask_ratio": 0.7, "token_init_std": 0.01, "rec_alpha": 1.0,
        "pooling": "supernode", "cls_hidden": 128, "cls_dropout": 0.059, "w_ce": 1.0,
        "w_rec": 1.8, "init_gain": 1.414, "residual": True, "identity_residual": False}
    model = build_model("srmil", 1024, 3)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["input_proj.weight"] == (1024, 1024) and "input_proj.bias" in shapes
    assert shapes["enc_mask_token"] == (1, 1024) and shapes["super_token"] == (1, 1024)
    assert shapes["encoder.0.conv.lin.weight"] == (256, 1024)  # 4 heads x 64, concatenated
    assert shapes["encoder.0.conv.att_src"] == (1, 4, 64)
    assert shapes["encoder.0.residual.weight"] == (256, 1024)  # the width changes: projected
    assert shapes["encoder.1.conv.lin.weight"] == (256, 256)
    assert not any(k.startswith("encoder.1.residual") for k in shapes)  # unchanged: none
    assert shapes["encoder_to_decoder.weight"] == (256, 256)
    assert "encoder_to_decoder.bias" not in shapes
    assert shapes["dec_mask_token"] == (1, 256)
    assert shapes["decoder.0.conv.lin.weight"] == (256, 256)
    assert shapes["decoder.1.conv.lin.weight"] == (1024, 256)  # 1 head back to D
    assert shapes["classifier.0.weight"] == (128, 64)  # on the head-averaged 64-d embedding
    assert shapes["classifier.3.weight"] == (3, 128)
    assert isinstance(model.encoder[0].norm, torch.nn.LayerNorm)
    assert isinstance(model.encoder[0].act, torch.nn.PReLU)
    assert model.encoder[0].conv.dropout == 0.15 and model.encoder[0].dropout.p == 0.11
    assert isinstance(model.decoder[1].norm, torch.nn.Identity)
    assert isinstance(build_model("srmil", 8, 2, {"identity_residual": True}).encoder[1].residual,
                      torch.nn.Identity)
    assert abs(model.enc_mask_token.std().item() - 0.01) < 0.002  # tokens start near zero


@pytest.mark.parametrize("pooling", ["supernode", "gat"])
def test_checkpointed_layers_give_the_same_loss_and_gradients(pooling):
    x, edges, _ = grid_bag(25, 8)

    def step(checkpoint_layers: bool) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(5)
        model = build_model("srmil", 8, 2, {"pooling": pooling,
                                            "checkpoint_layers": checkpoint_layers})
        loss, _ = model.training_loss(x, edges, 1)
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters()]

    (loss_a, grads_a), (loss_b, grads_b) = step(False), step(True)
    assert loss_a == loss_b  # dropout masks replayed: the very same computation
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b, strict=True))


def test_multiclass_and_feature_sizes_learn():
    # Five classes told apart by which feature block is shifted, at an odd feature size.
    torch.manual_seed(0)
    dim, n = 21, 12
    _, edges, _ = grid_bag(n, dim)
    bags = []
    for label in range(5):
        x = torch.randn(n, dim, generator=torch.Generator().manual_seed(label))
        x[:, 4 * label: 4 * label + 4] += 2.0
        bags.append((x, label))
    model = build_model("srmil", dim, 5, {"heads": 2, "hidden_per_head": 8})
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(30):
        for x, label in bags:
            loss, _ = model.training_loss(x, edges, label)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        predicted = [int(model(x, edges).logits.argmax()) for x, _ in bags]
    assert predicted == [0, 1, 2, 3, 4]


def test_feature_scaler_fits_bag_by_bag_as_on_the_whole_cohort() -> None:
    """One bag at a time (no float64 copy of the cohort) gives the statistics of all patches at
    once; empty bags are ignored; with no patches at all it stays the identity."""
    gen = torch.Generator().manual_seed(0)
    bags = [torch.randn(n, 6, generator=gen) * 0.01 + 50.0 for n in (7, 0, 1, 30, 12)]
    scaler = FeatureScaler(6)
    scaler.fit(bags)
    x = torch.cat(bags).double()
    assert torch.allclose(scaler.mean.double(), x.mean(0), rtol=0, atol=1e-5)
    assert torch.allclose(scaler.std.double(), x.std(0, unbiased=False), rtol=1e-5, atol=0)
    assert torch.allclose(scaler(bags[3]).mean(), torch.tensor(0.0), atol=0.5)
    identity = FeatureScaler(6)
    identity.fit([torch.zeros(0, 6)])
    assert torch.equal(identity.mean, torch.zeros(6)) and torch.equal(identity.std, torch.ones(6))


def test_graph_layers_leave_no_files_in_the_temp_directory(tmp_path):
    """PyG writes each layer class's rendered `propagate` to the temp directory once per process
    and never deletes it; ours are rendered into a folder removed at once (a fresh process, since
    PyG renders a class only once per process), and the rendered code is what runs."""
    code = ("import torch\n"
            "from srmil.mil.models.gat import SparseGATConv\n"
            "from srmil.mil.models.genconv import SparseGENConv\n"
            "conv = SparseGENConv(4, 4, aggr='softmax')\n"
            "SparseGATConv(4, 4)\n"
            "assert type(conv).propagate.__module__.endswith('SparseGENConv_propagate')\n"
            "conv(torch.randn(3, 4), torch.tensor([[0, 1, 2], [1, 2, 0]]))\n")  # PyG's own path
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(temp)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in temp.glob("*.py")) == []
