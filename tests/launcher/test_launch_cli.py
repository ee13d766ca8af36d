"""``shoal run``'s command line without starting anything: the frozen flag set, knob variables,
host lists, and which commands go through the worker shim."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from shoal.core.config import env_name, flag_name, knobs
from shoal.runner import launch

pytestmark = pytest.mark.timeout(60)

# The launcher's own options. Changing this set is a CLI change: update docs/launcher.md too.
_OWN = {"--num-proc", "--hosts", "--hostfile", "--remote-command", "--master-addr", "--master-port",
        "--start-timeout-s", "--env", "--log-dir", "--verbose"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal run")
    launch.add_arguments(parser)
    return parser


def _long_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def test_cli_is_frozen_knobs_plus_launcher_options():
    bool_knobs = [f for f in knobs() if launch._knob_base_type(f) is bool]
    expected = ({flag_name(f.name) for f in knobs()}
                | {"--no-" + flag_name(f.name)[2:] for f in bool_knobs}
                | _OWN | {"--help"})
    assert launch.launcher_options() == _OWN
    assert _long_flags(_parser()) == expected
    shorts = {s for a in _parser()._actions for s in a.option_strings if not s.startswith("--")}
    assert shorts == {"-h", "-np", "-H", "-x"}
    # One name per knob: no launcher option may shadow a knob's flag.
    assert not _OWN & {flag_name(f.name) for f in knobs()}


def test_short_options_and_no_abbreviations():
    args = _parser().parse_args(["-np", "3", "-H", "a:2,b:1", "-x", "A=1", "python", "t.py"])
    assert (args.num_proc, args.hosts, args.env, args.program) == (3, "a:2,b:1", ["A=1"], ["python", "t.py"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["-np", "2", "--hier", "on", "python", "t.py"])  # no prefix matching


def test_command_options_stay_with_the_command():
    args = _parser().parse_args(["-np", "2", "python", "train.py", "-np", "9", "--autotune"])
    assert args.program == ["python", "train.py", "-np", "9", "--autotune"]
    assert args.num_proc == 2 and args.autotune is None


def test_knob_environment_only_for_given_flags():
    args = _parser().parse_args(["-np", "2", "--no-autotune", "--num-streams", "3", "--compression",
                                 "fp16", "--timeout-s", "30", "python", "t.py"])
    assert launch.knob_environment(args) == {
        "SHOAL_AUTOTUNE": "false", "SHOAL_NUM_STREAMS": "3", "SHOAL_COMPRESSION": "fp16",
        "SHOAL_TIMEOUT_S": "30.0"}
    assert launch.knob_environment(_parser().parse_args(["-np", "1", "python"])) == {}
    assert env_name("num_streams") == "SHOAL_NUM_STREAMS"


def test_knob_range_errors_name_the_knob():
    args = _parser().parse_args(["-np", "2", "--first-bucket-mb", "-1", "python", "t.py"])
    with pytest.raises(ValueError, match="first_bucket_mb must be > 0"):
        launch.knob_environment(args)


def test_parse_hosts_and_place_ranks():
    assert launch.parse_hosts("a:2, b:2,c") == [("a", 2), ("b", 2), ("c", 1)]
    assert launch.place_ranks([("a", 2), ("b", 2)], 3) == [("a", 2), ("b", 1)]
    assert launch.place_ranks([("a", 2), ("b", 2)], 2) == [("a", 2)]
    for bad, words in [("a:x", "positive integer"), ("a:1,a:2", "listed twice"), (",", "no usable host")]:
        with pytest.raises(ValueError, match=words):
            launch.parse_hosts(bad)
    with pytest.raises(ValueError, match="-np 5 but the hosts have 4 slots"):
        launch.place_ranks([("a", 2), ("b", 2)], 5)


def test_parse_hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# cluster\nnode1 slots=4\nnode2:2   # two GPUs\n\nnode3\n")
    assert launch.parse_hostfile(str(path)) == [("node1", 4), ("node2", 2), ("node3", 1)]
    path.write_text("node1 slots=four\n")
    with pytest.raises(ValueError, match="positive integer"):
        launch.parse_hostfile(str(path))


def test_python_commands_of_this_environment_run_through_the_shim():
    py = sys.executable
    shim = ["-u", "-m", "shoal.runner.launch", "--worker"]
    assert launch._worker_argv([py, "train.py", "--lr", "1"]) == [py, *shim, "train.py", "--lr", "1"]
    assert launch._worker_argv([py, "-O", "-X", "dev", "-c", "pass"]) == \
        [py, "-O", "-X", "dev", *shim, "-c", "pass"]
    assert launch._worker_argv([py, "-m", "pkg.mod", "a"]) == [py, *shim, "-m", "pkg.mod", "a"]
    # Options we cannot keep (-S drops site-packages) or do not know: the command runs unchanged.
    assert launch._worker_argv([py, "-S", "t.py"]) == [py, "-S", "t.py"]
    sh = launch._worker_argv(["sh", "-c", "true"])
    assert sh[1:] == ["-c", "true"] and sh[0].endswith("/sh")


def test_plan_survives_a_remote_command_line():
    plan = launch._AgentPlan(command=["python", "-c", "print('a b' \"c\")"], nproc=2, host="h",
                             env={"SHOAL_AUTOTUNE": "false", "X": "$HOME; rm -rf /"})
    token = launch._encode_plan(plan)
    assert token.replace("-", "").replace("_", "").replace("=", "").isalnum()  # nothing a shell parses
    assert launch._decode_plan(token) == plan


def test_importing_the_launcher_imports_no_torch():
    code = "import sys, shoal.runner.launch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_help_renders_every_knob():
    """`shoal run --help` formats every generated knob's help (argparse %-formats help strings)."""
    import contextlib
    import io

    import pytest

    from shoal.runner.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    assert "--fusion-threshold-mb" in out.getvalue()
