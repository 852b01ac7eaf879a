"""Metrics and the decision rule, checked against values computed by hand."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from cxrtool.errors import DataError, UsageError
from cxrtool.io import to_json
from cxrtool.metrics import abnormal_score, choose_threshold, classification_metrics, decide

NAMES = ["NORMAL", "PNEUMONIA"]
# 8 images: 4 normal then 4 pneumonia; P(PNEUMONIA) per image
Y8 = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P1 = np.array([0.10, 0.40, 0.55, 0.80, 0.90, 0.65, 0.30, 0.70])
PROBS8 = np.stack([1 - P1, P1], axis=1)
# argmax predictions: [0, 0, 1, 1, 1, 1, 0, 1] -> TN=2, FP=2, FN=1, TP=3


def _rank_auroc(is_pos, score) -> float:
    """Mann-Whitney: share of (positive, negative) pairs ranked correctly, ties count one half."""
    pos = [s for s, p in zip(score, is_pos) if p]
    neg = [s for s, p in zip(score, is_pos) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


@pytest.fixture(autouse=True)
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_binary_hand_computed():
    m = classification_metrics(Y8, PROBS8, NAMES)
    assert m["n"] == 8
    assert m["confusion_matrix"] == [[2, 2], [1, 3]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    pn = m["per_class"]["PNEUMONIA"]
    assert pn["precision"] == pytest.approx(3 / 5)
    assert pn["recall"] == pytest.approx(3 / 4)
    assert pn["specificity"] == pytest.approx(2 / 4)
    assert pn["f1"] == pytest.approx(2 / 3)
    assert pn["support"] == 4
    no = m["per_class"]["NORMAL"]
    assert no["precision"] == pytest.approx(2 / 3)
    assert no["recall"] == pytest.approx(2 / 4)
    assert no["specificity"] == pytest.approx(3 / 4)
    assert no["f1"] == pytest.approx(4 / 7)
    assert m["balanced_accuracy"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert m["macro"]["f1"] == pytest.approx((2 / 3 + 4 / 7) / 2)
    # positive pairs ranked correctly: 0.9 beats 4, 0.65 beats 3, 0.3 beats 1, 0.7 beats 3 -> 11/16
    assert m["auroc"] == pytest.approx(11 / 16)
    assert m["auroc"] == pytest.approx(_rank_auroc(Y8 == 1, P1))
    assert pn["auroc"] == pytest.approx(11 / 16)
    assert no["auroc"] == pytest.approx(11 / 16)
    expected_ll = -np.mean(np.log(np.where(Y8 == 1, P1, 1 - P1)))
    assert m["log_loss"] == pytest.approx(expected_ll)
    assert "abnormal_vs_normal" not in m
    json.loads(to_json(m))  # JSON-ready, no NaN


def test_binary_threshold_and_abnormal_block():
    # threshold 0.6 on P(PNEUMONIA): predictions [0, 0, 0, 1, 1, 1, 0, 1]
    m = classification_metrics(Y8, PROBS8, NAMES, negative_index=0, threshold=0.6)
    assert m["confusion_matrix"] == [[3, 1], [1, 3]]
    avn = m["abnormal_vs_normal"]
    assert avn["threshold"] == 0.6
    assert avn["sensitivity"] == pytest.approx(0.75)
    assert avn["specificity"] == pytest.approx(0.75)
    assert avn["ppv"] == pytest.approx(0.75)
    assert avn["npv"] == pytest.approx(0.75)
    assert avn["auroc"] == pytest.approx(11 / 16)
    assert (avn["n_abnormal"], avn["n_normal"]) == (4, 4)
    assert m["decision"] == {"rule": "threshold", "threshold": 0.6, "negative_class": "NORMAL"}


def test_decide_binary():
    assert decide(PROBS8, None, None).tolist() == [0, 0, 1, 1, 1, 1, 0, 1]
    assert decide(PROBS8, 0, 0.6).tolist() == [0, 0, 0, 1, 1, 1, 0, 1]
    # score >= threshold is abnormal (0.65 exactly)
    assert decide(PROBS8, 0, 0.65).tolist() == [0, 0, 0, 1, 1, 1, 0, 1]
    assert decide(PROBS8, 0, 0.66).tolist() == [0, 0, 0, 1, 1, 0, 0, 1]
    # binary without negative index: class 0 is the negative one
    assert decide(PROBS8, None, 0.6).tolist() == [0, 0, 0, 1, 1, 1, 0, 1]
    # negative class 1: the score is P(class 0)
    assert decide(PROBS8, 1, 0.5).tolist() == [0, 0, 1, 1, 1, 1, 0, 1]
    assert abnormal_score(PROBS8, 0) == pytest.approx(P1)


def test_decide_three_classes():
    probs = np.array([
        [0.50, 0.30, 0.20],   # argmax NORMAL, abnormal score 0.50
        [0.70, 0.10, 0.20],   # score 0.30
        [0.30, 0.30, 0.40],   # score 0.70
        [0.45, 0.25, 0.30],   # argmax NORMAL, score 0.55, best disease class 2
    ])
    assert decide(probs).tolist() == [0, 0, 2, 0]
    assert decide(probs, 0, 0.4).tolist() == [1, 0, 2, 2]
    assert decide(probs, 0, 0.6).tolist() == [0, 0, 2, 0]
    assert decide(probs, 0, 0.0).tolist() == [1, 2, 2, 2]  # everything abnormal
    with pytest.raises(UsageError):
        decide(probs, None, 0.5)  # multi-class threshold needs the negative class
    with pytest.raises(UsageError):
        decide(probs, 3, 0.5)


def test_multiclass_matches_sklearn_and_operating_point():
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3))
    logits[np.arange(60), y] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = ["NORMAL", "BACTERIA", "VIRUS"]
    m = classification_metrics(y, probs, names, negative_index=0, threshold=0.5)
    pred = decide(probs, 0, 0.5)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=[0, 1, 2], zero_division=0)
    for i, name in enumerate(names):
        assert m["per_class"][name]["precision"] == pytest.approx(p[i])
        assert m["per_class"][name]["recall"] == pytest.approx(r[i])
        assert m["per_class"][name]["f1"] == pytest.approx(f[i])
        assert m["per_class"][name]["support"] == s[i]
        assert m["per_class"][name]["auroc"] == pytest.approx(_rank_auroc(y == i, probs[:, i]))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    avn = m["abnormal_vs_normal"]
    assert avn["auroc"] == pytest.approx(_rank_auroc(y != 0, 1 - probs[:, 0]))
    abn, pabn = y != 0, pred != 0
    assert avn["sensitivity"] == pytest.approx(np.sum(abn & pabn) / np.sum(abn))
    assert avn["specificity"] == pytest.approx(np.sum(~abn & ~pabn) / np.sum(~abn))


def test_absent_class_and_single_class():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    y = np.array([0, 1, 1, 0])  # class 2 never occurs but is predicted once
    m = classification_metrics(y, probs, ["A", "B", "C"], negative_index=0)
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 0, 0]]
    c = m["per_class"]["C"]
    assert c["support"] == 0 and c["recall"] is None and c["auroc"] is None
    assert c["precision"] == 0.0 and c["f1"] == 0.0
    assert m["auroc"] is None  # macro OvR undefined with an absent class
    assert m["macro"]["classes"] == ["A", "B"]
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    json.loads(to_json(m))

    one = classification_metrics([0, 0, 0], [[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]], NAMES, negative_index=0)
    assert one["auroc"] is None
    assert one["per_class"]["PNEUMONIA"]["precision"] == 0.0
    assert one["per_class"]["PNEUMONIA"]["recall"] is None
    assert one["abnormal_vs_normal"]["sensitivity"] is None
    assert one["abnormal_vs_normal"]["specificity"] == pytest.approx(2 / 3)
    assert one["abnormal_vs_normal"]["auroc"] is None
    assert one["confusion_matrix"] == [[2, 1], [0, 0]]
    json.loads(to_json(one))


def test_metrics_input_errors():
    with pytest.raises(DataError):
        classification_metrics([0, 1], PROBS8, NAMES)  # length mismatch
    with pytest.raises(DataError):
        classification_metrics(Y8, PROBS8, ["A", "B", "C"])
    with pytest.raises(DataError):
        classification_metrics(Y8 + 1, PROBS8, NAMES)  # label 2 out of range
    with pytest.raises(DataError):
        classification_metrics(Y8, np.full((8, 2), np.nan), NAMES)


# abnormal scores: normal ones 0.1..0.6, abnormal ones 0.5..0.95
IS_ABN = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], dtype=bool)
SCORE = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.5, 0.7, 0.8, 0.9, 0.95])


@pytest.mark.parametrize(
    ("kind", "target", "thr", "sens", "spec"),
    [
        ("sensitivity", 0.8, 0.7, 0.8, 1.0),   # 4/5 abnormal at >= 0.7; at 0.8 only 3/5
        ("sensitivity", 0.7, 0.7, 0.8, 1.0),
        ("sensitivity", 1.0, 0.5, 1.0, 0.8),   # the 0.5 case is needed; normal 0.6 is then flagged
        ("specificity", 0.8, 0.5, 1.0, 0.8),   # 4/5 normal below 0.5; below 0.4 only 3/5
        ("specificity", 1.0, 0.7, 0.8, 1.0),   # all normals below 0.7 (largest normal 0.6)
        ("specificity", 0.5, 0.4, 1.0, 0.6),
    ],
)
def test_choose_threshold(kind, target, thr, sens, spec):
    out = choose_threshold(IS_ABN, SCORE, **{f"target_{kind}": target})
    assert out["threshold"] == pytest.approx(thr)
    assert out["target"] == {kind: target}
    assert out["sensitivity"] == pytest.approx(sens)
    assert out["specificity"] == pytest.approx(spec)
    assert (out["n_abnormal"], out["n_normal"]) == (5, 5)
    # the chosen threshold, applied with decide(), gives the reported sensitivity
    probs = np.stack([1 - SCORE, SCORE], axis=1)
    pred = decide(probs, 0, out["threshold"])
    assert np.mean(pred[IS_ABN] == 1) == pytest.approx(sens)


def test_choose_threshold_nothing_abnormal_allowed():
    # the highest score is normal: specificity 1 means flagging nothing, threshold just above it
    out = choose_threshold([True, False], [0.2, 0.9], target_specificity=1.0)
    assert out["threshold"] > 0.9 and out["threshold"] == pytest.approx(0.9)
    assert out["sensitivity"] == 0.0 and out["specificity"] == 1.0
    json.loads(to_json(out))


def test_choose_threshold_errors():
    with pytest.raises(DataError, match="abnormal"):
        choose_threshold([True, True], [0.2, 0.9], target_sensitivity=0.9)
    with pytest.raises(DataError, match="normal"):
        choose_threshold([False, False], [0.2, 0.9], target_specificity=0.9)
    with pytest.raises(UsageError):
        choose_threshold(IS_ABN, SCORE)
    with pytest.raises(UsageError):
        choose_threshold(IS_ABN, SCORE, target_sensitivity=0.9, target_specificity=0.9)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UsageError):
            choose_threshold(IS_ABN, SCORE, target_sensitivity=bad)
    with pytest.raises(DataError):
        choose_threshold(IS_ABN[:3], SCORE, target_sensitivity=0.9)
