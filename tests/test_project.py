"""The MLflow Project's interface: every declared parameter reaches the command, environments agree."""

import re
import subprocess
import sys

import pytest
import yaml
from conftest import PROJECT


def mlproject() -> dict:
    return yaml.safe_load((PROJECT / "MLproject").read_text())


def requirement_pins(lines) -> set[str]:
    return {line.strip() for line in lines if line.strip() and not line.strip().startswith(("#", "-r"))}


def test_conda_env_and_requirements_agree():
    conda = yaml.safe_load((PROJECT / "conda.yaml").read_text())
    assert mlproject()["conda_env"] == "conda.yaml"
    pip_section = next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict))
    assert requirement_pins(pip_section) == requirement_pins((PROJECT / "requirements.txt").read_text().splitlines())
    python = next(item for item in conda["dependencies"] if isinstance(item, str) and item.startswith("python="))
    assert sys.version.startswith(python.split("=")[1])


@pytest.mark.parametrize("entry_point", sorted(mlproject()["entry_points"]))
def test_every_parameter_reaches_the_command_and_the_cli_knows_it(entry_point):
    spec = mlproject()["entry_points"][entry_point]
    command = spec["command"]
    used = set(re.findall(r"\{(\w+)\}", command))
    declared = set(spec.get("parameters", {}))
    assert used == declared, (
        f"{entry_point}: declared but unused {declared - used}, used but undeclared {used - declared}"
    )
    for name in declared:
        flag = "--" + name.replace("_", "-")
        assert f"{flag} {{{name}}}" in command, f"{entry_point}: {name} must be passed as {flag}"
    assert command.startswith(f"python -m study {entry_point}")
    help_text = subprocess.run(
        [sys.executable, "-m", "study", entry_point, "--help"], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout
    for name in declared:
        assert "--" + name.replace("_", "-") in help_text


def test_main_entry_point_has_the_issue_parameters_and_defaults():
    parameters = mlproject()["entry_points"]["main"]["parameters"]
    expected = {"epochs": ("int", 20), "batch_size": ("int", 32), "learning_rate": ("float", 0.001), "seed": ("int", 0)}
    for name, (kind, default) in expected.items():
        assert parameters[name]["type"] == kind and parameters[name]["default"] == default
    assert parameters["data"] == {"type": "string", "default": "auto"}
    train = mlproject()["entry_points"]["train"]["parameters"]
    assert {"activation", "loss", "epochs", "batch_size", "learning_rate", "seed", "data"} <= set(train)


def test_study_package_never_imports_mlflow():
    offenders = [
        path.name
        for path in (PROJECT / "study").glob("*.py")
        if re.search(r"^\s*(import|from) mlflow", path.read_text(), re.M)
    ]
    assert offenders == []
