import math

import pytest
import torch
import torch.nn as nn

from pipeline.data import GrayDataset
from pipeline.eval.metrics import (
    accuracy,
    attack_metrics,
    confusion,
    fooling_rate,
    fooling_rate_label,
    sensitivity_ppv,
    success_rate,
    wilson,
)
from pipeline.eval.predictions import predict

T = torch.tensor


def test_confusion_rows_are_true_columns_predicted():
    conf = confusion(T([0, 0, 1, 2, 2, 2]), T([0, 1, 1, 2, 0, 2]), 3)
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_sensitivity_and_ppv_by_hand():
    sens, ppv = sensitivity_ppv(T([0, 0, 1, 2, 2, 2]), T([0, 1, 1, 2, 0, 2]), 3)  # the confusion matrix above
    assert sens == pytest.approx([1 / 2, 1 / 1, 2 / 3])
    assert ppv == pytest.approx([1 / 2, 1 / 2, 2 / 2])


def test_undefined_ppv_is_zero():
    sens, ppv = sensitivity_ppv(T([0, 1]), T([0, 0]), 3)
    assert ppv == [0.5, 0.0, 0.0] and sens == [1.0, 0.0, 0.0]


def test_fooling_rates_and_success_rate():
    labels = T([0, 0, 1, 1, 2])
    clean = T([0, 1, 1, 1, 2])   # one clean error
    adv = T([2, 1, 2, 1, 2])     # changed: idx 0, 2
    assert fooling_rate(clean, adv) == pytest.approx(2 / 5)
    assert fooling_rate_label(labels, adv) == pytest.approx(3 / 5)  # idx 0, 1, 2 differ from the label
    assert success_rate(adv, 2) == pytest.approx(3 / 5)
    assert accuracy(labels, clean) == pytest.approx(4 / 5)


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100: centre 0.5, half-width 1.96 * sqrt(0.0025 + 1.96**2 / 40000) / (1 + 1.96**2 / 100) = 0.09617
    assert wilson(0.5, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    # p = 0, n = 10: [0, 2 * (1.96**2 / 20) / (1 + 1.96**2 / 10)] = [0, 0.27753], never below 0 (nor above 1)
    assert wilson(0.0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson(1.0, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    lo, hi = wilson(0.5, 303)
    assert 0.054 < (hi - lo) / 2 < 0.058  # the "about +-0.05 at 0.5 on 303 images"
    assert all(math.isnan(x) for x in wilson(0.5, float("nan")))  # a run without its image count


def test_attack_metric_names():
    labels = T([0, 1, 2, 2])
    preds = {"clean": T([0, 1, 2, 2]), "uap": T([2, 2, 2, 2]), "random": T([0, 1, 2, 1])}
    m = attack_metrics("test", labels, preds, ["normal", "pneumonia", "COVID-19"], target=2)
    assert m["test_n"] == 4  # the images the rates are over (their intervals)
    assert m["test_acc_clean"] == 1.0 and m["test_acc_uap"] == 0.5 and m["test_acc_random"] == 0.75
    assert m["test_fr"] == 0.5 and m["test_fr_random"] == 0.25
    assert m["test_tsr"] == 1.0 and m["test_tsr_random"] == 0.25
    assert m["test_uap_share_COVID-19"] == 1.0
    assert m["test_uap_sens_normal"] == 0.0 and m["test_uap_ppv_COVID-19"] == 0.5
    assert "test_tsr" not in attack_metrics("test", labels, preds, ["a", "b", "c"], target=None)


def test_clean_predictions_are_made_once_per_classifier_and_images():
    """A sweep's jobs share a classifier: its clean predictions on a split are computed once, and again only
    when the weights or the images change."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    ds = GrayDataset(torch.randint(0, 256, (10, 1, 16, 16), dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    v = torch.full((1, 16, 16), 0.05)
    first = predict(net, ds, {"clean": None, "uap": v})
    n_first = sum(seen)
    assert n_first == 20  # clean and UAP inputs, stacked
    again = predict(net, ds, {"clean": None, "uap": v})
    assert sum(seen) - n_first == 10  # only the UAP inputs
    assert torch.equal(first["clean"], again["clean"]) and torch.equal(first["uap"], again["uap"])
    seen.clear()
    assert torch.equal(predict(net, ds, {"c": None})["c"], first["clean"]) and not seen  # nothing to forward
    with torch.no_grad():
        net[3].bias.add_(1.0)  # other weights: predicted again
    predict(net, ds, {"clean": None})
    assert sum(seen) == 10
    other = GrayDataset(ds.images.flip(-1), ds.labels)
    seen.clear()
    predict(net, other, {"clean": None})
    assert sum(seen) == 10
