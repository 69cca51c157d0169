"""The `collab-ray` command line."""

import subprocess
import sys

import pytest

from collab_ray.cli import main


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma3-270m" in out and "tiny:llama-sp" in out


def test_models_pull_unknown_name_is_refused_before_installing(capsys):
    assert main(["models", "pull", "smollm2-135m-instruct", "llama-9000"]) == 2
    assert "llama-9000" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "collab_ray.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "models" in out.stdout


@pytest.mark.real
def test_demo_on_smollm2(capsys, smollm2):
    from collab_ray import demo

    table = demo.main(["smollm2-135m-instruct"], max_tokens=12)
    assert "Paris" in table
    assert table.count("smollm2-135m-instruct") == len(demo.QUESTIONS)
