"""The hospital's pipeline (`transform=...`): what each transform does, its gradient for an adaptive attacker,
its config errors, evaluation through it and the adaptive attack against it."""
import numpy as np
import pytest
import torch
from conftest import make_cfg, mlflow_runs, run_cli

from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.eval.transforms import JPEG, BitDepth, Blur, Median, Pipeline, Resize, build
from pipeline.report.tables import transform_table

FAST = ["trainer=fast", "trainer.max_epochs=20", "attack=sgd_uap", "attack.max_iter=5", "zeta=2"]


def images(n=4, size=32, seed=0):
    x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return x.expand(-1, 3, -1, -1).contiguous()


@pytest.mark.parametrize("t", [JPEG(75), Resize(16), Blur(1.0), Median(3), BitDepth(4)], ids=repr)
def test_every_transform_keeps_shape_range_and_is_deterministic(t):
    x = images()
    y = t(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, t(x))
    assert torch.equal(y[:, 0], y[:, 1])  # grayscale stays grayscale


def test_transforms_on_hand_made_cases():
    flat = torch.full((2, 3, 16, 16), 0.4)
    for t in (Resize(4), Blur(2.0), Median(5)):  # a flat image is left as it is
        assert torch.allclose(t(flat), flat, atol=1e-6), t
    assert BitDepth(2)(images()).mul(3).sub(BitDepth(2)(images()).mul(3).round()).abs().max() < 1e-6  # 4 levels
    assert BitDepth(2)(images()).unique().numel() <= 4
    salt = flat.clone()
    salt[:, :, 8, 8] = 1.0  # one bright pixel: the median removes it, a blur only spreads it
    assert torch.allclose(Median(3)(salt), flat, atol=1e-6)
    assert Blur(1.0)(salt)[0, 0, 8, 8] < 1.0 and Blur(1.0)(salt)[0, 0, 8, 7] > 0.4 + 1e-3
    x = images()
    err = {q: (JPEG(q)(x) - x).abs().mean().item() for q in (10, 95)}
    assert err[95] < err[10]  # lower quality, larger change


def test_ranges_draw_per_image_the_same_for_the_same_seed():
    p = Pipeline([Blur([0.5, 3.0])])
    x = images(8)
    assert torch.equal(p(x, seed=1), p(x, seed=1))
    assert not torch.equal(p(x, seed=1), p(x, seed=2))
    same = x[:1].expand(8, -1, -1, -1)
    out = p(same, seed=1)
    assert not torch.allclose(out[0], out[1])  # one draw per image


@pytest.mark.parametrize("t", [JPEG(50), Median(3), BitDepth(3)], ids=repr)
def test_non_differentiable_transforms_pass_the_gradient_straight_through(t):
    x = images().requires_grad_(True)
    w = torch.randn_like(x)
    (t(x) * w).sum().backward()
    assert torch.equal(x.grad, w)  # BPDA: the identity's gradient


def test_blur_has_its_own_gradient():
    x = images().requires_grad_(True)
    w = torch.zeros_like(x)
    w[:, :, 16, 16] = 1
    (Blur(1.0)(x) * w).sum().backward()
    g = x.grad[0, 0]
    assert g[16, 16] < 1 and g[16, 17] > 0 and torch.isclose(g.sum(), torch.tensor(1.0), atol=1e-5)


def test_transform_configs_compose_in_order_and_bad_values_name_their_key(tmp_path):
    p = build(make_cfg(["transform=[resize,jpeg]"], tmp_path).transform)
    assert [type(t) for t in p.steps] == [Resize, JPEG] and p.name == "resize+jpeg"
    assert not build(make_cfg([], tmp_path).transform)  # transform=none: the identity
    for override, key in (("transform.jpeg.quality=0", "transform.jpeg.quality"),
                          ("transform.jpeg.quality=[90,50]", "transform.jpeg.quality")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(make_cfg(["transform=jpeg", override], tmp_path))
    with pytest.raises(ConfigError, match="transform.median.kernel"):
        validate(make_cfg(["transform=median", "transform.median.kernel=4"], tmp_path))
    with pytest.raises(ConfigError, match="attack.adaptive=true"):
        validate(make_cfg(["attack.adaptive=true"], tmp_path))
    for task in ("defense", "transfer", "min_zeta"):  # tasks that measure without the pipeline refuse it
        with pytest.raises(ConfigError, match=f"task={task} measures without it"):
            validate(make_cfg(["transform=jpeg", f"task={task}"], tmp_path))
    with pytest.raises(ConfigError, match="defense.black_box_attack"):
        validate(make_cfg(["task=defense", "defense.black_box_attack=no_such_attack"], tmp_path))


def test_report_table_puts_each_transform_beside_its_adaptive_attack():
    base = {"data": "PhantomDataModule", "model": "tiny", "attack": "sgd_uap", "target": "non-targeted",
            "norm": "linf", "zeta": 2.0, "n_test": 300, "test_acc_clean": 0.9, "test_t_acc_clean": 0.8, "test": 0.7,
            "test_t_random": 0.05}
    rows = [{**base, "transform": "jpeg(quality=75)", "adaptive": False, "test_t": 0.4},
            {**base, "transform": "jpeg(quality=75)", "adaptive": True, "test_t": 0.6}]
    table = transform_table(rows)
    line = [row for row in table.splitlines() if row.startswith("| jpeg")][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "0.900 -> 0.800"
    assert cells[3].startswith("0.700") and cells[4].startswith("0.400") and cells[5].startswith("0.600")
    assert transform_table([{**base, "transform": None, "adaptive": False, "test_t": None}]) == ""


def test_evaluation_through_a_transform_and_the_adaptive_attack_beats_the_one_that_ignores_it(tmp_path):
    blur = ["transform=blur", "transform.blur.sigma=2"]
    proc = run_cli([*FAST, *blur], tmp_path)
    assert "test*" in proc.stdout + proc.stderr
    run_cli([*FAST, *blur, "attack.adaptive=true"], tmp_path)
    runs = mlflow_runs(tmp_path).sort_values("start_time")
    plain, adaptive = runs.iloc[0], runs.iloc[1]
    assert plain["params.transform"] == "blur(sigma=2)"
    for r in (plain, adaptive):  # the same clean images through the same transform: one accuracy, one control
        assert 0 <= r["metrics.transform_test_fr"] <= 1
    assert plain["metrics.transform_test_acc_clean"] == adaptive["metrics.transform_test_acc_clean"]
    assert plain["metrics.transform_test_fr_random"] == adaptive["metrics.transform_test_fr_random"]
    # a blur takes much of the plain UAP away; the attacker who searches through it gets more of it back
    assert plain["metrics.transform_test_fr"] < plain["metrics.test_fr"]
    assert adaptive["metrics.transform_test_fr"] > plain["metrics.transform_test_fr"] + 0.03
    assert np.isfinite(adaptive["metrics.test_fr"])
