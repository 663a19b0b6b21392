"""precision=auto|32|bf16: the modes of each loop, the fp32 recheck of bf16's close calls, determinism within a
precision, and a bf16-searched UAP judged in fp32 (pipeline/precision.py)."""
import argparse

import pytest
import torch
from conftest import FAST, cells, make_cfg
from hydra.utils import instantiate

from pipeline import precision
from pipeline.attack import random_control
from pipeline.attack.build import make_uap
from pipeline.bench.precision import LOOP_NAMES, precision_table
from pipeline.classifier import train_or_load
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.eval.metrics import fooling_rate, wilson
from pipeline.eval.predictions import predict
from pipeline.identity import classifier_key, job_hash
from pipeline.precision import FP32, Mode


def test_the_precision_key_is_checked_before_any_work():
    for bad, key in (("precision=16", "precision"), ("precision_recheck=1.5", "precision_recheck"),
                     ("+trainer.precision=bf16-mixed", "trainer.precision")):
        with pytest.raises(ConfigError, match=key):
            validate(make_cfg([bad]))
    validate(make_cfg(["precision=32"]))  # the command line gives an integer: accepted as "32"


def test_auto_leaves_fp32_only_for_a_mode_clearly_faster():
    cl, bf, bfcl = Mode(False, True), Mode(True, False), Mode(True, True)
    assert precision.fastest({FP32: 1.0, cl: 0.95, bf: 0.97, bfcl: 0.93}) == FP32  # within the margin: noise
    assert precision.fastest({FP32: 1.0, cl: 0.8, bf: 0.6, bfcl: 0.4}) == bfcl
    assert precision.fastest({FP32: 1.0, cl: 0.7, bf: 1.2, bfcl: 1.1}) == cl  # bf16 slower: not taken
    assert str(bfcl) == "bf16+cl" and bfcl.lightning == "bf16-mixed" and FP32.lightning == "32-true"


def test_auto_is_fp32_without_bf16_units_and_the_fixed_precisions_need_no_measurement(monkeypatch, tmp_path):
    def no_net():
        raise AssertionError("measured")
    monkeypatch.setattr(precision, "bf16_units", lambda device: False)
    assert precision.choose("auto", "x", no_net, "attack", 8, 32, "cpu", tmp_path / "p.json") == FP32
    assert precision.choose("32", "x", no_net, "attack", 8, 32, "cpu", None) == FP32
    assert precision.choose("bf16", "x", no_net, "attack", 8, 32, "cpu", None) == Mode(True, True)


def test_auto_measures_once_and_keeps_its_choice(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "bf16_units", lambda device: True)
    monkeypatch.setattr(precision, "_MEMO", {})
    calls = []

    def fake_measure(net, loop, batch, size, device, modes=precision.MODES):
        calls.append(loop)
        return {FP32: 1.0, Mode(False, True): 0.9, Mode(True, False): 0.8, Mode(True, True): 0.5}
    monkeypatch.setattr(precision, "measure", fake_measure)
    table = tmp_path / "precision.json"
    first = precision.choose("auto", "resnet18", lambda: None, "eval", 32, 128, "cpu", table)
    monkeypatch.setattr(precision, "_MEMO", {})  # a new process: the table on disk answers
    again = precision.choose("auto", "resnet18", lambda: None, "eval", 32, 128, "cpu", table)
    assert first == again == Mode(True, True) and calls == ["eval"]


class Fixed(torch.nn.Module):
    """Logits = 1000 x each channel's mean, through a linear layer (which autocast runs in bf16)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(3) * 1000)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_bf16_close_calls_are_predicted_again_in_fp32():
    x = torch.zeros(4, 3, 8, 8)
    x[:, 0], x[:, 1], x[:, 2] = 0.5, 0.5 + 1e-4, 0.1  # class 1 wins by 0.1 logit on 500: bf16 cannot tell
    x[2:, 0] = 0.9  # images 2, 3: class 0 by far
    net = Fixed()
    fp32 = precision.predicted(net, x, FP32, 0.0)
    assert fp32.tolist() == [1, 1, 0, 0]
    raw = precision.logits(net, x, Mode(True, False))
    assert torch.equal(raw[:2, 0], raw[:2, 1])  # bf16 alone rounds the two logits together: a tie
    assert precision.predicted(net, x, Mode(True, False), 0.05).tolist() == fp32.tolist()


def test_the_classifier_cache_key_and_job_identity_include_the_precision():
    a, b = make_cfg(["precision=32"]), make_cfg(["precision=bf16"])
    assert classifier_key(a) != classifier_key(b) and job_hash(a) != job_hash(b)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    """The tiny classifier trained once in fp32 on the fast phantom recipe."""
    root = tmp_path_factory.mktemp("precision")
    cfg = make_cfg([*FAST, "precision=32", "attack=sgd_uap", "attack.max_iter=2"], root)
    dm = instantiate(cfg.data)
    dm.setup()
    model, _ = train_or_load(cfg, dm)
    return cfg, dm, model.net


@pytest.mark.parametrize("mode", [FP32, Mode(True, True)], ids=str)
def test_a_search_is_deterministic_within_its_precision(tiny_trained, mode):
    cfg, dm, net = tiny_trained
    precision.attach(net, {"train": FP32, "attack": mode, "eval": mode}, 0.05)
    uaps = [make_uap(cfg, dm, net, "cpu")[1] for _ in range(2)]
    assert torch.equal(uaps[0], uaps[1])


def test_a_uap_searched_in_bf16_fools_as_the_fp32_one_does_when_judged_in_fp32(tiny_trained):
    """bf16 (the search's precision) and fp32 UAPs against the same fp32 classifier, both evaluated in fp32:
    within each other's 95 % interval on the 300 test images, and both far above the random control."""
    cfg, dm, net = tiny_trained
    test, frs = dm.dataset("test"), {}
    for mode in (FP32, Mode(True, True)):
        precision.attach(net, {"train": FP32, "attack": mode, "eval": mode}, 0.05)
        atk, uap, _ = make_uap(cfg, dm, net, "cpu")
        precision.attach(net, {"eval": FP32}, 0.0)
        p = predict(net, test, {"clean": None, "uap": uap, "random": random_control(uap, atk.eps, atk.norm, 0)})
        frs[str(mode)] = fooling_rate(p["clean"], p["uap"]), fooling_rate(p["clean"], p["random"])
    (fr32, rnd32), (fr16, rnd16) = frs["fp32"], frs["bf16+cl"]
    lo, hi = wilson(fr32, len(test))
    assert lo <= fr16 <= hi, frs
    assert min(fr32, fr16) >= 2 * max(rnd32, rnd16) + 0.1, frs


def test_the_bench_precision_table_has_each_loop_and_the_mode_auto_picks():
    """`make bench`'s precision table (its --quick form: the tiny model at 64 px): a row per loop, fp32's images/s,
    each other mode's ratio to it, and auto's choice, one of the four modes."""
    rows = [cells(line) for line in precision_table(argparse.Namespace(quick=True), "cpu").splitlines()[2:]]
    assert [r[3] for r in rows] == [LOOP_NAMES[loop] for loop in precision.LOOPS]
    for r in rows:
        assert r[0] == "tiny" and float(r[4]) > 0 and all(float(c) > 0 for c in r[5:8])
        assert r[8] in {str(m) for m in precision.MODES} and float(r[9]) > 0
