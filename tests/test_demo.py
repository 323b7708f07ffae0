import subprocess
import sys

import pytest


def run_demo(out, env, *args):
    return subprocess.run([sys.executable, "-m", "engine.demo", "--out", str(out), *args], capture_output=True,
                          text=True, env=env, timeout=900)


def test_small_demo_runs_end_to_end(tmp_path, cli_env):
    result = run_demo(tmp_path / "demo", cli_env, "--per-class", "40", "--queries-per-class", "3", "--epochs", "4",
                      "--bits", "24")
    assert result.returncode == 0, result.stderr
    assert "mAP@100" in result.stdout and (tmp_path / "demo" / "results.html").is_file()


@pytest.mark.slow
def test_default_demo_finds_the_right_class(tmp_path, cli_env):
    result = run_demo(tmp_path / "demo", cli_env)
    assert result.returncode == 0, result.stderr
    precision = float(result.stdout.split("precision@10 ")[1].split(",")[0])
    assert precision > 0.9
