import math

import numpy as np
import pytest
import torch

from scaleseg.errors import DataError
from scaleseg.metrics import SegmentationMetrics


def brute_force(preds, targets, num_classes, ignore):
    """Per-class counts by explicit loops over pixels, then the documented formulas."""
    inter = np.zeros(num_classes)
    parea = np.zeros(num_classes)
    larea = np.zeros(num_classes)
    for pred, target in zip(preds, targets):
        for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
            if t == ignore:
                continue
            parea[p] += 1
            larea[t] += 1
            if p == t:
                inter[t] += 1
    ious, accs = [], []
    for c in range(num_classes):
        union = parea[c] + larea[c] - inter[c]
        ious.append(inter[c] / union if union > 0 else math.nan)
        accs.append(inter[c] / larea[c] if larea[c] > 0 else math.nan)
    present = [x for x in ious if not math.isnan(x)]
    labelled = [x for x in accs if not math.isnan(x)]
    total = larea.sum()
    fw = sum(larea[c] / total * (0 if math.isnan(ious[c]) else ious[c]) for c in range(num_classes))
    return {
        "mIoU": sum(present) / len(present),
        "mAcc": sum(labelled) / len(labelled),
        "aAcc": inter.sum() / total,
        "fwIoU": fw,
        "IoU": np.array(ious),
        "Acc": np.array(accs),
    }


@pytest.mark.parametrize("num_classes,ignore", [(7, 255), (40, 65535), (300, -1)])
def test_matches_brute_force_with_ignore_and_absent_classes(num_classes, ignore):
    rng = np.random.default_rng(num_classes)
    preds, targets = [], []
    metrics = SegmentationMetrics(num_classes, ignore_index=ignore)
    for _ in range(3):
        shape = (2, int(rng.integers(5, 20)), int(rng.integers(5, 20)))
        # only the first half of the classes ever appear in labels; predictions range wider,
        # so some classes are predicted but absent, some absent from both (NaN)
        target = rng.integers(0, max(2, num_classes // 2), size=shape)
        pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, max(2, 3 * num_classes // 4), size=shape))
        target[rng.random(shape) < 0.2] = ignore
        preds.append(pred)
        targets.append(target)
        metrics.update(torch.from_numpy(pred), torch.from_numpy(target))
    got = metrics.compute()
    want = brute_force(preds, targets, num_classes, ignore)
    for key in ("mIoU", "mAcc", "aAcc", "fwIoU"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    np.testing.assert_allclose(got["IoU"], want["IoU"], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got["Acc"], want["Acc"], rtol=1e-12, equal_nan=True)
    assert np.isnan(got["IoU"][-1])  # never labelled nor predicted


def test_hand_computed_case():
    # classes 0,1,2; class 2 absent everywhere -> NaN and excluded from the means
    target = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    m = SegmentationMetrics(3)
    m.update(pred, target)
    r = m.compute()
    # class 0: I=2, P=3 (positions (0,0),(1,0),(1,2)), L=3 -> IoU 2/4
    # class 1: I=3, P=4 (positions (0,1),(0,2),(0,3),(1,3)), L=4 -> IoU 3/5
    assert r["IoU"][0] == pytest.approx(0.5)
    assert r["IoU"][1] == pytest.approx(0.6)
    assert math.isnan(r["IoU"][2])
    assert r["mIoU"] == pytest.approx(0.55)
    assert r["aAcc"] == pytest.approx(5 / 7)
    assert r["mAcc"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert r["fwIoU"] == pytest.approx(3 / 7 * 0.5 + 4 / 7 * 0.6)


def test_memory_is_linear_in_classes():
    m = SegmentationMetrics(100_000, ignore_index=-1)
    m.update(torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long))
    assert m.counts().shape == (3, 100_000)
    assert m.compute()["mIoU"] == 1.0


def test_bad_labels_and_predictions_are_reported():
    m = SegmentationMetrics(5)
    with pytest.raises(DataError, match="label value 7"):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7))
    with pytest.raises(ValueError, match="predicted class 9"):
        m.update(torch.full((2, 2), 9), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError):
        m.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))


def test_empty_and_merge():
    m = SegmentationMetrics(3)
    assert math.isnan(m.compute()["mIoU"])
    a, b = SegmentationMetrics(3), SegmentationMetrics(3)
    t1, t2 = torch.tensor([0, 1, 2]), torch.tensor([2, 2, 1])
    a.update(t1, t1)
    b.update(t2, torch.tensor([2, 1, 1]))
    both = SegmentationMetrics(3)
    both.update(torch.cat([t1, t2]), torch.cat([t1, torch.tensor([2, 1, 1])]))
    a.merge_(b.counts())
    assert torch.equal(a.counts(), both.counts())


def test_dice_precision_recall_fscore_follow_mmsegmentation_from_a_confusion_matrix():
    """Per class from a full confusion matrix (rows: label, columns: prediction), as mmsegmentation's
    IoUMetric defines them: Dice 2I/(P+L), precision I/P, recall I/L, F1 = 2PR/(P+R), NaN where undefined
    and means over the defined classes. Class 3 is labelled but never predicted, class 4 predicted but
    never labelled, class 5 absent from both."""
    rng = np.random.default_rng(3)
    C, ignore = 6, 255
    target = rng.choice([0, 1, 2, 3, ignore], size=(3, 17, 19), p=[0.3, 0.3, 0.2, 0.1, 0.1])
    pred = rng.choice([0, 1, 2, 4], size=target.shape)
    metrics = SegmentationMetrics(C, ignore)
    metrics.update(torch.as_tensor(pred), torch.as_tensor(target))
    got = metrics.compute()

    keep = target != ignore
    confusion = np.zeros((C, C))
    np.add.at(confusion, (target[keep], pred[keep]), 1)
    inter, label, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    nan = float("nan")
    dice = [2 * inter[c] / (label[c] + predicted[c]) if label[c] + predicted[c] else nan for c in range(C)]
    precision = [inter[c] / predicted[c] if predicted[c] else nan for c in range(C)]
    recall = [inter[c] / label[c] if label[c] else nan for c in range(C)]
    fscore = [2 * p * r / (p + r) if not (math.isnan(p) or math.isnan(r)) and p + r else
              (0.0 if not (math.isnan(p) or math.isnan(r)) else nan) for p, r in zip(precision, recall)]
    for name, want in (("Dice", dice), ("Precision", precision), ("Recall", recall), ("Fscore", fscore)):
        np.testing.assert_allclose(got[name], np.array(want), rtol=1e-12, equal_nan=True, err_msg=name)
        mean = np.nanmean(np.array(want))
        assert got["m" + name] == pytest.approx(mean, rel=1e-12), name
    assert math.isnan(got["Precision"][3]) and got["Dice"][3] == 0.0 and math.isnan(got["Fscore"][3])
    assert math.isnan(got["Recall"][4]) and math.isnan(got["Dice"][5])
    np.testing.assert_array_equal(got["Recall"], got["Acc"])
