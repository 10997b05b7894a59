"""scaleseg: semantic segmentation for any number of classes on one GPU.

The public Python API (docs/api.md); each name is imported on first use, so `import scaleseg` stays light:

    ESSHead                      the ESS embedding head, a drop-in for any segmentation model
    build_model, load            a whole model without the config system; a trained one from a checkpoint
    Segmentor                    what both return: model(images), .loss(outputs, labels), .predict(images)
    FeatureInfo                  the backbone contract (four maps at strides 4-32) for your own encoder
    predict_labels, EvalConfig   inference with sliding windows, scales and flips
    SegmentationMetrics          streaming O(C) metrics: mIoU, aAcc, mAcc, fwIoU, mDice, mFscore, ...
    knn_cross_entropy, full_cross_entropy, margin_regularizer     the ESS losses (ESS Eq. 5-7)
    nearest_classes, nearest_class                                bounded-memory nearest-class search
    fuse, pyramid_targets, done_by_coarser, relabel               Specialize and Fuse (S&F Eq. 2, sections 3.1-3.2)
    build_optimizer, set_poly_lr, OptimConfig                     SGD over named groups, the poly schedule
    to_tensor                    uint8 (H, W, 3) image -> ImageNet-normalised (3, H, W) tensor
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ESSHead": "scaleseg.api",
    "build_model": "scaleseg.api",
    "load": "scaleseg.api",
    "Segmentor": "scaleseg.models.segmentor",
    "FeatureInfo": "scaleseg.models.backbones.features",
    "predict_labels": "scaleseg.engine.inference",
    "EvalConfig": "scaleseg.config",
    "OptimConfig": "scaleseg.config",
    "SegmentationMetrics": "scaleseg.metrics",
    "knn_cross_entropy": "scaleseg.losses",
    "full_cross_entropy": "scaleseg.losses",
    "margin_regularizer": "scaleseg.losses",
    "nearest_classes": "scaleseg.search",
    "nearest_class": "scaleseg.search",
    "fuse": "scaleseg.models.heads.pyramid",
    "pyramid_targets": "scaleseg.losses.pyramid",
    "done_by_coarser": "scaleseg.losses.pyramid",
    "relabel": "scaleseg.losses.pyramid",
    "build_optimizer": "scaleseg.engine.optim",
    "set_poly_lr": "scaleseg.engine.optim",
    "to_tensor": "scaleseg.data.transforms",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scaleseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
