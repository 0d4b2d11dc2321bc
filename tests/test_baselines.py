"""The model catalogue: every model and SRMIL ablation on tiny bags (shapes, attention, losses,
saving, seeds), known values that need no reference code, the ablations' switched-off losses, the
optimisers of the references, and every model learning a tiny cohort through `train_fold`.

The comparison with the authors' code (same weights, float64) is benchmarks/reference_check.py,
which needs their checkouts; docs/method.md has its figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_data import synthetic_cohort

from srmil.cohort.splits import make_splits
from srmil.graph import grid_edges
from srmil.mil.bags import load_bag
from srmil.mil.catalog import MODEL_NAMES, MODELS, inherited_settings, model_info
from srmil.mil.inference import load_model, predict_bags
from srmil.mil.metrics import classification_metrics
from srmil.mil.models import FAMILIES, build_model, default_hparams
from srmil.mil.models.clam import smooth_top1_svm
from srmil.mil.models.gat import SparseGraph
from srmil.mil.models.genconv import SparseGENConv, _SoftmaxAggregate
from srmil.mil.models.nystrom import NystromAttention, iterative_pinv
from srmil.mil.optim import Lookahead, build_optimizer
from srmil.mil.train import _optimiser, train_fold
from srmil.settings import TrainSettings, train_settings
from srmil.workflow import STEP_MIB_PER_100K

REPO = Path(__file__).resolve().parents[1]
# Small widths where a model's reference size only costs time here (TransMIL's 256 landmarks
# make every bag a 256-token problem).
SMALL = {"transmil": {"landmarks": 8, "dim": 64, "heads": 4}, "patchgcn": {"hidden_dim": 16},
         "srmil": {"heads": 2, "hidden_per_head": 8}, "srmil_norec": {"heads": 2,
         "hidden_per_head": 8}, "srmil_nomask": {"heads": 2, "hidden_per_head": 8},
         "srmil_raw": {"heads": 2, "hidden_per_head": 8}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def grid_bag(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    side = int(np.ceil(np.sqrt(n)))
    cells = np.argwhere(np.ones((side, side), dtype=bool))[:n]
    edges = torch.from_numpy(grid_edges(cells * 224, 224, window=2))
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), edges


def small(name: str, **extra) -> dict:
    return {**SMALL.get(name, {}), **extra}


# --- the catalogue -----------------------------------------------------------------------------


def test_catalogue_lists_every_model_once_with_its_code_and_settings():
    assert MODEL_NAMES[:2] == ("srmil", "srmil_norec") and len(set(MODEL_NAMES)) == 12
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    train = schema["$defs"]["TrainSection"]["properties"]
    assert tuple(train["models"]["items"]["enum"]) == MODEL_NAMES
    assert set(MODEL_NAMES) <= set(train)  # a train.<model> section for each
    assert tuple(schema["$defs"]["PredictSettings"]["properties"]["model"]["enum"]) == MODEL_NAMES
    for name, info in MODELS.items():
        assert info.family in FAMILIES and info.citation and info.code
        assert name in STEP_MIB_PER_100K  # the workflow can size every training job
        hp = default_hparams(name)
        assert json.loads(json.dumps(hp)) == hp
        assert build_model(name, 8, 2, hp).config.__dict__ == hp
        TrainSettings(**train_settings(name).model_dump(mode="json"))  # valid training defaults
    assert default_hparams("srmil_norec")["w_rec"] == 0.0
    assert default_hparams("srmil_nomask")["mask_ratio"] == 0.0
    assert train_settings("srmil_raw").model_dump(mode="json")["standardize_features"] is False
    with pytest.raises(ValueError, match="unknown model 'nosuch'"):
        model_info("nosuch")


def test_variants_inherit_their_family_settings_except_the_switched_one():
    config = {"srmil": {"model": {"mask_ratio": 0.5, "heads": 2}, "train": {"epochs": 7}},
              "srmil_nomask": {"model": {"cls_hidden": 16}}}
    assert inherited_settings("srmil_norec", "model", config) == {"mask_ratio": 0.5,
                                                                  "heads": 2}
    # The variant's own switch (mask_ratio 0) is not overridden by train.srmil's 0.5.
    assert inherited_settings("srmil_nomask", "model", config) == {"heads": 2, "cls_hidden": 16}
    assert inherited_settings("srmil_raw", "train", config) == {"epochs": 7}
    assert inherited_settings("dsmil", "model", config) == {}


def test_reference_training_defaults():
    dsmil, dtfd = (train_settings(m).model_dump(mode="json") for m in ("dsmil", "dtfd"))
    assert (dsmil["optimizer"], dsmil["lr"], dsmil["weight_decay"], dsmil["betas"],
            dsmil["min_lr"]) == ("adam", 1e-4, 1e-3, [0.5, 0.9], 5e-6)
    assert (dtfd["lr"], dtfd["weight_decay"], dtfd["scheduler"], dtfd["step_gamma"]) == (
        1e-4, 1e-4, "step", 0.2)
    assert train_settings("transmil").model_dump(mode="json")["optimizer"] == "lookahead_radam"
    for name in ("clam_sb", "patchgcn", "meanpool", "maxpool"):
        settings = train_settings(name)
        assert {k: getattr(settings, k) for k in ("optimizer", "lr", "weight_decay",
                                                  "scheduler")} == {
            "optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-5, "scheduler": "none"}


# --- every model on tiny bags ------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("dim", "n_classes", "n"), [(8, 2, 1), (12, 3, 7), (16, 2, 40)])
def test_shapes_attention_and_loss(name, dim, n_classes, n):
    torch.manual_seed(0)
    model = build_model(name, dim, n_classes, small(name))
    x, edges = grid_bag(n, dim)
    for train in (True, False):
        model.train(train)
        out = model(x, edges)
        assert out.logits.shape == (n_classes,) and out.attention.shape == (n,)
        assert torch.all(out.attention >= 0)
        assert out.attention.sum().item() == pytest.approx(1.0, abs=1e-5)
    model.train()
    loss, parts = model.training_loss(x, edges, n_classes - 1)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(isinstance(v, float) and math.isfinite(v) for v in parts.values())
    assert parts["loss"] == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(ValueError):
        model.training_loss(x, edges, n_classes)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_deterministic_and_weights_only_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, 12, 3, small(name)).eval()
    x, edges = grid_bag(30, 12)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.manual_seed(1)
    twin = build_model(name, 12, 3, small(name)).eval()
    twin.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    with torch.no_grad():
        a, b, c = model(x, edges), model(x, edges), twin(x, edges)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.attention, b.attention)
    assert torch.equal(a.logits, c.logits) and torch.equal(a.attention, c.attention)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_training_steps(name):
    x, edges = grid_bag(20, 8)

    def run() -> list[float]:
        torch.manual_seed(3)
        model = build_model(name, 8, 2, small(name))
        config = TrainSettings(**train_settings(name).model_dump(mode="json"))
        optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay,
                                    config.betas)
        losses = []
        for step in range(3):
            optimizer.zero_grad()
            loss, _ = model.training_loss(x, edges, step % 2)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    assert run() == run()


# --- SRMIL's ablations -------------------------------------------------------------------------


def decoder_parameters(model) -> list[torch.nn.Parameter]:
    return [*model.decoder.parameters(), *model.encoder_to_decoder.parameters(),
            model.dec_mask_token]


def test_without_reconstruction_the_decoder_gets_no_gradient():
    x, edges = grid_bag(25, 8)
    for name, expect_rec in (("srmil", True), ("srmil_norec", False)):
        torch.manual_seed(0)
        model = build_model(name, 8, 2, small(name))
        decoded: list[int] = []
        model.decoder[0].register_forward_pre_hook(lambda _m, _a, seen=decoded: seen.append(1))
        loss, parts = model.training_loss(x, edges, 1)
        loss.backward()
        grads = [p.grad for p in decoder_parameters(model)]
        if expect_rec:
            assert decoded and parts["rec"] > 0
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:  # classification only: the decoder never runs
            assert not decoded and parts["rec"] == 0.0
            assert all(g is None or not g.any() for g in grads)
            assert parts["loss"] == pytest.approx(2 * parts["ce"])
            assert model.encoder[0].conv.lin.weight.grad.abs().sum() > 0  # the encoder learns


def test_reconstruction_without_masking_rebuilds_every_unmasked_patch():
    torch.manual_seed(0)
    n = 20
    model = build_model("srmil_nomask", 8, 2, small("srmil_nomask"))
    x, edges = grid_bag(n, 8)
    seen, outputs = [], []
    model.input_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    model.decoder[-1].register_forward_hook(lambda _m, _a, out: outputs.append(out[0].detach()))
    loss, parts = model.training_loss(x, edges, 0)
    loss.backward()
    assert all(torch.equal(s, x) for s in seen if len(s) == n)  # no patch is masked
    expected = (1 - torch.cosine_similarity(outputs[0], x, dim=-1)).mean()  # every patch counts
    assert parts["rec"] == pytest.approx(expected.item(), rel=1e-5)
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert model.dec_mask_token.grad is None or not model.dec_mask_token.grad.any()


# --- known values --------------------------------------------------------------------------------


def test_smooth_top1_svm_known_values():
    logits = torch.tensor([[2.0, 0.0], [10.0, 0.0], [10.0, 0.0]])
    target = torch.tensor([0, 0, 1])
    # row 1: log(1 + exp(-1)); rows 2, 3: scores 10 apart (> log 1000), the hard max: 0 and 11
    expected = (math.log(1 + math.exp(-1)) + 0.0 + 11.0) / 3
    assert smooth_top1_svm(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_clam_clusters_the_top_and_bottom_attended_patches():
    torch.manual_seed(0)
    model = build_model("clam_sb", 6, 2, {"k_sample": 2, "dropout": 0.0, "inst_loss": "ce"})
    x = torch.randn(7, 6)
    with torch.no_grad():
        h = model.embed(x)
        attention = model.attention(h)
    order = torch.argsort(attention, descending=True)
    seen = []
    model.instance_classifiers[1].register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    model.instance_classifiers[0].register_forward_pre_hook(lambda _m, _a: seen.append(None))
    model.training_loss(x, None, 1)
    (rows,) = seen  # binary: only the bag's own class clusters
    assert torch.allclose(rows, h[torch.cat([order[:2], order.flip(0)[:2]])])


def test_pooling_known_values():
    torch.manual_seed(0)
    x = torch.randn(9, 5)
    mean = build_model("meanpool", 5, 3).eval()
    with torch.no_grad():
        out = mean(x)
        expected = mean.classifier(mean.embed(x).mean(dim=0))
    assert torch.allclose(out.logits, expected, atol=1e-6)
    assert torch.allclose(out.attention, torch.full((9,), 1 / 9))
    top = build_model("maxpool", 5, 3).eval()
    with torch.no_grad():
        scores = top.classifier(top.embed(x))
        out = top(x)
    assert torch.equal(out.logits, scores.max(dim=0).values)
    winners = scores.argmax(dim=0)
    expected = torch.zeros(9).index_add(0, winners, torch.full((3,), 1 / 3))
    assert torch.allclose(out.attention, expected)


def test_dsmil_attention_follows_the_critical_patch():
    torch.manual_seed(0)
    model = build_model("dsmil", 6, 2).eval()
    x = torch.randn(11, 6)
    with torch.no_grad():
        out = model(x)
        critical = model.instance_classifier(x)[:, 0].argmax()
        q = model.q(x)
        expected = torch.softmax(q @ q[critical] / math.sqrt(q.shape[1]), dim=0)
        _, bag, _ = model.streams(x)
    assert torch.allclose(out.attention, expected, atol=1e-6)
    # Two classes: one score s, probabilities (1 - sigmoid(s), sigmoid(s)).
    assert torch.allclose(torch.softmax(out.logits, 0)[1], torch.sigmoid(bag[0]), atol=1e-6)


def test_nystrom_with_a_landmark_per_token_is_softmax_attention():
    torch.manual_seed(0)
    n, dim = 16, 32
    att = NystromAttention(dim, heads=2, dim_head=16, landmarks=n, pinv_iterations=30,
                           residual_kernel=0).double().eval()
    x = 3 * torch.randn(1, n, dim, dtype=torch.double)
    out, row = att(x, query=3)
    q, k, v = (t.reshape(1, n, 2, -1).transpose(1, 2) for t in att.qkv(x).chunk(3, dim=-1))
    a = torch.softmax(q * att.scale @ k.transpose(-1, -2), dim=-1)
    exact = att.out((a @ v).transpose(1, 2).reshape(1, n, -1))
    assert torch.allclose(out, exact, atol=1e-12)
    assert torch.allclose(row, a[:, :, 3], atol=1e-12)
    m = torch.rand(3, 5, 5, dtype=torch.double) + torch.eye(5)
    assert torch.allclose(iterative_pinv(m, 30), torch.linalg.inv(m), atol=1e-10)


def test_transmil_attention_folds_the_square_padding_back():
    torch.manual_seed(0)
    model = build_model("transmil", 8, 2, small("transmil")).eval()
    x = torch.randn(7, 8)  # padded to a 3 x 3 grid: patches 0 and 1 appear twice
    with torch.no_grad():
        out = model(x)
    assert out.attention.shape == (7,) and out.attention.sum().item() == pytest.approx(1.0)


def test_dtfd_pseudo_bags_and_attention():
    torch.manual_seed(0)
    model = build_model("dtfd", 6, 2).eval()
    assert [len(g) for g in model.groups(10)] == [3, 3, 2, 2]  # np.array_split's sizes
    assert [len(g) for g in model.groups(3)] == [1, 1, 1]
    assert torch.equal(torch.cat(model.groups(10)).sort().values, torch.arange(10))
    assert all(torch.equal(a, b) for a, b in zip(model.groups(10), model.groups(10),
                                                 strict=True))  # fixed at inference
    x = torch.randn(10, 6)
    for distill in ("AFS", "MaxS", "MaxMinS"):
        model = build_model("dtfd", 6, 2, {"distill": distill}).eval()
        with torch.no_grad():
            out = model(x)
        assert out.attention.sum().item() == pytest.approx(1.0, abs=1e-6)
        if distill != "AFS":  # only the distilled patches carry weight
            assert (out.attention > 0).sum() <= 4 * (2 if distill == "MaxMinS" else 1)


def test_dtfd_tier2_loss_does_not_reach_tier1_and_gradients_are_clipped():
    torch.manual_seed(0)
    model = build_model("dtfd", 6, 2, {"grad_clip": 1e-3})
    x = torch.randn(12, 6)
    torch.manual_seed(5)
    loss, parts = model.training_loss(x, None, 1)
    loss.backward()
    tier1 = {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("tier2")}
    # tier 1's gradient is that of loss0 alone (same pseudo-bags)
    torch.manual_seed(5)
    model.zero_grad()
    sub_logits, *_ = model._tier1(model.scaler(x), model.groups(12))
    torch.nn.functional.cross_entropy(sub_logits, torch.ones(4, dtype=torch.long)).backward()
    for name, p in model.named_parameters():
        if not name.startswith("tier2") and p.grad is not None:
            assert torch.allclose(tier1[name], p.grad, atol=1e-7), name
    model.zero_grad()
    model.training_loss(x, None, 1)[0].backward()
    model.clip_gradients()
    for module in (model.dim_reduction, model.attention, model.classifier):
        norm = torch.norm(torch.stack([p.grad.norm() for p in module.parameters()]))
        assert norm <= 1e-3 * (1 + 1e-4)


def test_sparse_genconv_equals_torch_geometric_genconv():
    from torch_geometric.nn import GENConv

    torch.manual_seed(0)
    cells = np.argwhere(np.random.default_rng(0).random((9, 11)) < 0.7)
    edges = torch.from_numpy(grid_edges(cells * 224, 224, window=2))
    edges = edges[:, torch.randperm(edges.shape[1])]
    n = len(cells)
    conv = SparseGENConv(8, 8, aggr="softmax", t=1.0, learn_t=True, num_layers=2,
                         norm="layer").double()
    with torch.no_grad():
        conv.aggr_module.t.fill_(1.7)
    x = torch.randn(n, 8, dtype=torch.double, requires_grad=True)
    ours = conv(x, SparseGraph.from_edge_index(edges, n))
    theirs = GENConv.forward(conv, x, edges)  # the same module, torch-geometric's aggregation
    assert torch.allclose(ours, theirs, atol=1e-12)
    weights = torch.randn_like(ours)
    a = torch.autograd.grad((ours * weights).sum(), [x, *conv.parameters()])
    b = torch.autograd.grad((theirs * weights).sum(), [x, *conv.parameters()])
    assert all(torch.allclose(u, v, atol=1e-12) for u, v in zip(a, b, strict=True))
    graph = SparseGraph.from_edge_index(edges, n)
    m = torch.rand(n, 3, dtype=torch.double, requires_grad=True)
    t = torch.tensor([1.3], dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, t: _SoftmaxAggregate.apply(m, t, graph), (m, t))


# --- optimisers and schedules --------------------------------------------------------------------


def test_lookahead_synchronises_every_k_steps():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = Lookahead(torch.optim.SGD([p], lr=1.0), alpha=0.5, k=6)
    values = []
    for _ in range(12):
        p.grad = torch.ones(1)
        opt.step()
        values.append(p.item())
    # The slow weights start at the first synchronisation (step 6): -6, then -6 + (-12 + 6) / 2.
    assert values[5] == -6.0 and values[6] == -7.0 and values[11] == -9.0


def test_lookahead_radam_decays_weights_not_biases_and_scheduler_reaches_it():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, "lookahead_radam", 2e-4, 1e-5)
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert groups[1e-5] == {id(model[0].weight)}
    assert groups[0.0] == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert isinstance(opt.base, torch.optim.RAdam) and opt.base.defaults["decoupled_weight_decay"]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2)
    opt.step()
    sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_step_schedule_decays_after_its_share_of_the_epochs():
    model = torch.nn.Linear(2, 2)
    config = TrainSettings(**{**train_settings("dtfd").model_dump(mode="json"), "epochs": 10})
    optimizer, scheduler = _optimiser(model, config)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == [1e-4] * 5 and lrs[5:] == pytest.approx([2e-5] * 5)
    assert list(TrainSettings.model_fields).count("betas") == 1


# --- every model learns the tiny cohort ---------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline_cohort")
    samples, features_dir, graphs_dir = synthetic_cohort(root, n_patients=12)
    splits = make_splits(samples, n_folds=3, val_fraction=0.25, seed=0)
    return samples, splits, features_dir, graphs_dir


# The references' learning rates of 1e-4 (DSMIL, DTFD-MIL) need more than a few dozen steps.
FASTER = {"dsmil": {"lr": 3e-3}, "dtfd": {"lr": 1e-3}}
# Full-size models, except TransMIL's 256 landmarks (seconds per tiny bag on a CPU). SRMIL's
# small size learns these few labels too slowly (reconstruction weighs 1.8 against 0.2).
LEARN = {"transmil": {"landmarks": 8}, "patchgcn": {"hidden_dim": 16}}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_learns_the_tiny_cohort(cohort, tmp_path, name):
    samples, splits, features_dir, graphs_dir = cohort
    out = tmp_path / f"{name}.pt"
    meta = train_fold(name, splits, 0, samples, features_dir, graphs_dir, out,
                      model_hparams=LEARN.get(name),
                      train_hparams={"epochs": 12, "select_after": 0.5, **FASTER.get(name, {})},
                      device="cpu", threads=1)
    assert meta["model"] == name and meta["train_config"]["epochs"] == 12
    state = torch.load(out, weights_only=True)  # a plain state dict, nothing unpickled
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    model, loaded = load_model(out)
    assert loaded == meta
    if name == "srmil_raw":  # features left as they are: the scaler stays the identity
        assert not model.scaler.mean.any() and torch.all(model.scaler.std == 1)
    label_of = samples.set_index("slide_id")["label"]
    ids = splits["folds"][0]["train"]
    probs, attention = predict_bags(model, [load_bag(features_dir, graphs_dir, s) for s in ids],
                                    "cpu")
    y = np.array([splits["classes"].index(label_of[s]) for s in ids])
    assert classification_metrics(y, probs, 2)["auc"] == 1.0  # the training slides separate
    assert all(a.sum() == pytest.approx(1.0, abs=1e-5) for a in attention)
