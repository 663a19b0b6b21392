"""The UAP attacks: projection, zeta -> eps, the random control, and UAPs that beat it on phantom data."""
import math

import pytest
import torch

from pipeline.attack import FGSMUAP, SGDUAP, lp_norms, project, random_uap, zeta_to_eps
from pipeline.errors import ConfigError
from pipeline.evaluate import predict
from pipeline.metrics import fooling_rate, success_rate

CLASSES = ["normal", "pneumonia", "COVID-19"]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_never_exceeds_eps_and_keeps_points_inside(norm):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 1, 8, 8, generator=g) * torch.logspace(-3, 1, 50).view(-1, 1, 1, 1)
    eps = 0.5
    p = project(v, eps, norm)
    n_in, n_out = lp_norms(v, norm), lp_norms(p, norm)
    assert (n_out <= eps * (1 + 1e-6)).all()
    inside = n_in <= eps
    assert inside.any() and (~inside).any()
    assert torch.equal(p[inside], v[inside])
    if norm == "l2":  # outside points land on the sphere, in the same direction
        assert torch.allclose(n_out[~inside], torch.full_like(n_out[~inside], eps), rtol=1e-5)
        cos = torch.nn.functional.cosine_similarity(p[~inside].flatten(1), v[~inside].flatten(1))
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


def test_zeta_to_eps_by_hand():
    imgs = torch.tensor([[[[0.0, 0.5], [0.3, 0.4]]], [[[1.0, 0.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    # L-inf norms 0.5 and 1.0 -> mean 0.75; L2 norms sqrt(.25+.09+.16)=sqrt(.5) and 1
    assert zeta_to_eps(imgs, 2, "linf") == pytest.approx(0.02 * 0.75)
    assert zeta_to_eps(imgs, 4, "l2") == pytest.approx(0.04 * (math.sqrt(0.5) + 1) / 2)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_uap_has_exactly_norm_eps(norm):
    for seed in range(5):
        v = random_uap((1, 16, 16), 0.03, norm, torch.Generator().manual_seed(seed))
        assert lp_norms(v[None], norm).item() == pytest.approx(0.03, rel=1e-6)
    a = random_uap((1, 16, 16), 0.03, norm, torch.Generator().manual_seed(1))
    b = random_uap((1, 16, 16), 0.03, norm, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def make_attack(model, dm, cls=FGSMUAP, **kw):
    args = dict(classifier=model.net, image_size=dm.image_size, classes=dm.classes, norm="linf", zeta=4.0,
                step=0.001, max_iter=8, delta=0.05)
    args.update(kw)
    return cls(**args)


def fit(atk, dm, seed=0):
    x, y = dm.dataset("train").tensors()
    atk.eps = zeta_to_eps(x[:, :1], atk.zeta, atk.norm)
    return atk.make(x, y, trainer_kwargs={"enable_progress_bar": False}, seed=seed)


def test_fr(model, dm, v):
    test = dm.dataset("test")
    p = predict(model.net, test, {"clean": None, "uap": v, "random": random_uap(v.shape, lp_norms(v[None], "linf").item(), "linf",
                                                                                  torch.Generator().manual_seed(9))})
    return p, fooling_rate(p["clean"], p["uap"]), fooling_rate(p["clean"], p["random"])


test_fr.__test__ = False


def test_classifier_is_frozen_and_v_is_the_only_trainable_parameter(phantom_model):
    _, dm, model = phantom_model
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    atk = make_attack(model, dm, max_iter=1)
    assert [n for n, p in atk.named_parameters() if p.requires_grad] == ["v"]
    assert tuple(atk.v.shape) == (1, dm.image_size, dm.image_size)
    fit(atk, dm)
    assert not atk.classifier.training
    for k, v in model.net.state_dict().items():  # BN statistics included
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("mode", ["batched", "faithful"])
def test_fgsm_uap_fools_far_more_than_random_within_eps(phantom_model, mode):
    _, dm, model = phantom_model
    # faithful: from v = 0, one paper-size step (0.001) flips no confident phantom image, so nothing
    # would ever be accepted; a larger step lets the one-image-at-a-time loop start
    kw = dict(max_iter=15) if mode == "batched" else dict(max_iter=2, step=0.004)  # 15: the default
    atk = make_attack(model, dm, mode=mode, **kw)
    v = fit(atk, dm)
    assert lp_norms(v[None], "linf").item() <= atk.eps * (1 + 1e-6)
    _, fr, fr_rand = test_fr(model, dm, v)
    assert fr >= 0.5, fr
    assert fr >= 5 * fr_rand, (fr, fr_rand)


def test_sgd_uap_fools_far_more_than_random(phantom_model):
    _, dm, model = phantom_model
    atk = make_attack(model, dm, cls=SGDUAP, max_iter=4, delta=0.0)
    v = fit(atk, dm)
    _, fr, fr_rand = test_fr(model, dm, v)
    assert fr >= 0.5 and fr >= 5 * fr_rand, (fr, fr_rand)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_targeted_uap_reaches_the_target(phantom_model, norm):
    _, dm, model = phantom_model
    target = "normal"
    atk = make_attack(model, dm, target=target, norm=norm, zeta=6.0, max_iter=6)
    v = fit(atk, dm)
    assert lp_norms(v[None], norm).item() <= atk.eps * (1 + 1e-5)
    p, _, _ = test_fr(model, dm, v)
    share = success_rate(dm.dataset("test").labels, 0)
    tsr = success_rate(p["uap"], 0)
    assert tsr >= share + 0.3, (tsr, share)


@pytest.mark.parametrize("mode", ["batched", "faithful"])
def test_same_seed_same_uap_bitwise(phantom_model, mode):
    _, dm, model = phantom_model
    runs = [fit(make_attack(model, dm, mode=mode, max_iter=1, step=0.004), dm, seed=s) for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].abs().sum() > 0 and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("kw, key", [
    ({"zeta": 0}, "attack.zeta"), ({"zeta": 101}, "attack.zeta"), ({"norm": "l1"}, "attack.norm"),
    ({"target": "flu"}, "attack.target"), ({"max_iter": 0}, "attack.max_iter"), ({"mode": "fast"}, "attack.mode"),
])
def test_bad_attack_arguments_name_the_key(phantom_model, kw, key):
    _, dm, model = phantom_model
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_attack(model, dm, **kw)
