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


def test_demo_table_formatting():
    from collab_ray.demo import DemoRow, format_table

    table = format_table([DemoRow("spec", "speculative", "What is the capital of France?", "Paris. " * 30, 12, 20.5, "a:1")])
    assert "speculative" in table and "…" in table and "20.5" in table
