"""The tutorial's own code runs as it is written. The snippets below are copied verbatim from
the design's chapter on model.py ("Chapter 4: Model Definition"), which teaches
`run_config.create_model()`; only the surrounding test code is ours."""
import textwrap

import pytest
import torch
import yaml

from config import RunConfig, load_yaml
from conftest import ROOT, write_yaml
from engine.reproducibility import set_seed
from engine.run import run

TUTORIAL_YAML = """
# configs/run_template.yaml (Relevant parts)
# ... other settings ...

# Which model blueprint to use?
# Format: 'filename_without_py.ClassName'
net: model.MLP

# Specific details for the chosen blueprint (MLP)
net_config:
  nodes: 64      # How many neurons in the hidden layers
  layers: 4      # How many hidden layers

# ... other settings ...
"""

TUTORIAL_MODEL = '''
# model.py (Simplified MLP Class)
from torch import nn

# All PyTorch models should inherit from nn.Module
class MLP(nn.Module):
    # The __init__ method sets up the layers
    def __init__(self, hparams, device="cpu"):
        super(MLP, self).__init__() # Important initialization
        self.hparams = hparams # Store config like nodes, layers
        self.device = device

        # Get parameters from the config dictionary (hparams)
        nodes = hparams["nodes"]
        layers = hparams["layers"]
        input_size = 1 # Assuming 1 input feature for simplicity
        output_size = 1 # Assuming 1 output value

        # Build a list of layers
        net_layers = [
            nn.Linear(input_size, nodes), # Input layer
            nn.GELU()                     # Activation function
        ]
        # Add the hidden layers
        for _ in range(layers - 1):
            net_layers.append(nn.Linear(nodes, nodes)) # Hidden layer
            net_layers.append(nn.GELU())                # Activation
        # Add the final output layer
        net_layers.append(nn.Linear(nodes, output_size))

        # nn.Sequential bundles layers together in order
        self.net = nn.Sequential(*net_layers)

    # The forward method defines how data flows through the layers
    def forward(self, x):
        # Just pass the input 'x' through the sequential network
        return self.net(x)
'''

# From "Instantiation": the body of the tutorial's conceptual run(); its signature
# (`def run(run_config: RunConfig, dl_train, dl_val, ...):`) is not Python, so it is left out.
TUTORIAL_RUN = '''
    # Use RunConfig to create the model instance based on YAML settings
    print(f"Creating model: {run_config.net} with config: {run_config.net_config}")
    model = run_config.create_model().to(run_config.device)

    print("Model created successfully:", model) # Shows the structure
'''

TUTORIAL_CREATE_MODEL = '''
# config.py (Inside RunConfig class)
import importlib # Library for dynamic imports

# ... other methods ...

def create_model(self):
    # Split "model.MLP" into module="model" and class="MLP"
    module_name, class_name = self.net.rsplit(".", 1)

    # Dynamically load the module (equivalent to 'import model')
    module = importlib.import_module(module_name)

    # Get the class definition from the loaded module
    # (equivalent to 'ModelClass = model.MLP')
    model_class = getattr(module, class_name)

    # Create an instance of the class, passing config and device
    # (equivalent to 'MLP(self.net_config, device=self.device)')
    return model_class(self.net_config, device=self.device)
'''


def shipped_with(snippet: str) -> dict:
    """The shipped run config with the tutorial's keys put in."""
    config = load_yaml(ROOT / "configs" / "run_template.yaml")
    config.update(yaml.safe_load(snippet))
    return config


def test_the_tutorials_yaml_and_run_code(capsys):
    run_config = RunConfig.from_dict(shipped_with(TUTORIAL_YAML))
    namespace = {"run_config": run_config}
    exec(textwrap.dedent(TUTORIAL_RUN), namespace)
    model = namespace["model"]
    out = capsys.readouterr().out
    assert "Creating model: model.MLP with config: {'nodes': 64, 'layers': 4}" in out
    assert "Model created successfully: MLP(" in out
    assert run_config.device in ("cpu", "cuda") and run_config.to_dict()["device"] == "auto"
    assert all(p.device.type == torch.device(run_config.device).type for p in model.parameters())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert ([(m.in_features, m.out_features) for m in linears]
            == [(1, 64), (64, 64), (64, 64), (64, 64), (64, 1)])


def test_the_tutorials_create_model_builds_what_ours_builds(tiny):
    run_config = RunConfig.from_dict({**tiny, "device": "auto"})
    namespace = {}
    exec(TUTORIAL_CREATE_MODEL, namespace)
    set_seed(0)
    theirs = namespace["create_model"](run_config).to(run_config.device)
    set_seed(0)
    ours = run_config.create_model()
    assert type(theirs) is type(ours)
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()))


def test_the_tutorials_model_trains_as_written(workdir, monkeypatch, tiny):
    (workdir / "tutorial_model.py").write_text(TUTORIAL_MODEL)
    monkeypatch.syspath_prepend(str(workdir))
    config = RunConfig.from_dict({**tiny, "net": "tutorial_model.MLP",
                                  "net_config": {"nodes": 8, "layers": 2}})
    result = run(config)
    (seed,) = result.seeds
    assert seed.status == "completed" and seed.epochs_run == tiny["epochs"]
    assert (result.group_dir / "7" / "model.pt").exists()


@pytest.mark.parametrize("written", ["auto", "cpu"])
def test_device_is_ready_for_to_and_the_file_keeps_what_was_written(workdir, tiny, written):
    config = RunConfig.from_dict({**tiny, "device": written})
    torch.zeros(1).to(config.device)  # `auto` is not a device; what .to() gets must be one
    assert config.device == ("cuda" if written == "auto" and torch.cuda.is_available() else "cpu")
    saved = workdir / "saved.yaml"
    config.to_yaml(saved)
    assert load_yaml(saved)["device"] == written
    assert RunConfig.from_yaml(saved) == config
    other = "cpu" if written == "auto" else "auto"
    assert RunConfig.from_dict({**tiny, "device": other}) != config  # what was written is compared too
    again = RunConfig.from_yaml(write_yaml(workdir / "again.yaml", config.to_dict()))
    assert again.to_dict()["device"] == written and again.config_hash() == config.config_hash()


def test_the_readmes_notebook_code_runs_as_written(monkeypatch, capsys):
    """The README's "In a notebook" block, run from the repository root as it says."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## In a notebook", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(ROOT)
    had_runs = (ROOT / "runs").exists()
    namespace = {}
    exec(code.replace("epochs=20", "epochs=2"), namespace)  # the same code, shorter
    result = namespace["result"]
    assert result.status == "completed" and len(result.history) == 2
    assert (ROOT / "runs").exists() == had_runs  # the Trainer alone writes no run folder


def test_the_readmes_load_run_example_runs_as_written(workdir, tiny, capsys):
    """The README's load_run/load_study block, on a real tiny run and study of its own."""
    from config import OptimizeConfig
    from engine.search import run_study
    section = (ROOT / "README.md").read_text().split("## In a notebook", 1)[1]
    code = section.split("```python\nfrom analyze import", 1)[1].split("```", 1)[0]
    tiny.update(seeds=[3, 4], epochs=2)
    group_dir = run(RunConfig.from_dict(tiny)).group_dir
    opt = OptimizeConfig.from_dict({"trials": 1, "seed": 0, "study_name": "my_study", "pruner": None,
                                    "search_space": {"net_config": {"nodes": {"type": "categorical",
                                                                              "choices": [4, 8]}}}})
    study = run_study(RunConfig.from_dict(tiny), opt)
    capsys.readouterr()
    namespace = {}
    exec("from analyze import" + code.replace("runs/pytorch_template/MLP_0123456789",
                                              f"runs/test/{group_dir.name}"), namespace)
    assert namespace["seed"] == 3 and len(namespace["curve"]) == 2
    assert isinstance(namespace["model"], torch.nn.Module) and not namespace["model"].training
    assert capsys.readouterr().out == (f"seed 3: {namespace['best']:.4g} after 2 epochs; "
                                       f"best trial {study.best_trial.params}\n")
