"""The physics-informed example (configs/run_pinn.yaml, model.Oscillator, util.load_oscillator):
its loss is the residual of a real differential equation, from input gradients (torch.func),
in training, validation and pre-flight, with the seeds trained together; and what it learns
approaches the equation's known solution. Every shipped example analyses with exit 0."""
import math

import pytest
import torch

import analyze
from config import RunConfig, load_yaml
from conftest import ROOT
from engine.preflight import preflight
from engine.run import run


def pinn(**change) -> RunConfig:
    data = load_yaml(ROOT / "configs" / "run_pinn.yaml")
    data.update(project="test", device="cpu", seeds=[1, 2], wandb={"mode": "disabled", "tags": []}, **change)
    return RunConfig.from_dict(data)


@pytest.mark.slow
def test_val_loss_is_the_residual_and_initial_conditions_on_the_grid(workdir, capsys):
    config = pinn(epochs=3, group="short")
    result = run(config)
    assert "seeds 1,2 train together as one stacked model" in capsys.readouterr().err
    model = analyze.load_run(result.group_dir).models[1]
    t, u = config.load_data()[1].tensors
    # The model's own loss on the whole grid, by hand: the residual needs gradients with respect to t.
    by_hand = model.loss(t, u, torch.nn.MSELoss()).item()
    assert result.seeds[0].best_value == pytest.approx(by_hand, rel=1e-4)
    assert by_hand > 0


@pytest.mark.slow
def test_preflight_checks_the_residual(workdir, capsys):
    assert preflight(pinn()) == 0
    out = capsys.readouterr().out
    assert "val_loss" in out and "2, together in one stack" in out
    # An equation whose residual cannot be computed (omega = 0 divides by zero): one line, no traceback.
    config = pinn(net_config={"nodes": 8, "layers": 2, "equation": {"zeta": 0.2, "omega": 0.0}})
    assert preflight(config) == 1
    out = capsys.readouterr().out
    assert "FAIL training step: ZeroDivisionError: float division by zero" in out and "Traceback" not in out


@pytest.mark.slow
def test_the_trained_network_approaches_the_known_solution(workdir):
    config = pinn(epochs=150, group="long")
    result = run(config)
    for seed in result.seeds:
        first, last = seed.history[0]["val_mse_loss"], seed.history[-1]["val_mse_loss"]
        assert last < 2e-3 and last < first / 20, (seed.seed, first, last)  # RMS error below 0.045
    assert analyze.main(["--project", "test", "--group", "long"]) == 0
    assert (result.group_dir / "plots" / "prediction_1.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["run_template.yaml", "run_classify.yaml", "run_pinn.yaml"])
def test_every_shipped_example_analyses(workdir, name, capsys):
    data = load_yaml(ROOT / "configs" / name)
    data.update(project="test", device="cpu", seeds=data["seeds"][:2], epochs=2, group="g",
                wandb={"mode": "disabled", "tags": []})
    run(RunConfig.from_dict(data))
    assert analyze.main(["--project", "test", "--group", "g"]) == 0
    out = capsys.readouterr().out
    assert "no prediction plot" not in out
    plots = {p.name for p in (workdir / "runs" / "test" / "g" / "plots").iterdir()}
    drawn = "confusion" if name == "run_classify.yaml" else "prediction"
    assert plots == {"losses.png", *(f"{drawn}_{s}.png" for s in data["seeds"])}
    assert not math.isnan(float(out.split("validation loss ")[1].split()[0].rstrip(",")))
