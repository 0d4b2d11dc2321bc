"""The MIL models the workflow can train: names, citations, reference code and defaults.

No torch here: the workflow reads this while Snakemake parses (model names, memory per job), and
the CLI builds its argument choices from it. The code of each model family lives in
`srmil.mil.models.<family>`; `srmil.mil.models.build_model(name, ...)` builds any name listed here.

A *variant* is a named setting of a family, sharing its code: SRMIL without reconstruction,
without masking, on raw features. Its `hparams` and `train` override the family's defaults, and
in the workflow they also win over `train.<family>` settings it inherits (see
`inherited_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    name: str  # used in config.yaml, result paths and checkpoints
    family: str  # module of srmil.mil.models holding the code
    title: str
    citation: str
    code: str  # the public reference implementation (repository at the commit read)
    hparams: dict[str, Any] = field(default_factory=dict)  # overrides of the family defaults
    train: dict[str, Any] = field(default_factory=dict)  # overrides of srmil.mil.train.TrainConfig
    attention: bool = True  # per-patch weights worth a heatmap
    graph: bool = False  # uses the spatial graph
    # Training-step memory per 100k patches on the CPU (MiB above the process's start):
    # intercept + slope per feature dimension, from benchmarks/mil.py (docs/method.md, "Memory";
    # measured at D = 512, and for SRMIL and ABMIL at 1024 too); see srmil.workflow.
    step_mib_per_100k: tuple[float, float] = (1450.0, 0.2)

    @property
    def base(self) -> str:
        """The family's main model name (a variant's parent; the model itself otherwise)."""
        return FAMILY_MAIN.get(self.family, self.name)


SRMIL_PAPER = ("Wu, Xu, Gao, Diao, Li, Gui. Exploiting label-independent regularization from "
               "spatial dependencies for whole slide image analysis. WACV 2026 "
               "(arXiv 2602.19487)")
SRMIL_CODE = "github.com/wwyi1828/SRMIL@7bb63e8"
SRMIL_MEMORY = (4600.0, 5.2)  # also for its ablations (srmil_norec needs about 0.6 of it)
# Adam as CLAM trains its attention models (lr 2e-4 in its README's commands, weight decay
# 1e-5), no schedule.
CLAM_ADAM = {"optimizer": "adam", "lr": 2e-4, "weight_decay": 1e-5, "scheduler": "none"}

MODELS: dict[str, ModelInfo] = {m.name: m for m in [
    ModelInfo("srmil", "srmil", "SRMIL", SRMIL_PAPER, SRMIL_CODE, graph=True,
              step_mib_per_100k=SRMIL_MEMORY),
    ModelInfo("srmil_norec", "srmil", "SRMIL without reconstruction", SRMIL_PAPER, SRMIL_CODE,
              hparams={"w_rec": 0.0}, graph=True, step_mib_per_100k=SRMIL_MEMORY),
    ModelInfo("srmil_nomask", "srmil", "SRMIL, reconstruction without masking", SRMIL_PAPER,
              SRMIL_CODE, hparams={"mask_ratio": 0.0, "rec_nodes": "all"}, graph=True,
              step_mib_per_100k=SRMIL_MEMORY),
    ModelInfo("srmil_raw", "srmil", "SRMIL on raw (unstandardised) features", SRMIL_PAPER,
              SRMIL_CODE, train={"standardize_features": False}, graph=True,
              step_mib_per_100k=SRMIL_MEMORY),
    ModelInfo("abmil", "abmil", "ABMIL (gated attention)",
              "Ilse, Tomczak, Welling. Attention-based deep multiple instance learning. "
              "ICML 2018", "github.com/AMLab-Amsterdam/AttentionDeepMIL",
              train={"optimizer": "adam", "lr": 2e-4}),
    ModelInfo("meanpool", "pooling", "Mean pooling",
              "Instance-level mean pooling, the floor of MIL benchmarks (e.g. Ilse et al. 2018)",
              "github.com/lingxitong/MIL_BASELINE@69bab20 (modules/MEAN_MIL)",
              hparams={"pool": "mean"}, train={"optimizer": "adam", "lr": 2e-4,
                                               "weight_decay": 1e-5, "scheduler": "none"},
              attention=False, step_mib_per_100k=(900.0, 0.2)),
    ModelInfo("maxpool", "pooling", "Max pooling",
              "Instance-level max pooling, the floor of MIL benchmarks (e.g. Ilse et al. 2018)",
              "github.com/lingxitong/MIL_BASELINE@69bab20 (modules/MAX_MIL)",
              hparams={"pool": "max"}, train={"optimizer": "adam", "lr": 2e-4,
                                              "weight_decay": 1e-5, "scheduler": "none"},
              step_mib_per_100k=(900.0, 0.2)),
    ModelInfo("clam_sb", "clam", "CLAM-SB",
              "Lu, Williamson, Chen, Chen, Barbieri, Mahmood. Data-efficient and weakly "
              "supervised computational pathology on whole-slide images. Nat Biomed Eng 2021",
              "github.com/mahmoodlab/CLAM@53e2409", train=CLAM_ADAM,
              step_mib_per_100k=(1800.0, 0.2)),
    ModelInfo("dsmil", "dsmil", "DSMIL",
              "Li, Li, Eliceiri. Dual-stream multiple instance learning network for whole slide "
              "image classification with self-supervised contrastive learning. CVPR 2021",
              "github.com/binli123/dsmil-wsi@80465ed",
              train={"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-3,
                     "betas": [0.5, 0.9], "scheduler": "cosine", "min_lr": 5e-6},
              step_mib_per_100k=(400.0, 0.2)),
    ModelInfo("transmil", "transmil", "TransMIL",
              "Shao, Bian, Chen, Wang, Zhang, Ji, Zhang. TransMIL: transformer based correlated "
              "multiple instance learning for whole slide image classification. NeurIPS 2021",
              "github.com/szc19990412/TransMIL@9d6aee5 (Nystrom attention: "
              "github.com/lucidrains/nystrom-attention@fbe9eba)",
              train={"optimizer": "lookahead_radam", "lr": 2e-4, "weight_decay": 1e-5,
                     "scheduler": "none"}, step_mib_per_100k=(10100.0, 0.3)),
    ModelInfo("patchgcn", "patchgcn", "Patch-GCN (classification)",
              "Chen, Lu, Lipkova, Wang, Williamson, Mahmood. Whole slide images are 2D point "
              "clouds: context-aware survival prediction using patch-based graph convolutional "
              "networks. MICCAI 2021", "github.com/mahmoodlab/Patch-GCN@823adda",
              train=CLAM_ADAM, graph=True, step_mib_per_100k=(4400.0, 0.2)),
    ModelInfo("dtfd", "dtfd", "DTFD-MIL",
              "Zhang, Meng, Bhalerao, Zheng, Qi, Yang, Zhang, Wang, Xia. DTFD-MIL: double-tier "
              "feature distillation multiple instance learning for histopathology whole slide "
              "image classification. CVPR 2022", "github.com/hrzhang1123/DTFD-MIL@10964f4",
              train={"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-4,
                     "scheduler": "step", "step_at": 0.5, "step_gamma": 0.2},
              step_mib_per_100k=(1000.0, 0.2)),
]}
MODEL_NAMES = tuple(MODELS)
# The model a variant belongs to.
FAMILY_MAIN = {"srmil": "srmil"}


def model_info(name: str) -> ModelInfo:
    """The catalogue entry of `name`; ValueError naming the known models otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return MODELS[name]


def inherited_settings(name: str, part: str, train_config: dict[str, Any]) -> dict[str, Any]:
    """Settings of `part` ("model" or "train") for model `name` from config.yaml's `train:`
    section: a variant inherits its family's (`train.srmil`), less the keys the variant fixes,
    then its own section (`train.srmil_norec`) applies on top."""
    info = model_info(name)
    own = ((train_config.get(name) or {}).get(part)) or {}
    if info.base == name:
        return dict(own)
    fixed = info.hparams if part == "model" else info.train
    parent = ((train_config.get(info.base) or {}).get(part)) or {}
    return {**{k: v for k, v in parent.items() if k not in fixed}, **own}
