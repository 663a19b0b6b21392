"""The UAP attacks: each part on hand-made cases, and the compositions of conf/attack on phantom data.

Projection, zeta -> eps, the random control; FGSM / optimiser step rules, objectives, acceptance and
stopping by hand; UAPs that beat their random control; keep-best and candidates; determinism.
"""
import functools
import math
from argparse import Namespace

import pytest
import torch
from conftest import make_cfg

from pipeline.attack import lp_norms, project, random_uap, zeta_to_eps
from pipeline.attack.acceptance import Always, IfFoolsMore
from pipeline.attack.build import build_attack
from pipeline.attack.objective import CrossEntropy, LeaveClass, Margin
from pipeline.attack.step import FGSM, Optimizer
from pipeline.attack.stopper import Stopper
from pipeline.bench.art import run_art, run_ours
from pipeline.bench.study import parse_rows
from pipeline.bench.trace import RateTrace
from pipeline.errors import ConfigError
from pipeline.eval.metrics import fooling_rate, success_rate
from pipeline.eval.predictions import predict

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


# -- the parts, by hand

def test_fgsm_step_sums_the_sign_steps_of_the_stepping_images_averaged_over_channels():
    rule = FGSM(step=0.01, scales=[1.0, 4.0])
    rule.setup(eps=1.0, norm="linf", numel=4, total_steps=1)
    grad = torch.zeros(3, 3, 2, 2)
    grad[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])    # all channels positive: sign mean +1
    grad[0, :, 1, 1] = torch.tensor([1.0, -2.0, -3.0])  # one of three positive: mean -1/3
    grad[1, :, 0, 0] = -5.0                              # image 1 disagrees
    grad[2] = 7.0                                        # image 2 does not step
    v = torch.zeros(1, 2, 2)
    cands = rule.candidates(v, grad, torch.tensor([True, True, False]))
    assert cands.shape == (2, 1, 2, 2)
    expected = -0.01 * torch.tensor([[[1.0 - 1.0, 0.0], [0.0, -1 / 3]]])  # descend: minus the summed signs
    assert torch.allclose(cands[0], expected) and torch.allclose(cands[1], 4 * expected)


def test_fgsm_l2_step_is_a_unit_direction_scaled_by_the_resolution():
    rule = FGSM(step=0.001)
    rule.setup(eps=1.0, norm="l2", numel=16 * 16, total_steps=1)
    grad = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    step = rule.candidates(torch.zeros(1, 16, 16), grad, torch.tensor([True]))[0]
    unit = (grad / grad.norm()).mean(1)  # unit L2 over the 3-channel input, then the channel mean
    assert torch.allclose(step, -0.001 * 16 * unit, atol=1e-7)  # step x sqrt(H*W)


def test_adaptive_fgsm_scale_halves_on_rejection_and_doubles_back():
    rule = FGSM(step=0.01, scales=[8.0], adaptive=True, min_scale=1.0)
    rule.setup(eps=1.0, norm="linf", numel=4, total_steps=1)
    seen = []
    for accepted in (False, False, False, False, True, True, True, True):
        seen.append(rule.scale)
        rule.feedback(accepted)
    assert seen == [8, 4, 2, 1, 1, 2, 4, 8]
    with pytest.raises(ConfigError, match="adaptive"):
        FGSM(scales=[8.0, 1.0], adaptive=True)


@pytest.mark.parametrize("norm, per_pixel", [("linf", 0.02), ("l2", 0.02 / 8)])
def test_optimizer_learning_rate_is_relative_to_eps_per_pixel(norm, per_pixel):
    rule = Optimizer(optimizer=torch.optim.SGD, lr=0.5)
    rule.setup(eps=0.02, norm=norm, numel=64, total_steps=10)
    opt = rule.configure([torch.nn.Parameter(torch.zeros(1, 8, 8))])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * per_pixel)


def test_optimizer_schedule_runs_over_the_whole_search():
    rule = Optimizer(optimizer=torch.optim.Adam, lr=1.0,
                     scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR))
    rule.setup(eps=1.0, norm="linf", numel=4, total_steps=20)
    conf = rule.configure([torch.nn.Parameter(torch.zeros(1, 2, 2))])
    assert conf["lr_scheduler"]["scheduler"].T_max == 20 and conf["lr_scheduler"]["interval"] == "step"


def test_objectives_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 9.0, 0.0]])
    clean, pred = torch.tensor([0, 0]), logits.argmax(1)
    lse = torch.logsumexp(logits, 1)
    ce_clean = lse - logits[:, 0]
    assert torch.allclose(CrossEntropy("clean")(logits, clean, pred, None), -ce_clean)
    assert torch.allclose(CrossEntropy("clean", clamp=5.0)(logits, clean, pred, None), -ce_clean.clamp(max=5))
    assert torch.allclose(CrossEntropy("current")(logits, clean, pred, None), -(lse - torch.tensor([3.0, 9.0])),
                          atol=1e-5)
    assert torch.allclose(CrossEntropy("clean")(logits, clean, pred, 2), lse - 0.0)  # targeted: CE of the target
    p0 = torch.softmax(logits, 1)[:, 0]
    assert torch.allclose(LeaveClass()(logits, clean, pred, None), -torch.log1p(-p0), atol=1e-5)
    # margins: image 0 clean class ahead by 2; image 1 behind by 9, capped at -kappa
    assert torch.allclose(Margin(kappa=5)(logits, clean, pred, None), torch.tensor([2.0, -5.0]))
    assert torch.allclose(Margin(kappa=5)(logits, clean, pred, 1), torch.tensor([2.0, -5.0]))  # target 1


def test_acceptance_rules_by_hand():
    fooled = torch.tensor([True, False, False])
    fools = torch.tensor([[True, False, False], [True, True, False], [False, True, True]])
    assert IfFoolsMore().choose(fools, fooled) == 1  # the first of the best (2 images) beats v's 1
    assert IfFoolsMore().choose(fools[:1], fooled) is None  # fools as many as v: rejected
    assert IfFoolsMore().choose(torch.tensor([[True]]), torch.tensor([False])) == 0  # one image: flips
    assert Always().choose(None, fooled) == 0


def test_stopper_by_hand():
    s = Stopper(max_passes=10, delta=0.2, patience=2)
    assert s.reason([0.1, 0.5]) is None
    assert "1 - delta" in s.reason([0.1, 0.8])
    assert "no progress" in s.reason([0.1, 0.5, 0.5, 0.4])
    assert s.reason([0.1, 0.5, 0.5, 0.6]) is None
    assert "10 passes" in Stopper(max_passes=10, delta=0.0).reason([0.1] * 10)


# -- compositions on phantom data

def make_attack(model, dm, attack="fgsm_uap", *overrides):
    """The conf/attack composition `attack` (zeta 4, 8 passes, delta 0.05 unless overridden) against the model."""
    cfg = make_cfg([f"attack={attack}", "zeta=4", "attack.max_iter=8", "attack.delta=0.05", *overrides])
    atk, _ = build_attack(cfg, dm, model.net)
    return atk


def fit(atk, dm, seed=0, **kw):
    x, y = dm.dataset("train").tensors()
    return atk.make(x, y, trainer_kwargs={"enable_progress_bar": False}, seed=seed, **kw)


def test_fr(model, dm, v):
    test = dm.dataset("test")
    p = predict(model.net, test, {"clean": None, "uap": v,
                                  "random": random_uap(v.shape, lp_norms(v[None], "linf").item(), "linf",
                                                       torch.Generator().manual_seed(9))})
    return p, fooling_rate(p["clean"], p["uap"]), fooling_rate(p["clean"], p["random"])


test_fr.__test__ = False


def test_classifier_is_frozen_and_v_is_the_only_trainable_parameter(phantom_model):
    _, dm, model = phantom_model
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    atk = make_attack(model, dm, "fgsm_uap", "attack.max_iter=1")
    assert [n for n, p in atk.named_parameters() if p.requires_grad] == ["v"]
    assert tuple(atk.v.shape) == (1, dm.image_size, dm.image_size)
    fit(atk, dm)
    assert not atk.classifier.training
    for k, v in model.net.state_dict().items():  # BN statistics included
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("attack, overrides", [
    ("fgsm_uap", ["attack.max_iter=15"]),  # 15: the default
    # faithful: from v = 0, one paper-size step (0.001) flips no confident phantom image, so nothing
    # would ever be accepted; a larger step lets the one-image-at-a-time loop start
    ("fgsm_uap_faithful", ["attack.max_iter=2", "attack.step=0.004"]),
    ("sgd_uap", ["attack.max_iter=4", "attack.delta=0"]),
    ("strong_uap", ["attack.max_iter=4", "attack.restarts=0"]),
])
def test_uap_fools_far_more_than_random_within_eps(phantom_model, attack, overrides):
    _, dm, model = phantom_model
    atk = make_attack(model, dm, attack, *overrides)
    v = fit(atk, dm)
    assert lp_norms(v[None], "linf").item() <= atk.eps * (1 + 1e-6)
    _, fr, fr_rand = test_fr(model, dm, v)
    # What the method guarantees is a UAP far above its random control of the same norm, not one machine's FR:
    # the phantom classifier differs across CPUs (oneDNN kernels) and seeds. Measured on the fast phantom recipe,
    # classifier seeds 0-4 x UAP seeds 0-1, every attack here: FR 0.52-0.69, random 0.04-0.16, FR - random
    # >= 0.38, FR / random >= 3.4 (fgsm_uap the lowest); another CPU gave fgsm_uap FR 0.377 at seed 42. The
    # bounds keep about half of the smallest margin seen.
    assert fr - fr_rand >= 0.2, (fr, fr_rand)
    assert fr >= 2 * fr_rand, (fr, fr_rand)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_targeted_uap_reaches_the_target(phantom_model, norm):
    _, dm, model = phantom_model
    atk = make_attack(model, dm, "fgsm_uap", "attack.target=normal", f"norm={norm}", "zeta=6", "attack.max_iter=6")
    v = fit(atk, dm)
    assert lp_norms(v[None], norm).item() <= atk.eps * (1 + 1e-5)
    p, _, _ = test_fr(model, dm, v)
    share = success_rate(dm.dataset("test").labels, 0)
    tsr = success_rate(p["uap"], 0)
    assert tsr >= share + 0.3, (tsr, share)


def test_keep_best_never_returns_less_than_its_best_candidate(phantom_model):
    _, dm, model = phantom_model
    strong = fit(make_attack(model, dm, "sgd_uap", "attack.max_iter=4", "attack.delta=0"), dm)
    # a search that cannot move (a step too small to flip anything) from zeros, with that UAP as a candidate
    weak = make_attack(model, dm, "fgsm_uap_faithful", "attack.max_iter=1", "attack.step=1e-9", "attack.keep=best")
    v = fit(weak, dm, candidates=[torch.zeros_like(strong), strong])
    assert weak.exact_rate(strong) >= 0.5
    assert weak.exact_rate(v) >= weak.exact_rate(strong) and weak.best["fr"] == weak.exact_rate(v)
    same = make_attack(model, dm, "fgsm_uap_faithful", "attack.max_iter=1", "attack.step=1e-9", "attack.keep=last")
    assert fit(same, dm).abs().max() == 0  # without the candidate, nothing


def test_a_search_can_begin_at_its_best_candidate(phantom_model):
    _, dm, model = phantom_model
    strong = fit(make_attack(model, dm, "sgd_uap", "attack.max_iter=4", "attack.delta=0"), dm)
    # a search that cannot move, returning its last iterate: it ends where it began
    still = ["attack.max_iter=1", "attack.step=1e-9", "attack.keep=last"]
    atk = make_attack(model, dm, "fgsm_uap_faithful", *still, "attack.start_at_candidate=true")
    v = fit(atk, dm, candidates=[torch.zeros_like(strong), strong])
    assert torch.allclose(v, strong.reshape(v.shape), atol=1e-6)  # the better candidate, not zeros
    assert atk.exact_rate(v) >= 0.5
    plain = make_attack(model, dm, "fgsm_uap_faithful", *still)
    assert fit(plain, dm, candidates=[strong]).abs().max() == 0  # by default the first start is the initializer's


def test_the_bench_trace_measures_beside_the_search_not_inside_it(phantom_model):
    _, dm, model = phantom_model
    atk = make_attack(model, dm, "sgd_uap", "attack.max_iter=2", "attack.delta=0")
    trace = RateTrace(every=5)
    v = fit(atk, dm, callbacks=[trace])
    steps = math.ceil(len(dm.dataset("train")) / atk.batch_size)
    assert len(trace.points) == 2 * (steps // 5 + 1)  # every 5 steps, and after each pass
    times = [t for t, _ in trace.points]
    assert times == sorted(times) and times[-1] == atk.history[-1]["seconds"]
    assert trace.points[-1][1] == atk.exact_rate(v)  # the last iterate, returned (keep: last)
    assert atk.clock.off > 0  # its measuring paused the search's clock


def test_restarts_run_from_other_points_and_keep_the_best(phantom_model):
    _, dm, model = phantom_model
    atk = make_attack(model, dm, "sgd_uap", "attack.max_iter=1", "attack.delta=0", "attack.restarts=2",
                      "attack.keep=best")
    fit(atk, dm)
    assert [h["start"] for h in atk.history] == [0, 1, 2]
    best = max(h["fr"] for h in atk.history)
    assert atk.best["fr"] == best and atk.exact_rate(atk.uap()) == best


def test_a_targeted_search_takes_its_own_schedule(phantom_model):
    """attack.targeted_overrides (grid_uap): a targeted search takes these keys, a non-targeted one does not."""
    _, dm, model = phantom_model
    starts = {}
    for target in (None, "normal"):
        atk = make_attack(model, dm, "sgd_uap", "attack.max_iter=1", "attack.delta=0", "attack.restarts=2",
                          "attack.keep=best", "+attack.targeted_overrides={restarts:0,stopper:{patience:1}}",
                          f"attack.target={target or 'null'}")
        assert atk.stopper.patience == (None if target is None else 1)
        fit(atk, dm)
        starts[target] = sorted({h["start"] for h in atk.history})
    assert starts == {None: [0, 1, 2], "normal": [0]}


@pytest.mark.parametrize("attack", ["fgsm_uap", "fgsm_uap_faithful", "strong_uap"])
def test_same_seed_same_uap_bitwise(phantom_model, attack):
    _, dm, model = phantom_model
    runs = [fit(make_attack(model, dm, attack, "attack.max_iter=1", "attack.step=0.004"), dm, seed=s)
            for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].abs().sum() > 0 and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("override, key", [
    ("zeta=0", "attack.zeta"), ("zeta=101", "attack.zeta"), ("norm=linf attack.norm=l1", "attack.norm"),
    ("attack.target=flu", "attack.target"), ("attack.max_iter=-1", "attack.max_iter"),
    ("attack.keep=worst", "attack.keep"),
    ("attack.restarts=-1", "attack.restarts"),
    ("attack.targeted_overrides={restart:0}", "attack.targeted_overrides.restart"),
    ("attack.step_rule.scales=[]", "attack.step_rule.scales"),
    ("attack.objective.label=nope", "attack.objective.label"), ("attack.batch_size=0", "attack.batch_size"),
    ("attack.step=0", "attack.step"),
])
def test_bad_attack_arguments_name_the_key(phantom_model, override, key):
    _, dm, model = phantom_model
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_attack(model, dm, "fgsm_uap", *override.split())


def test_faithful_mode_tracks_art_on_a_tiny_set(phantom_model):
    """The reference row of the bench: fgsm_uap_faithful against ART's UniversalPerturbation (FGSM attacker),
    same classifier, images, eps, step and passes. ART's UAP has 3 channels where the paper's (ours) is one
    gray image, and ART shuffles with its own generator: close, not identical."""
    _, dm, model = phantom_model
    x, y = dm.dataset("train").subset(range(64)).tensors()
    eps = zeta_to_eps(x[:, :1], 4, "linf")
    args = Namespace(step=0.004, delta=0.0, max_iter=2, batch_size=32, seed=0, zeta=4, record_every=0)
    net, cpu = model.net.eval(), torch.device("cpu")
    art, _ = run_art(net, x, eps, args, None, dm.num_classes, cpu)
    ours, v = run_ours("faithful", ["attack=fgsm_uap_faithful"], net, x, y, eps, args, None, dm.classes, cpu)
    assert art.passes == ours.passes == 2
    assert art.fr_input >= 0.3, art.fr_input  # both get somewhere: a comparison, not two zeros
    assert abs(ours.fr_input - art.fr_input) <= 0.1, (ours.fr_input, art.fr_input)
    assert lp_norms(v[None], "linf").item() <= eps * (1 + 1e-6)


def test_study_rows_selection():
    """`python -m pipeline.bench --study --rows`: 1-based rows and ranges, 'none', and a clear error otherwise."""
    assert parse_rows("1,3,14-16", 17) == {1, 3, 14, 15, 16}
    assert parse_rows(None, 3) == {1, 2, 3} and parse_rows("none", 3) == set()
    for bad in ("0", "2-1", "18", "a"):
        with pytest.raises(SystemExit, match="--rows"):
            parse_rows(bad, 17)
