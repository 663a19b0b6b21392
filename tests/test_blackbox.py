"""Black-box UAPs and attackers without the victim's images: the victim's query count and its refusals, the DCT
basis, U-SimBA's step and acceptance, the NES estimate, the proxy input sources, and the bad inputs they refuse."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import FAST, make_cfg, mlflow_runs, run_cli
from PIL import Image

from pipeline.attack import lp_norms, random_control
from pipeline.attack.acceptance import IfScoreImproves
from pipeline.attack.build import build_attack, check_queries
from pipeline.attack.dct import Basis, block_order, dct_matrix
from pipeline.attack.step import NES, SimBA
from pipeline.attack.victim import BlackBoxViolation, OutOfQueries, Victim
from pipeline.bench.blackbox import checkpoints, first_reaching
from pipeline.bench.trace import QueryTrace
from pipeline.config import validate
from pipeline.data.proxy import proxy_set
from pipeline.errors import ConfigError, DataError
from pipeline.eval.metrics import fooling_rate
from pipeline.eval.predictions import predict


def small_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()


def test_the_victim_counts_every_image_and_gives_a_black_box_probabilities_only():
    victim = Victim(small_net(), black_box=True, max_queries=10)
    x = torch.rand(4, 3, 8, 8)
    p = victim.probabilities(x)
    assert torch.allclose(p.sum(1), torch.ones(4)) and not p.requires_grad
    assert victim.predict(x).shape == (4,) and victim.queries == 8
    with pytest.raises(BlackBoxViolation):
        victim.logits(x)
    with pytest.raises(BlackBoxViolation):
        victim.probabilities(x.clone().requires_grad_(True))
    with pytest.raises(OutOfQueries):  # 3 more would pass the budget of 10: refused before it runs
        victim.probabilities(x[:3])
    assert victim.queries == 8
    victim.probabilities(x[:2])
    assert victim.queries == 10 and victim.left() == 0
    white = Victim(small_net())
    xg = x.clone().requires_grad_(True)
    white.logits(xg).sum().backward()
    assert xg.grad is not None and white.queries == 4


def test_the_dct_basis_is_orthonormal_and_u_simba_order_starts_with_the_lowest_frequencies():
    d = dct_matrix(16)
    assert torch.allclose(d @ d.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    basis = Basis(16)
    a, b = basis.image(0), basis.image(17)
    assert abs(a.norm().item() - 1) < 1e-5 and abs((a * b).sum().item()) < 1e-5
    assert torch.allclose(a, torch.full_like(a, 1 / 16), atol=1e-6)  # coefficient (0, 0): a constant image
    order = block_order(16, 4, 2, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(256))  # every coefficient once
    assert {divmod(int(i), 16) for i in order[:16]} == {(r, c) for r in range(4) for c in range(4)}
    assert {divmod(int(i), 16) for i in order[16:36]} == {(r, c) for r in range(6) for c in range(6)} - {
        (r, c) for r in range(4) for c in range(4)}  # then the shell of stride 2
    u = basis.random(5, 3, torch.Generator().manual_seed(1))
    coef = dct_matrix(16).float() @ u[:, 0] @ dct_matrix(16).float().T
    assert torch.allclose(u.flatten(1).norm(dim=1), torch.ones(5), atol=1e-5)
    assert coef[:, 3:, :].abs().max() < 1e-5 and coef[:, :, 3:].abs().max() < 1e-5  # only the 3 x 3 lowest


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_simba_tries_one_basis_image_both_ways_at_step_times_eps(norm):
    rule = SimBA(step=0.1, freq_dim=2)
    rule.setup(eps=0.5, norm=norm, numel=64, total_steps=10, generator=torch.Generator().manual_seed(0))
    v = torch.zeros(1, 8, 8)
    seen = set()
    for _ in range(4):
        c = rule.candidates(v)
        assert c.shape == (2, 1, 8, 8) and torch.allclose(c[0], -c[1])
        assert lp_norms(c[1:], norm).item() == pytest.approx(0.05, rel=1e-5)
        seen.add(tuple(c[1].flatten().sign().tolist()))
    assert len(seen) == 4  # the four lowest coefficients, each once


def test_score_acceptance_keeps_the_lowest_score_only_when_it_improves():
    rule = IfScoreImproves()
    assert rule.choose_score(torch.tensor([3.0, 2.5]), 2.8) == 1
    assert rule.choose_score(torch.tensor([3.0, 2.9]), 2.8) is None
    assert rule.choose_score(torch.tensor([2.8]), 2.8) is None  # equal is no improvement


def test_nes_estimates_the_gradient_of_a_linear_loss_in_its_subspace():
    est = NES(directions=4000, sigma=0.25, freq_dim=3)
    est.setup(eps=0.1, norm="l2", numel=64, generator=torch.Generator().manual_seed(0))
    a = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(5))
    d = dct_matrix(8).float()
    coef = d @ a[0] @ d.T
    coef[3:, :], coef[:, 3:] = 0, 0
    a_low = (d.T @ coef @ d)[None]  # the part of the gradient the 3 x 3 subspace can see
    u, probes = est.probes(torch.zeros(1, 8, 8))
    g = est.estimate(u, (probes * a).flatten(1).sum(1))
    assert torch.cosine_similarity(g.flatten(), a_low.flatten(), dim=0) > 0.95


# -- the attacks on the phantom classifier

def attack_on(phantom_model, attack, *overrides):
    cfg, dm, model = phantom_model
    c = make_cfg([f"attack={attack}", "zeta=4", *overrides])
    atk, inputs = build_attack(c, dm, model.net)
    x, y = inputs.tensors()
    v = atk.make(x, y, trainer_kwargs={"enable_progress_bar": False}, seed=0)
    return atk, inputs, v


def test_simba_uap_queries_exactly_its_input_set_twice_per_step_and_stops_at_max_queries(phantom_model):
    atk, inputs, v = attack_on(phantom_model, "simba_uap", "attack.max_iter=20", "attack.input_limit=50")
    n = len(inputs)
    assert n == 50 and atk.queries == n + 2 * n * atk.passes  # clean predictions, then -q and +q per step
    assert lp_norms(v[None], "linf").item() <= atk.eps * (1 + 1e-6)
    assert [h["queries"] for h in atk.history] == [n + 2 * n * (i + 1) for i in range(atk.passes)]
    atk, _, _ = attack_on(phantom_model, "simba_uap", "attack.max_queries=1000", "attack.input_limit=50")
    assert atk.queries == 50 + 2 * 50 * 9 and atk.passes == 9  # a tenth step would pass 1,000


def test_a_score_based_search_weighs_candidates_and_still_scores_its_own_steps_from_the_clean_images(phantom_model):
    """Weighing a candidate queries the victim; the search's first scores must stay the clean images' (an
    adaptive attack always has one: the UAP made without the transform), or every step near 0 looks worse."""
    cfg, dm, model = phantom_model
    _, inputs, strong = attack_on(phantom_model, "simba_uap", "attack.max_iter=5", "attack.input_limit=50")
    c = make_cfg(["attack=simba_uap", "zeta=4", "attack.max_iter=5", "attack.input_limit=50"])
    atk, _ = build_attack(c, dm, model.net)
    x, y = inputs.tensors()
    v = atk.make(x, y, trainer_kwargs={"enable_progress_bar": False}, seed=0, candidates=[strong * 1.0])
    assert v.abs().sum() > 0  # steps were accepted: the search moved from 0


def test_nes_uap_fools_more_than_its_random_control_within_its_budget(phantom_model):
    _, dm, model = phantom_model
    atk, _, v = attack_on(phantom_model, "nes_uap", "attack.max_queries=20000")
    assert 20000 - (2 * 32 + 1) < atk.queries <= 20000  # stopped when the next step would not fit
    assert lp_norms(v[None], "linf").item() <= atk.eps * (1 + 1e-6)
    p = predict(model.net, dm.dataset("test"), {"clean": None, "uap": v, "random": random_control(v, atk.eps,
                                                                                                "linf", 0)})
    assert fooling_rate(p["clean"], p["uap"]) > fooling_rate(p["clean"], p["random"]) + 0.15


def test_black_box_attacks_refuse_parts_that_need_gradients_naming_the_key(phantom_model):
    with pytest.raises(ConfigError, match=r"attack\.step_rule=Optimizer needs the victim's gradients"):
        attack_on(phantom_model, "nes_uap", "attack.step_rule.gradient=null")
    with pytest.raises(ConfigError, match=r"attack\.step_rule=FGSM"):
        attack_on(phantom_model, "fgsm_uap", "attack.black_box=true")
    with pytest.raises(ConfigError, match=r"attack\.warm_start"):
        validate(make_cfg(["attack=strong_uap", "attack.black_box=true", "attack/step_rule=adam_nes"]))


def test_a_query_budget_below_one_pass_over_the_input_set_is_refused_before_training(phantom_model):
    _, dm, _ = phantom_model
    with pytest.raises(ConfigError, match=r"attack\.max_queries=99: less than one pass over the 100 input images"):
        check_queries(make_cfg(["attack=simba_uap", "attack.max_queries=99"]), dm)
    check_queries(make_cfg(["attack=simba_uap", "attack.max_queries=100"]), dm)
    with pytest.raises(ConfigError, match=r"attack\.max_queries=0"):
        validate(make_cfg(["attack.max_queries=0"]))


# -- input sources

def test_proxy_sources_are_seeded_gray_images_of_the_data_size(tmp_path):
    for source in ("natural", "noise"):
        a, b = proxy_set(source, 12, 32, seed=3), proxy_set(source, 12, 32, seed=3)
        assert a.images.shape == (12, 1, 32, 32) and a.images.dtype == torch.uint8
        assert torch.equal(a.images, b.images) and not torch.equal(a.images, proxy_set(source, 12, 32, 4).images)
        assert a.images.float().std() > 10  # not blank
    (tmp_path / "x" / "y").mkdir(parents=True)
    for i, sub in enumerate(["x", "x/y", "x/y"]):
        Image.fromarray(np.full((40, 50), 60 * i, np.uint8)).save(tmp_path / sub / f"{i}.png")
    (tmp_path / "x" / "notes.txt").write_text("not an image")
    ds = proxy_set("folder", 10, 16, seed=0, root=str(tmp_path / "x"))
    assert ds.images.shape == (3, 1, 16, 16)
    assert sorted(ds.images[:, 0, 0, 0].tolist()) == [0, 60, 120]


def test_a_missing_or_empty_input_folder_is_named_when_the_config_is_checked(tmp_path):
    with pytest.raises(DataError, match=f"attack.input_root={tmp_path / 'nope'}: folder not found"):
        validate(make_cfg(["attack.input_source=folder", f"attack.input_root={tmp_path / 'nope'}"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no image files"):
        validate(make_cfg(["attack.input_source=folder", f"attack.input_root={tmp_path / 'empty'}"]))
    with pytest.raises(ConfigError, match=r"attack\.input_source='web'"):
        validate(make_cfg(["attack.input_source=web"]))


def test_natural_images_without_scikit_image_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[proxy\]'"):
        proxy_set("natural", 2, 16, seed=0)


def test_eps_stays_relative_to_the_victims_own_images_whatever_the_source(phantom_model):
    _, dm, model = phantom_model
    own, _ = build_attack(make_cfg(["zeta=4"]), dm, model.net)
    atk, inputs = build_attack(make_cfg(["zeta=4", "attack.input_source=noise", "attack.input_limit=30"]), dm,
                               model.net)
    assert len(inputs) == 30 and atk.eps == own.eps


def test_black_box_and_proxy_attacks_run_from_the_command_line_and_in_a_sweep(tmp_path):
    common = [*FAST, "zeta=4", "attack.input_limit=40"]
    run_cli([*common, "attack=nes_uap", "attack.max_queries=3000", "attack.input_source=natural"], tmp_path)
    run_cli(["-m", *common, "attack=simba_uap,nes_uap", "attack.max_queries=2000",
             "attack.input_source=noise"], tmp_path)
    runs = mlflow_runs(tmp_path)
    done = runs[(runs["status"] == "FINISHED") & runs["params.attack.name"].notna()]
    assert sorted(done["params.attack.name"]) == ["nes_uap", "nes_uap", "simba_uap"]
    assert set(done["params.attack.input_source"]) == {"natural", "noise"}
    assert (done["metrics.uap_queries"] <= done["params.attack.max_queries"].astype(float)).all()
    assert (done["metrics.uap_queries"] > 40).all()


def test_the_bench_traces_the_held_out_rate_against_queries_beside_the_search(phantom_model):
    cfg, dm, model = phantom_model
    assert checkpoints(100_000) == [1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000]
    assert first_reaching([(1000, 0.1), (2000, 0.3), (5000, 0.2)], 0.25) == 2000
    assert first_reaching([(1000, 0.1)], 0.5) is None
    c = make_cfg(["attack=nes_uap", "zeta=4", "attack.max_queries=3000"])
    atk, inputs = build_attack(c, dm, model.net)
    seen = []

    def rate(v):  # measured on the classifier directly: not a query of the attacker's
        seen.append(atk.queries)
        return float(v.abs().mean())
    trace = QueryTrace(checkpoints(3000), rate)
    x, y = inputs.tensors()
    atk.make(x, y, trainer_kwargs={"enable_progress_bar": False}, seed=0, callbacks=[trace])
    qs = [q for q, _ in trace.points]
    assert len(qs) == 3 and qs[0] >= 1000 and qs[1] >= 2000 and qs[-1] == atk.queries <= 3000
    assert qs == seen  # the count did not move while measuring
