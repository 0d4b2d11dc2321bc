"""Check srmil's baselines against their authors' reference code: equal weights, equal inputs,
float64, on the CPU.

For each model the reference's own module is imported from its checkout, given our model's
weights, and both are run side by side on the same random bags (seeded per step, so that
dropout draws the same masks): the evaluation outputs (logits or probabilities, and the
attention where the reference exposes it), then several training steps, each comparing the loss,
every parameter's gradient and every parameter after the optimiser step (the reference's
optimiser, loss weighting and clipping against ours). It prints the largest absolute difference
of each and fails (exit 1) when one exceeds --tol.

The references cannot be fetched in CI, so this is a script, not a test. Give a folder with the
checkouts named owner+repo (e.g. `git clone https://github.com/mahmoodlab/CLAM
refs/mahmoodlab+CLAM`), or each one with --ref:

    python benchmarks/reference_check.py --refs /tmp/refs                     # every model
    python benchmarks/reference_check.py --refs /tmp/refs --models clam_sb dsmil
    python benchmarks/reference_check.py --ref CLAM=/src/CLAM --models clam_sb

Checkouts used (the commits docs/method.md quotes): mahmoodlab/CLAM and oval-group/smooth-topk
(CLAM's SVM loss; needs the `future` package), binli123/dsmil-wsi, szc19990412/TransMIL and
lucidrains/nystrom-attention (needs `einops`), mahmoodlab/Patch-GCN, hrzhang1123/DTFD-MIL,
lingxitong/MIL_BASELINE (mean and max pooling). Extra packages can live in a folder given by
--deps (`pip install --target DIR einops future`) so that the srmil environment stays as it is.

Two shims keep the references on the CPU and in float64 without changing their maths: while a
reference module runs, `Tensor.cuda()` returns the tensor itself (TransMIL moves its class token
to CUDA) and `Tensor.float()` keeps float64 (TransMIL casts its input, and its RAdam computes in
float32 through `.float()`). DTFD-MIL's pseudo-bags
come from `random.shuffle`; the check hands it the permutation our model draws. TransMIL's
Lookahead predates torch 2's optimiser step hooks; the check gives it empty ones.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import random
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))

from srmil.graph import grid_edges  # noqa: E402
from srmil.mil.models import build_model  # noqa: E402
from srmil.mil.optim import build_optimizer  # noqa: E402
from srmil.settings import train_settings  # noqa: E402

REPOS = {
    "CLAM": "mahmoodlab+CLAM",
    "smooth-topk": "oval-group+smooth-topk",
    "dsmil-wsi": "binli123+dsmil-wsi",
    "TransMIL": "szc19990412+TransMIL",
    "nystrom-attention": "lucidrains+nystrom-attention",
    "Patch-GCN": "mahmoodlab+Patch-GCN",
    "DTFD-MIL": "hrzhang1123+DTFD-MIL",
    "MIL_BASELINE": "lingxitong+MIL_BASELINE",
}


# --- loading reference code --------------------------------------------------------------------


_ON_PATH: list[str] = []


def load_file(path: Path, name: str, search: list[Path] = ()) -> types.ModuleType:
    """Import one reference file as module `name` (its package's __init__ is not run: several
    import training frameworks the model does not need), with `search` on sys.path."""
    # Only this reference's folders on the path, and no modules left from another checkout
    # (several have a top-level `models`).
    for folder in _ON_PATH:
        sys.path.remove(folder)
    _ON_PATH.clear()
    for folder in reversed(search):
        sys.path.insert(0, str(folder))
        _ON_PATH.append(str(folder))
        for entry in Path(folder).iterdir():
            for key in [k for k in sys.modules if k.split(".")[0] == entry.stem]:
                del sys.modules[key]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def reference_shims() -> Iterator[None]:
    cuda, as_float = torch.Tensor.cuda, torch.Tensor.float
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.float = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.float = cuda, as_float


def copy_weights(ours: nn.Module, ref: nn.Module, key_map: Callable[[str], str | None]) -> None:
    """Load our state dict into the reference under `key_map` (None: a key it lacks); every
    reference parameter must be covered (its own constant buffers stay)."""
    mapped = {}
    for key, value in ours.state_dict().items():
        target = key_map(key)
        if target is not None:
            mapped[target] = value.clone()
    own = ref.state_dict()
    uncovered = set(dict(ref.named_parameters())) - set(mapped)
    if uncovered:
        raise AssertionError(f"reference parameters without a counterpart: {sorted(uncovered)}")
    ref.load_state_dict({**{k: v for k, v in own.items() if k not in mapped}, **mapped},
                        strict=True)


# --- the comparison ----------------------------------------------------------------------------


@dataclass
class Bag:
    x: Tensor
    edges: Tensor
    label: int


def make_bags(sizes: list[int], dim: int, n_classes: int, seed: int = 0) -> list[Bag]:
    gen = torch.Generator().manual_seed(seed)
    bags = []
    for i, n in enumerate(sizes):
        side = math.ceil(math.sqrt(n))
        cells = np.argwhere(np.ones((side, side), dtype=bool))[:n]
        edges = torch.from_numpy(grid_edges(cells * 224, 224, window=1))
        x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        bags.append(Bag(x, edges, i % n_classes))
    return bags


@dataclass
class Report:
    model: str
    diffs: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, a: Tensor | float, b: Tensor | float) -> None:
        a = torch.as_tensor(a, dtype=torch.float64).detach()
        b = torch.as_tensor(b, dtype=torch.float64).detach()
        if a.shape != b.shape:
            raise AssertionError(f"{self.model} {name}: shapes {tuple(a.shape)} and "
                                 f"{tuple(b.shape)}")
        diff = float((a - b).detach().abs().max()) if a.numel() else 0.0
        self.diffs[name] = max(self.diffs.get(name, 0.0), diff)


def grads(model: nn.Module, key_map: Callable[[str], str | None]) -> dict[str, Tensor]:
    """Gradients by reference parameter name (zeros where a parameter got none)."""
    out = {}
    for name, p in model.named_parameters():
        target = key_map(name) if key_map else name
        if target is not None:
            out[target] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    return out


def ours_step(model: nn.Module, optimizer: torch.optim.Optimizer, bag: Bag) -> float:
    """One step as srmil.mil.train does it: loss, backward, the model's clipping, optimiser."""
    optimizer.zero_grad(set_to_none=True)
    loss, _ = model.training_loss(bag.x, bag.edges, bag.label)
    loss.backward()
    if hasattr(model, "clip_gradients"):
        model.clip_gradients()
    return loss.item()


def ours_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    config = train_settings(name)
    return build_optimizer(model, config.optimizer, config.lr, config.weight_decay, config.betas)


def compare_training(report: Report, ours: nn.Module, ref: nn.Module, bags: list[Bag],
                     key_map: Callable[[str], str | None],
                     ref_loss: Callable[[Bag], Tensor], ref_optimizer: torch.optim.Optimizer,
                     steps: int, name: str) -> None:
    """`steps` training steps on the bags in turn, each from the same seed on both sides."""
    optimizer = ours_optimizer(name, ours)
    ours.train()
    ref.train()
    for step in range(steps):
        bag = bags[step % len(bags)]
        torch.manual_seed(1000 + step)
        loss = ours_step(ours, optimizer, bag)
        torch.manual_seed(1000 + step)
        ref_optimizer.zero_grad()
        with reference_shims():
            theirs = ref_loss(bag)
        theirs.backward()
        report.add("loss", loss, theirs.item())
        ours_grads, ref_grads = grads(ours, key_map), grads(ref, None)
        for key, g in ours_grads.items():
            report.add("gradient", g, ref_grads[key])
        optimizer.step()
        with reference_shims():  # TransMIL's RAdam casts to float32 with .float()
            ref_optimizer.step()
        ref_params = dict(ref.named_parameters())
        for key, p in ours.named_parameters():
            if key_map(key) is not None:
                report.add("parameters after the step", p.detach(), ref_params[key_map(key)])


def prefix_map(pairs: dict[str, str | None]) -> Callable[[str], str | None]:
    """Map keys by their longest matching prefix; `scaler.` (ours only) maps to None."""
    def key_map(key: str) -> str | None:
        if key.startswith("scaler."):
            return None
        for prefix in sorted(pairs, key=len, reverse=True):
            if key.startswith(prefix):
                target = pairs[prefix]
                return None if target is None else target + key[len(prefix):]
        return key
    return key_map


def seeded_model(name: str, dim: int, n_classes: int, hparams: dict | None = None) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, dim, n_classes, hparams).double()


# --- the models ------------------------------------------------------------------------------


def check_pooling(refs: dict[str, Path], name: str, n_classes: int) -> Report:
    root = refs["MIL_BASELINE"]
    pool = "MEAN" if name == "meanpool" else "MAX"
    module = load_file(root / "modules" / f"{pool}_MIL" / f"{pool.lower()}_mil.py",
                       f"ref_{pool.lower()}_mil", [root])
    dim = 24
    ours = seeded_model(name, dim, n_classes)
    ref = getattr(module, f"{pool}_MIL")(num_classes=n_classes, dropout=0.1, act=nn.ReLU(),
                                         in_dim=dim).double()
    key_map = prefix_map({"embed.": "head."})
    copy_weights(ours, ref, key_map)
    report = Report(f"{name}, {n_classes} classes")
    bags = make_bags([37, 5, 60], dim, n_classes)
    ours.eval()
    ref.eval()
    for bag in bags:
        out = ours(bag.x, bag.edges)
        report.add("eval logits", out.logits, ref(bag.x.unsqueeze(0))["logits"][0])

    def ref_loss(bag: Bag) -> Tensor:
        logits = ref(bag.x.unsqueeze(0))["logits"]
        return nn.functional.cross_entropy(logits, torch.tensor([bag.label]))

    opt = torch.optim.Adam(ref.parameters(), lr=2e-4, weight_decay=1e-5)
    compare_training(report, ours, ref, bags, key_map, ref_loss, opt, 6, name)
    return report


def check_clam(refs: dict[str, Path], n_classes: int, inst_loss: str) -> Report:
    module = load_file(refs["CLAM"] / "models" / "model_clam.py", "ref_model_clam")
    dim = 32
    ours = seeded_model("clam_sb", dim, n_classes, {"inst_loss": inst_loss})
    if inst_loss == "svm":
        svm = load_file(refs["smooth-topk"] / "topk" / "svm.py", "ref_topk_svm",
                        [refs["smooth-topk"]])
        SmoothTop1SVM = svm.SmoothTop1SVM  # noqa: N806

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Setting tau"
            instance_loss_fn = SmoothTop1SVM(n_classes=2)
    else:
        instance_loss_fn = nn.CrossEntropyLoss()
    ref = module.CLAM_SB(gate=True, size_arg="small", dropout=0.25, k_sample=8,
                         n_classes=n_classes, instance_loss_fn=instance_loss_fn,
                         subtyping=n_classes > 2, embed_dim=dim).double()
    key_map = prefix_map({"embed.0.": "attention_net.0.",
                          "attention.tanh_branch.": "attention_net.3.attention_a.0.",
                          "attention.sigmoid_branch.": "attention_net.3.attention_b.0.",
                          "attention.score.": "attention_net.3.attention_c.",
                          "classifier.": "classifiers."})
    copy_weights(ours, ref, key_map)
    report = Report(f"clam_sb, {n_classes} classes, instance loss {inst_loss}")
    bags = make_bags([40, 23, 70], dim, n_classes)
    ours.eval()
    ref.eval()
    for bag in bags:
        out = ours(bag.x, bag.edges)
        logits, _, _, raw, _ = ref(bag.x)
        report.add("eval logits", out.logits, logits[0])
        report.add("eval attention", out.attention, torch.softmax(raw[0], dim=0))

    def ref_loss(bag: Bag) -> Tensor:
        label = torch.tensor([bag.label])
        logits, _, _, _, extra = ref(bag.x, label=label, instance_eval=True)
        ce = nn.functional.cross_entropy(logits, label)
        return 0.7 * ce + 0.3 * extra["instance_loss"]  # CLAM's bag_weight 0.7

    opt = torch.optim.Adam(ref.parameters(), lr=2e-4, weight_decay=1e-5)
    compare_training(report, ours, ref, bags, key_map, ref_loss, opt, 6, "clam_sb")
    return report


def check_dsmil(refs: dict[str, Path], n_classes: int) -> Report:
    module = load_file(refs["dsmil-wsi"] / "dsmil.py", "ref_dsmil")
    dim, k = 48, (1 if n_classes == 2 else n_classes)
    ours = seeded_model("dsmil", dim, n_classes)
    ref = module.MILNet(module.FCLayer(in_size=dim, out_size=k),
                        module.BClassifier(input_size=dim, output_class=k, dropout_v=0.0,
                                           nonlinear=1)).double()
    key_map = prefix_map({"instance_classifier.": "i_classifier.fc.0.", "q.": "b_classifier.q.",
                          "fcc.": "b_classifier.fcc."})
    copy_weights(ours, ref, key_map)
    report = Report(f"dsmil, {n_classes} classes")
    bags = make_bags([30, 64, 9], dim, n_classes)

    def target(bag: Bag) -> Tensor:
        if k == 1:
            return torch.tensor([[float(bag.label)]], dtype=torch.float64)
        return nn.functional.one_hot(torch.tensor([bag.label]), k).double()

    ours.eval()
    ref.eval()
    for bag in bags:
        out = ours(bag.x, bag.edges)
        _, bag_score, attention, _ = ref(bag.x)
        p = torch.sigmoid(bag_score[0])  # the reference's test score (average off)
        ours_p = torch.softmax(out.logits, dim=0)
        report.add("eval probability", ours_p[1:] if k == 1 else ours_p, p if k == 1
                   else p / p.sum())
        report.add("eval attention", out.attention, attention.mean(dim=1))

    criterion = nn.BCEWithLogitsLoss()

    def ref_loss(bag: Bag) -> Tensor:
        instances, bag_score, _, _ = ref(bag.x)
        max_score, _ = torch.max(instances, 0)
        y = target(bag)
        return 0.5 * criterion(bag_score.view(1, -1), y) + 0.5 * criterion(max_score.view(1, -1), y)

    opt = torch.optim.Adam(ref.parameters(), lr=1e-4, betas=(0.5, 0.9), weight_decay=1e-3)
    compare_training(report, ours, ref, bags, key_map, ref_loss, opt, 6, "dsmil")
    return report


def check_transmil(refs: dict[str, Path]) -> Report:
    module = load_file(refs["TransMIL"] / "models" / "TransMIL.py", "ref_transmil",
                       [refs["nystrom-attention"]])
    optim_module = load_file(refs["TransMIL"] / "MyOptimizer" / "__init__.py", "MyOptimizer",
                             [refs["TransMIL"]])
    dim, n_classes = 1024, 2  # the reference's input size is fixed
    ours = seeded_model("transmil", dim, n_classes)
    ref = module.TransMIL(n_classes=n_classes).double()
    key_map = prefix_map({"fc1.": "_fc1.", "fc2.": "_fc2.", "ppeg.proj7.": "pos_layer.proj.",
                          "ppeg.proj5.": "pos_layer.proj1.", "ppeg.proj3.": "pos_layer.proj2.",
                          "layer1.attn.qkv.": "layer1.attn.to_qkv.",
                          "layer1.attn.out.": "layer1.attn.to_out.0.",
                          "layer1.attn.value_conv.": "layer1.attn.res_conv.",
                          "layer2.attn.qkv.": "layer2.attn.to_qkv.",
                          "layer2.attn.out.": "layer2.attn.to_out.0.",
                          "layer2.attn.value_conv.": "layer2.attn.res_conv."})
    copy_weights(ours, ref, key_map)
    report = Report("transmil, 2 classes")
    bags = make_bags([300, 1000, 7], dim, n_classes)
    ours.eval()
    ref.eval()
    with torch.no_grad(), reference_shims():
        for bag in bags:
            theirs = ref(data=bag.x.unsqueeze(0))["logits"][0]
            report.add("eval logits", ours(bag.x, bag.edges).logits, theirs)

    def ref_loss(bag: Bag) -> Tensor:
        logits = ref(data=bag.x.unsqueeze(0))["logits"]
        return nn.functional.cross_entropy(logits, torch.tensor([bag.label]))

    args = types.SimpleNamespace(opt="lookahead_radam", lr=2e-4, weight_decay=1e-5,
                                 opt_eps=None, opt_betas=None, momentum=None)
    with warnings_off():
        opt = optim_module.create_optimizer(args, ref)
        # Its Lookahead skips Optimizer.__init__, whose step hooks torch 2 now expects.
        opt._optimizer_step_pre_hooks, opt._optimizer_step_post_hooks = {}, {}
        compare_training(report, ours, ref, bags, key_map, ref_loss, opt, 8, "transmil")
    return report


@contextlib.contextmanager
def warnings_off() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():  # deprecated argument orders in the reference optimisers
        warnings.simplefilter("ignore")
        yield


def check_patchgcn(refs: dict[str, Path]) -> Report:
    from torch_geometric.data import Data

    module = load_file(refs["Patch-GCN"] / "models" / "model_graph_mil.py", "ref_patchgcn",
                       [refs["Patch-GCN"]])
    dim, n_classes = 1024, 2  # the reference's input size is fixed
    ours = seeded_model("patchgcn", dim, n_classes)
    ref = module.PatchGCN_Surv(num_layers=4, edge_agg="spatial", resample=0,
                               n_classes=n_classes).double()
    key_map = prefix_map({"phi.": "path_phi.", "rho.": "path_rho.",
                          "attention.tanh_branch.": "path_attention_head.attention_a.0.",
                          "attention.sigmoid_branch.": "path_attention_head.attention_b.0.",
                          "attention.score.": "path_attention_head.attention_c."})
    copy_weights(ours, ref, key_map)
    report = Report("patchgcn, 2 classes")
    bags = make_bags([50, 81, 20], dim, n_classes)
    captured: list[Tensor] = []
    ref.classifier.register_forward_hook(lambda _m, _a, out: captured.append(out))

    def ref_forward(bag: Bag) -> tuple[Tensor, Tensor]:
        captured.clear()
        _, _, _, attention, _ = ref(x_path=Data(x=bag.x, edge_index=bag.edges))
        return captured[0], torch.softmax(attention[0], dim=0)

    ours.eval()
    ref.eval()
    with torch.no_grad():
        for bag in bags:
            out = ours(bag.x, bag.edges)
            logits, attention = ref_forward(bag)
            report.add("eval logits", out.logits, logits)
            report.add("eval attention", out.attention, attention)

    def ref_loss(bag: Bag) -> Tensor:
        logits, _ = ref_forward(bag)
        return nn.functional.cross_entropy(logits.unsqueeze(0), torch.tensor([bag.label]))

    opt = torch.optim.Adam(ref.parameters(), lr=2e-4, weight_decay=1e-5)
    compare_training(report, ours, ref, bags, key_map, ref_loss, opt, 6, "patchgcn")
    return report


class _Writer:
    def __init__(self) -> None:
        self.scalars: dict[str, float] = {}

    def add_scalar(self, name: str, value: Any, step: int = 0) -> None:
        self.scalars[name.strip()] = float(value)


def check_dtfd(refs: dict[str, Path], distill: str, clip: float = 5.0) -> Report:
    root = refs["DTFD-MIL"]
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = _Writer  # only imported by the script, not used here
    sys.modules["torch.utils.tensorboard"] = tensorboard
    main = load_file(root / "Main_DTFD_MIL.py", "ref_dtfd_main", [root])
    attention_module, network = sys.modules["Model.Attention"], sys.modules["Model.network"]
    dim, n_classes, groups, total = 40, 2, 4, 4
    hparams = {"distill": distill, "n_groups": groups, "total_instance": total,
               "grad_clip": clip}
    ours = seeded_model("dtfd", dim, n_classes, hparams)
    classifier = network.Classifier_1fc(512, n_classes, 0.0).double()
    attention = attention_module.Attention_Gated(512).double()
    reduction = network.DimReduction(dim, 512, numLayer_Res=0).double()
    tier2 = attention_module.Attention_with_Classifier(L=512, num_cls=n_classes,
                                                       droprate=0.0).double()
    ref = nn.ModuleDict({"dim_reduction": reduction, "attention": attention,
                         "classifier": classifier, "tier2": tier2})
    key_map = prefix_map({"dim_reduction.0.": "dim_reduction.fc1.",
                          "attention.tanh_branch.": "attention.attention_V.0.",
                          "attention.sigmoid_branch.": "attention.attention_U.0.",
                          "attention.score.": "attention.attention_weights.",
                          "classifier.1.": "classifier.fc.",
                          "tier2_attention.tanh_branch.": "tier2.attention.attention_V.0.",
                          "tier2_attention.sigmoid_branch.": "tier2.attention.attention_U.0.",
                          "tier2_attention.score.": "tier2.attention.attention_weights.",
                          "tier2_classifier.1.": "tier2.classifier.fc."})
    copy_weights(ours, ref, key_map)
    report = Report(f"dtfd, distill {distill}, gradients clipped to {clip:g}")
    bags = make_bags([45, 30, 61], dim, n_classes)
    params = types.SimpleNamespace(device="cpu", grad_clipping=clip, batch_size=1,
                                   batch_size_v=1, train_show_freq=10**9, num_MeanInference=1)
    permutations: list[list[int]] = []

    def shuffle(items: list) -> None:  # the reference's random.shuffle: our permutation
        if len(items) > 1:
            items[:] = permutations.pop(0)

    main.random = types.SimpleNamespace(shuffle=shuffle)

    # Evaluation: the reference's test routine on all bags, its tier-2 outputs captured.
    captured: list[Tensor] = []
    hook = tier2.register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    ours.eval()
    for bag in bags:
        gen = torch.Generator().manual_seed(ours.config.eval_seed)
        permutations.append(torch.randperm(len(bag.x), generator=gen).tolist())
    data = ([f"s{i}" for i in range(len(bags))], [b.x for b in bags], [b.label for b in bags])
    with contextlib.redirect_stdout(io.StringIO()):  # its log lines
        main.test_attention_DTFD_preFeat_MultipleMean(
            mDATA_list=data, classifier=classifier, dimReduction=reduction,
            attention=attention, UClassifier=tier2, epoch=0,
            criterion=nn.CrossEntropyLoss(reduction="none"), params=params, f_log=io.StringIO(),
            writer=_Writer(), numGroup=groups, total_instance=total, distill=distill)
    hook.remove()
    for bag, theirs in zip(bags, captured, strict=True):
        report.add("eval logits", ours(bag.x, bag.edges).logits, theirs)

    # Training: the reference's own step (two Adams, clipping), one bag per call.
    optimizer = ours_optimizer("dtfd", ours)
    opt0 = torch.optim.Adam([*classifier.parameters(), *attention.parameters(),
                             *reduction.parameters()], lr=1e-4, weight_decay=1e-4)
    opt1 = torch.optim.Adam(tier2.parameters(), lr=1e-4, weight_decay=1e-4)
    stepped: dict[str, Tensor] = {}
    names = {id(p): name for name, p in ref.named_parameters()}

    def recording(opt: torch.optim.Optimizer, defer: bool) -> Callable[[], Any]:
        """Record the gradients each step uses; with `defer` leave the step to the caller."""
        step = opt.step

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        stepped[names[id(p)]] = p.grad.clone()
            return None if defer else step(*args, **kwargs)
        opt.step = wrapped
        return step

    # The reference steps tier 1 before tier 2's backward passes through tier 1's (saved)
    # weights; torch < 1.5-era optimisers changed them through `.data`, unseen by autograd, and
    # torch 2 refuses. Tier 1's step is therefore taken after the reference's routine, with
    # the gradients it stepped with (tier 2's backward only adds to them what the reference
    # discards at its next zero_grad).
    step_tier1 = recording(opt0, defer=True)
    recording(opt1, defer=False)
    ours.train()
    ref.train()
    for step in range(6):
        bag = bags[step % len(bags)]
        torch.manual_seed(1000 + step)
        permutations[:] = [torch.randperm(len(bag.x)).tolist()]
        torch.manual_seed(1000 + step)
        loss = ours_step(ours, optimizer, bag)
        writer = _Writer()
        with contextlib.redirect_stdout(io.StringIO()):
            main.train_attention_preFeature_DTFD(
                mDATA_list=(["s"], [bag.x], [bag.label]), classifier=classifier,
                dimReduction=reduction, attention=attention, UClassifier=tier2,
                optimizer0=opt0, optimizer1=opt1, epoch=0,
                ce_cri=nn.CrossEntropyLoss(reduction="none"), params=params,
                f_log=io.StringIO(), writer=writer, numGroup=groups, total_instance=total,
                distill=distill)
        for name, p in ref.named_parameters():
            if not name.startswith("tier2."):
                p.grad = stepped[name].clone()
        step_tier1()
        report.add("loss", loss, writer.scalars["train_loss_0"] + writer.scalars["train_loss_1"])
        for key, g in grads(ours, key_map).items():
            report.add("gradient", g, stepped.get(key, torch.zeros_like(g)))
        optimizer.step()
        ref_params = dict(ref.named_parameters())
        for key, p in ours.named_parameters():
            report.add("parameters after the step", p.detach(), ref_params[key_map(key)])
    return report


CHECKS: dict[str, Callable[[dict[str, Path]], list[Report]]] = {
    "meanpool": lambda r: [check_pooling(r, "meanpool", c) for c in (2, 3)],
    "maxpool": lambda r: [check_pooling(r, "maxpool", c) for c in (2, 3)],
    "clam_sb": lambda r: [check_clam(r, 2, "svm"), check_clam(r, 3, "svm"),
                          check_clam(r, 2, "ce")],
    "dsmil": lambda r: [check_dsmil(r, 2), check_dsmil(r, 3)],
    "transmil": lambda r: [check_transmil(r)],
    "patchgcn": lambda r: [check_patchgcn(r)],
    "dtfd": lambda r: [check_dtfd(r, "AFS"), check_dtfd(r, "MaxMinS"),
                       check_dtfd(r, "AFS", clip=0.01)],  # clipping active
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refs", type=Path, default=None, help="folder of owner+repo checkouts")
    p.add_argument("--ref", action="append", default=[], metavar="NAME=PATH",
                   help=f"one checkout; NAME is one of {', '.join(REPOS)}")
    p.add_argument("--deps", type=Path, default=None, help="extra packages (einops, future)")
    p.add_argument("--models", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.deps:
        sys.path.insert(0, str(args.deps))
    refs = {name: (args.refs / folder) for name, folder in REPOS.items()} if args.refs else {}
    for item in args.ref:
        name, _, path = item.partition("=")
        refs[name] = Path(path)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # parameters the references create themselves
    random.seed(0)
    results, worst = [], 0.0
    for model in args.models:
        for report in CHECKS[model](refs):
            results.append({"check": report.model, **report.diffs})
            worst = max(worst, *report.diffs.values())
            print(f"{report.model}: " + ", ".join(f"{k} {v:.1e}" for k, v in
                                                report.diffs.items()), flush=True)
    print(f"largest difference {worst:.1e} (tolerance {args.tol:g})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
