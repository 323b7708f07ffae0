import subprocess
import sys

import pytest

from engine.demo import MARKER, build_parser, prepare_folder
from engine.errors import InputError as UserError


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


def test_demo_replaces_only_a_folder_it_made(tmp_path, cli_env):
    """`--out` named a folder that the demo deleted with everything in it (issue 35)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    result = run_demo(photos, cli_env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "did not make" in result.stderr
    assert (photos / "holiday.jpg").read_bytes() == b"precious"
    with pytest.raises(UserError, match="is a file"):
        prepare_folder(photos / "holiday.jpg")
    earlier = tmp_path / "demo"
    prepare_folder(earlier)  # new: made and marked
    (earlier / "model").mkdir()
    prepare_folder(earlier)  # the demo's own folder is replaced
    assert sorted(p.name for p in earlier.iterdir()) == [MARKER]
    (tmp_path / "empty").mkdir()
    prepare_folder(tmp_path / "empty")
    assert (tmp_path / "empty" / MARKER).is_file()


def test_every_demo_option_is_described_with_examples():
    parser = build_parser()
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    assert "examples:" in parser.epilog and "--per-class" in parser.epilog
