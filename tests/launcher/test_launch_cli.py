"""``shoal run``'s command line without starting anything: the frozen flag set, knob variables,
host lists, and which commands go through the worker shim."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from shoal.core.config import env_name, flag_name, knobs
from shoal.runner import hosts, launch

pytestmark = pytest.mark.timeout(60)

# The launcher's own options. Changing this set is a CLI change: update docs/launcher.md too.
_OWN = {"--num-proc", "--hosts", "--hostfile", "--remote-command", "--master-addr", "--master-port",
        "--env", "--log-dir", "--verbose", "--elastic", "--min-np", "--max-np",
        "--host-discovery-script", "--max-restarts"}


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


def test_host_grammar_dns_ipv4_and_bracketed_ipv6():
    assert hosts.parse_hosts("node-1.example.com:2,10.0.0.2,[::1]:3,[fd00::3],shoal-42-0-n0:1") == [
        ("node-1.example.com", 2), ("10.0.0.2", 1), ("::1", 3), ("fd00::3", 1), ("shoal-42-0-n0", 1)]
    assert hosts.parse_address("[fd00::1]") == hosts.parse_address("fd00::1") == "fd00::1"
    assert hosts.format_host("fd00::1") == "[fd00::1]"


@pytest.mark.parametrize("text, words", [
    ("::1", "an IPv6 address needs brackets: [::1]"),   # once parsed as host ':'
    ("a:2:3", "more than one ':'"),                      # once parsed as host 'a:2'
    ("[::1", "[ADDRESS]:SLOTS"),
    ("[zz::q]:2", "not a valid IPv6 address"),
    ("300.1.1.1", "not a valid IPv4 address"),
    ("[::1]x", "[ADDRESS]:SLOTS"),
])
def test_bad_host_syntax_is_a_usage_error_with_a_hint(text, words):
    with pytest.raises(ValueError) as info:
        hosts.parse_hosts(text)
    assert words in str(info.value) and "HINT" in str(info.value)


def test_discovery_script_slots_for_this_host_use_the_host_grammar(tmp_path):
    from shoal.runner.elastic import discover_slots  # noqa: PLC0415

    script = tmp_path / "discover.sh"
    script.write_text("#!/bin/sh\necho '# a comment'\necho localhost:2\necho '[::1]:1'\necho elsewhere:4\n")
    script.chmod(0o755)
    assert discover_slots(str(script)) == 3  # this host's lines only
    script.write_text("#!/bin/sh\necho '-oProxyCommand=id:1'\n")
    with pytest.raises(ValueError, match="discovery script .*HINT"):
        discover_slots(str(script))


# Hostile host names: each would have become an ssh option (runs a command on this machine) or more
# words for the remote shell.
_HOSTILE = ["-oProxyCommand=touch /tmp/pwned", "-oProxyCommand=id", "a b", "a;id", "a&&id", "$(id)",
            "`id`", "a|id", "a\nid", "a'b", 'a"b', "host/../x", "--", "-"]


@pytest.mark.parametrize("name", _HOSTILE)
def test_hostile_host_names_are_refused_everywhere(name, tmp_path):
    with pytest.raises(ValueError, match="HINT"):
        hosts.parse_hosts(f"{name}:1")
    if "\n" not in name:  # in a host file a newline only starts the next line
        path = tmp_path / "hosts"
        path.write_text(f"{name} slots=1\n")
        with pytest.raises(ValueError, match="HINT"):
            hosts.parse_hostfile(str(path))
    with pytest.raises(ValueError):
        hosts.remote_argv("ssh {host}", name, ["python"])  # the last line of defence refuses too


def test_ssh_argv_ends_options_before_the_host_and_quotes_the_remote_command():
    cmd = ["/opt/my env/bin/python", "-m", "shoal.runner.launch", "--agent", "eyJhIjogMX0="]
    argv = hosts.remote_argv(hosts.DEFAULT_REMOTE_COMMAND, "node2", cmd)
    assert argv == ["ssh", "-o", "BatchMode=yes", "--", "node2", "'/opt/my env/bin/python'", "-m",
                    "shoal.runner.launch", "--agent", "eyJhIjogMX0="]
    # ssh joins the words after the host into one line for the remote shell: it gets them back intact.
    import shlex
    assert shlex.split(" ".join(argv[5:])) == cmd
    assert hosts.remote_argv("/usr/bin/ssh -p 2222 -o ProxyJump={host}-gw {host}", "fd00::3", ["x"]) == [
        "/usr/bin/ssh", "-p", "2222", "-o", "ProxyJump=fd00::3-gw", "--", "fd00::3", "x"]
    assert hosts.remote_argv("ssh -- {host}", "n", ["x"]) == ["ssh", "--", "n", "x"]  # no second --


def test_exec_style_templates_get_the_command_as_separate_words():
    cmd = ["/opt/my env/bin/python", "-m", "x"]
    assert hosts.remote_argv("ip netns exec {host}", "ns0", cmd) == ["ip", "netns", "exec", "ns0", *cmd]
    assert hosts.remote_argv("docker exec -i {host}", "c1", cmd) == ["docker", "exec", "-i", "c1", *cmd]


@pytest.mark.parametrize("template, words", [
    ("ssh {host} {0}", "only {host} is replaced, not {0}"),   # once a traceback (IndexError)
    ("ssh {user}@{host}", "only {host} is replaced, not {user}"),
    ("ssh {}", "only {host} is replaced"),
    ("ssh {host", "literal brace"),
    ("ssh", "has no {host}"),
    ("ssh '{host}", "balance the quotes"),
    ("ssh {host} -p 2222", "put ssh's options before {host}"),
    ("", "is empty"),
])
def test_bad_remote_command_templates_are_usage_errors(template, words):
    with pytest.raises(ValueError) as info:
        hosts.check_remote_command(template)
    assert words in str(info.value) and "HINT" in str(info.value)


def test_literal_braces_and_host_inside_a_word_are_fine():
    assert hosts.remote_argv("ssh -o X={{y}} me@{host}", "n1", ["x"]) == [
        "ssh", "-o", "X={y}", "--", "me@n1", "x"]


def test_parse_hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# cluster\nnode1 slots=4\nnode2:2   # two GPUs\n\nnode3\n[fd00::4] slots=2\n[fd00::5]:3\n")
    assert launch.parse_hostfile(str(path)) == [("node1", 4), ("node2", 2), ("node3", 1), ("fd00::4", 2),
                                                ("fd00::5", 3)]
    path.write_text("node1 slots=four\n")
    with pytest.raises(ValueError, match="positive integer"):
        launch.parse_hostfile(str(path))
    path.write_text("node1 slots=2 extra\n")
    with pytest.raises(ValueError, match="cannot parse"):
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
