"""docs/api.md: every Python block runs. The plain blocks run here, in order, in one namespace (as a reader
would paste them); the mmsegmentation block runs against a stand-in of mmsegmentation 1.x's interfaces
(mmcv does not install on our machines), and its classes are then exercised; the blocks marked
`interop` run in the interop stage (interop/test_interop.py), where segmentation-models-pytorch installs."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import scaleseg

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
MARKERS = ("interop", "mmseg")


def doc_blocks(path: Path = DOC) -> list[tuple[str | None, str]]:
    """[(marker or None, code)] of the ```python blocks, the marker from an HTML comment right before one."""
    text = path.read_text()
    blocks = []
    for match in re.finditer(r"(?:<!--\s*(\w+):?[^>]*-->\s*\n)?```python\n(.*?)```", text, re.S):
        blocks.append((match.group(1), match.group(2)))
    return blocks


def test_every_block_is_run_somewhere():
    blocks = doc_blocks()
    assert len(blocks) >= 6
    assert {marker for marker, _ in blocks} <= {None, *MARKERS}, "a block with an unknown marker runs nowhere"
    assert [m for m, _ in blocks].count("interop") == 1 and [m for m, _ in blocks].count("mmseg") == 1


@pytest.fixture(scope="module")
def namespace():
    """The plain blocks, run in order in one namespace."""
    ns: dict = {"__name__": "api_doc"}
    torch.manual_seed(0)
    for index, (marker, code) in enumerate(doc_blocks()):
        if marker is None:
            exec(compile(code, str(DOC), "exec"), ns)
        if index == 0:
            ns["loop_optimizer"] = ns["optimizer"]  # a later block names its own optimizer the same
    return ns


def test_the_plain_blocks_train_evaluate_and_build(namespace):
    ns = namespace
    head = ns["head"]
    assert isinstance(head, scaleseg.ESSHead) and head.class_embeddings.shape == (5000, 12)
    # the loop stepped: the poly schedule ran to its end and every group got its initial LR
    lrs = {g.get("name", "features"): (g["initial_lr"], g["lr"]) for g in ns["loop_optimizer"].param_groups}
    assert set(lrs) == {"features", "head", "class_embeddings"} and all(lr < first for first, lr in lrs.values())
    assert ns["loop_optimizer"].param_groups[2]["momentum"] == 0.95  # the table's own momentum reached SGD
    results = ns["results"]
    assert set(results) >= {"mIoU", "aAcc", "mAcc", "fwIoU", "mDice", "mFscore", "mPrecision", "mRecall"}
    assert ns["labels_predicted"].shape == (2, 64, 64) and ns["windows"].shape == (2, 64, 64)
    assert isinstance(ns["model"], scaleseg.Segmentor)


def test_ess_head_loss_and_prediction_equal_the_functions_they_wrap():
    """The head's loss is knn_cross_entropy + margin_regularizer on the upsampled, normalised embeddings, and
    its prediction the nearest normalised class embedding (brute force)."""
    torch.manual_seed(1)
    head = scaleseg.ESSHead(16, 50, 6, num_neighbours=4)
    emb = head(torch.randn(2, 16, 5, 7))
    labels = torch.randint(0, 50, (2, 20, 28))
    labels[0, :3] = -100
    terms = head.loss(emb, labels)
    x = F.normalize(F.interpolate(emb, size=(20, 28), mode="bilinear", align_corners=False), dim=1)
    x = x.permute(0, 2, 3, 1).reshape(-1, 6)
    E = F.normalize(head.class_embeddings, dim=1)
    want = scaleseg.knn_cross_entropy(x, E, labels.reshape(-1), 4, 0.05, -100)
    assert terms["ce"].item() == pytest.approx(want.item(), rel=1e-5)
    assert terms["margin"].item() == pytest.approx(scaleseg.margin_regularizer(E, 0.2).item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(terms["ce"].item() + terms["margin"].item(), rel=1e-6)
    predicted = head.predict(emb, (20, 28))
    brute = torch.cdist(x.double(), E.double()).argmin(dim=1).view(2, 20, 28)
    assert torch.equal(predicted, brute)
    with pytest.raises(ValueError, match="ignore_index = 3 is a class id"):
        scaleseg.ESSHead(16, 50, ignore_index=3)


def test_public_names_import_from_scaleseg():
    for name in scaleseg.__all__:
        assert getattr(scaleseg, name) is not None, name
    with pytest.raises(AttributeError):
        scaleseg.not_a_name  # noqa: B018


def test_load_gives_a_model_with_its_classes(tmp_path):
    from scaleseg.cli import main
    from tests.conftest import TINY

    base = [o for o in TINY if not o.startswith(("train.iters", "train.checkpoint"))]
    assert main(["train", *base, "train.iters=2", "train.checkpoint_interval=2", "--work-dir", str(tmp_path)]) == 0
    model = scaleseg.load(tmp_path / "iter_000002.pth")
    assert len(model.class_names) == 40 and model.palette.shape == (40, 3) and not model.training
    image = torch.randint(0, 256, (37, 45, 3), dtype=torch.uint8).numpy()
    labels = model.predict(scaleseg.to_tensor(image)[None])
    assert labels.shape == (1, 37, 45) and int(labels.max()) < 40


# ---- mmsegmentation 1.x, as a stand-in of the interfaces the doc block uses --------------------------


class _PixelData:
    def __init__(self, data):
        self.data = data


class _SegDataSample:
    def __init__(self, metainfo, gt=None):
        self.metainfo = metainfo
        if gt is not None:
            self.gt_sem_seg = _PixelData(gt)


class _BaseDecodeHead(nn.Module):
    """What mmsegmentation 1.x's BaseDecodeHead gives a subclass: channels, num_classes, ignore_index (255),
    align_corners, conv_seg (1x1 conv to num_classes) and cls_seg; forward is the subclass's."""

    def __init__(self, in_channels, channels, *, num_classes, ignore_index=255, align_corners=False, **_):
        super().__init__()
        self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
        self.ignore_index, self.align_corners = ignore_index, align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.trunk = nn.Conv2d(in_channels, channels, 3, padding=1)

    def cls_seg(self, feat):
        return self.conv_seg(feat)

    def forward(self, inputs):
        return self.cls_seg(self.trunk(inputs[-1]))


class _EncoderDecoder(nn.Module):
    """EncoderDecoder.postprocess_result: per sample, resize the logits to ori_shape, keep them as seg_logits
    and take the argmax over the channels as pred_sem_seg."""

    def __init__(self, decode_head):
        super().__init__()
        self.decode_head = decode_head

    def postprocess_result(self, seg_logits, data_samples=None):
        for i, sample in enumerate(data_samples):
            logits = F.interpolate(seg_logits[i : i + 1], size=sample.metainfo["ori_shape"], mode="bilinear",
                                   align_corners=self.decode_head.align_corners)[0]
            sample.seg_logits = _PixelData(logits)
            sample.pred_sem_seg = _PixelData(logits.argmax(dim=0, keepdim=True))
        return data_samples


class _Registry:
    def register_module(self):
        return lambda cls: cls


@pytest.fixture
def mmseg_stand_in(monkeypatch):
    modules = {
        "mmseg": types.ModuleType("mmseg"),
        "mmseg.models": types.ModuleType("mmseg.models"),
        "mmseg.models.decode_heads": types.ModuleType("mmseg.models.decode_heads"),
        "mmseg.models.segmentors": types.ModuleType("mmseg.models.segmentors"),
        "mmseg.registry": types.ModuleType("mmseg.registry"),
    }
    modules["mmseg.models.decode_heads"].DepthwiseSeparableASPPHead = _BaseDecodeHead
    modules["mmseg.models.segmentors"].EncoderDecoder = _EncoderDecoder
    modules["mmseg.registry"].MODELS = _Registry()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_the_mmsegmentation_block_trains_and_decides_by_nearest_class(mmseg_stand_in):
    (code,) = [code for marker, code in doc_blocks() if marker == "mmseg"]
    ns: dict = {"__name__": "mmseg_doc"}
    exec(compile(code, str(DOC), "exec"), ns)
    torch.manual_seed(0)
    head = ns["ESSASPPHead"](embed_dim=8, in_channels=16, channels=32, num_classes=300, ignore_index=65535)
    embeddings = head([torch.randn(2, 16, 6, 8)])
    assert embeddings.shape == (2, 8, 6, 8)  # d channels, not 300
    gts = torch.randint(0, 300, (2, 1, 24, 32))
    samples = [_SegDataSample({"img_shape": (24, 32), "ori_shape": (30, 40)}, gt) for gt in gts]
    losses = head.loss_by_feat(embeddings, samples)
    assert set(losses) == {"loss_ess_ce", "loss_ess_margin"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert head.conv_seg.class_embeddings.grad is not None
    resized = head.predict_by_feat(embeddings.detach(), [s.metainfo for s in samples])
    assert resized.shape == (2, 8, 24, 32)
    segmentor = ns["ESSEncoderDecoder"](head)
    results = segmentor.postprocess_result(resized, samples)
    for sample in results:
        want = head.conv_seg.predict(sample.seg_logits.data[None])  # nearest class of the resized embeddings
        assert sample.pred_sem_seg.data.shape == (1, 30, 40) and torch.equal(sample.pred_sem_seg.data, want)
        assert int(sample.pred_sem_seg.data.max()) >= 8  # class ids, not an argmax over the 8 channels


def test_the_readme_python_blocks_run(tmp_path, monkeypatch):
    """Each ```python block of the README, in a folder holding the files it names: a trained run's best.pth
    exported as work_dirs/default/best.onnx (+ best.json) and served/model.safetensors, and a photo.jpg."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("safetensors")
    import numpy as np
    from PIL import Image

    from scaleseg.cli import main
    from tests.conftest import TINY

    readme = DOC.parents[1] / "README.md"  # DOC is <repo>/docs/api.md
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    base = [o for o in TINY if not o.startswith(("train.iters", "train.checkpoint"))]
    run = tmp_path / "work_dirs" / "default"
    assert main(["train", *base, "train.iters=2", "train.checkpoint_interval=2", "--work-dir", str(run)]) == 0
    assert main(["export", str(run / "best.pth"), "--format", "onnx", "--no-verify"]) == 0
    assert main(["export", str(run / "best.pth"), "--format", "safetensors", "--out", "served/model.safetensors"]) == 0
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save("photo.jpg")
    for code in blocks:
        ns: dict = {"__name__": "readme", "images": torch.randn(1, 3, 40, 56)}
        exec(compile(code, str(readme), "exec"), ns)
        if "predicted" in ns:  # the Python API block
            assert ns["predicted"].shape == (2, 128, 128) and set(ns["terms"]) == {"ce", "margin", "loss"}
        if "session" in ns:  # onnxruntime without PyTorch
            assert ns["labels"].shape == (40, 56)
        if "load_safetensors_model" in ns:
            assert ns["labels"].shape == (1, 40, 56)
