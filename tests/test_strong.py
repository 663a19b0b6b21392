"""The grid's method is sound in its budget by construction (real chest X-rays, a fast model, a small grid).

On the input set, for every norm and target: the rate (FR non-targeted, TSR targeted) never falls as
zeta grows; the non-targeted FR is at least the fooling rate of each targeted UAP at the same zeta; and
each UAP of the grid is made once (the warm starts reuse the cache).
"""
import pytest
from conftest import mlflow_runs, run_cli

pytestmark = pytest.mark.realdata

ZETAS = [1, 2, 4]
TARGETS = ["non-targeted", "normal", "pneumonia", "COVID-19"]


@pytest.fixture(scope="module")
def grid(cxr3_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("strong")
    args = ["data=cxr3", f"data.root={cxr3_root}", "model=tiny", "data.image_size=64", "trainer.max_epochs=8",
            "trainer.enable_progress_bar=false", "attack=strong_uap", "attack.max_iter=2", "attack.restarts=0",
            "attack.input_limit=320",
            f"attack.warm_start.zetas=[{','.join(map(str, ZETAS))}]", "norm=linf",
            f"zeta={','.join(map(str, ZETAS))}", "attack.target=null,normal,pneumonia,COVID-19", "-m"]
    proc = run_cli(args, root, timeout=1500)
    runs = mlflow_runs(root)
    parents = runs[runs["tags.role"] == "parent"]
    assert len(parents) == 1  # an ad-hoc sweep (no +sweep=) gets its parent run too
    runs = runs[(runs["tags.role"] != "parent") & (runs["status"] == "FINISHED")]
    assert (runs["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]).all()
    table = {}
    for _, r in runs.iterrows():
        target = r["params.attack.target"]
        table[(target if target not in ("None", None) else "non-targeted", float(r["params.attack.zeta"]))] = r
    return root, proc, table


def rate(run, target):
    return run["metrics.input_fr"] if target == "non-targeted" else run["metrics.input_tsr"]


def test_every_job_of_the_grid_finished(grid):
    _, _, table = grid
    assert sorted(table) == sorted((t, float(z)) for t in TARGETS for z in ZETAS)


@pytest.mark.parametrize("target", TARGETS)
def test_input_set_rate_never_falls_as_zeta_grows(grid, target):
    _, _, table = grid
    rates = [rate(table[(target, float(z))], target) for z in ZETAS]
    assert all(b >= a - 0.005 for a, b in zip(rates, rates[1:])), rates
    assert rates[-1] > rates[0], rates  # and the budget is used: not flat by doing nothing


@pytest.mark.parametrize("zeta", ZETAS)
def test_non_targeted_fools_at_least_as_many_as_each_targeted_uap(grid, zeta):
    _, _, table = grid
    nt = table[("non-targeted", float(zeta))]["metrics.input_fr"]
    for target in TARGETS[1:]:
        assert nt >= table[(target, float(zeta))]["metrics.input_fr"] - 0.01, (target, nt)


def test_each_uap_of_the_grid_is_made_once(grid):
    root, proc, _ = grid
    entries = [e for e in (root / "outputs" / "cache" / "uaps").iterdir() if (e / "uap.npy").is_file()]
    assert len(entries) == len(ZETAS) * len(TARGETS)
    log = proc.stdout + proc.stderr
    assert log.count("UAP made in") == len(ZETAS) * len(TARGETS)  # each once, whichever job needed it first
    assert "UAP loaded from cache" in log
