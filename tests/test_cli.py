"""The ``zmx`` command line, as a user runs it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

import zmx
from zmx import cli
from zmx.cli import builtin_topology_path, main
from zmx.exceptions import TopologyError
from zmx.node import runtime
from zmx.node.runtime import read_topology_text
from zmx.topology import GatewayLimits

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "topology" / "local.yaml"
SHARDED = REPO / "topology" / "sharded.yaml"

BAD = """\
cluster: local
symbols:
  BTC-USDT: {matcher: m1, tick_size: "0.01", lot_size: "0.00001"}
nodes:
  m1: {role: matcher, pub: "tcp://127.0.0.1:5560", snapshot: "tcp://127.0.0.1:5561", data_dir: "var/m1"}
  m3: {role: matchr}
"""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_check_shows_nodes_and_symbols(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check", str(LOCAL)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "cluster 'local' is valid" in out
    for text in ("r1", "m1", "m2", "g1", "router", "matcher", "gateway",
                 "tcp://127.0.0.1:5550", "tcp://127.0.0.1:5560", "ws://127.0.0.1:8765",
                 "BTC-USDT", "ETH-USDT", "0.00001"):
        assert text in out, text
    assert "all the defaults" in out and "*" not in out  # the gateway limits: local.yaml sets none


def test_check_sharded_shows_relay_and_upstream(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check", str(SHARDED)])
    assert result.exit_code == 0, result.output
    assert "relay" in result.output
    assert "upstream x1" in result.output and "standby x2" in result.output
    assert "upstream m1, m2, m3, m4" in result.output
    assert "DOGE-USDT" in result.output


def test_check_shows_every_gateways_limits_and_which_are_not_the_default(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check", str(SHARDED)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│ ")]
    rows = {row[0]: row[1:] for row in cells if "_" in row[0]}  # the limits table's: limit, g1, g2
    assert set(rows) == {f.name for f in dataclasses.fields(GatewayLimits)}, rows
    # sharded.yaml sets g2's max_message_bytes: 16384 and rate_limit_per_s: 200
    assert rows["max_message_bytes"] == ["64 KiB", "16 KiB *"]
    assert rows["rate_limit_per_s"] == ["100/s", "200/s *"]
    assert rows["heartbeat_s"] == ["5 s", "5 s"]


def test_check_bad_topology_exits_2_with_the_line(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD, encoding="utf-8")
    result = runner.invoke(main, ["check", str(path)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (f"Error: {path}:6: node 'm3': unknown role 'matchr' "
                             "(expected one of: gateway, matcher, relay, router)\n")
    assert "Traceback" not in result.output


def test_check_warns_of_a_matcher_that_owns_no_symbol(runner: CliRunner, tmp_path: Path) -> None:
    """Valid (a spare matcher), but more often a slip: both symbols of m2 given to m1."""
    path = tmp_path / "idle.yaml"
    path.write_text(LOCAL.read_text(encoding="utf-8").replace("matcher: m2", "matcher: m1"), encoding="utf-8")
    result = runner.invoke(main, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ("warning: matcher 'm2' owns no symbol and would run idle (a symbol names its owner "
                             "with `matcher: m2`)\n")
    assert runner.invoke(main, ["check", str(LOCAL)]).stderr == ""


def test_check_missing_file_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["check", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml: cannot read the topology" in result.stderr


def test_check_and_dry_run_show_values_as_written(runner: CliRunner, tmp_path: Path) -> None:
    """Values went through rich's markup: "var/[red]m1[/red]" was shown as var/m1, another
    directory than the one used, and "[/x]" stopped zmx check with a traceback."""
    path = tmp_path / "[red]odd.yaml"
    path.write_text(LOCAL.read_text(encoding="utf-8").replace('"var/m1"', '"var/[red]m1[/red]"')
                    .replace('"var/m2"', '"var/[/x]m2"'), encoding="utf-8")
    for args in (["check", str(path)], ["up", str(path), "--dry-run"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "var/[red]m1[/red]" in result.stdout and "var/[/x]m2" in result.stdout, result.stdout
        assert "[red]odd.yaml" in result.stdout


def test_a_topology_fifo_waits_for_a_late_writer_and_not_for_ever(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """(zmx check, up, node and probe waited for ever on a FIFO nobody wrote to; the first fix
    read one whose writer came late as empty.)"""
    fifo = tmp_path / "topology.yaml"
    os.mkfifo(fifo)
    monkeypatch.setattr(runtime, "FIFO_WAIT_S", 0.3)
    with pytest.raises(TopologyError, match="topology.yaml: a FIFO that nobody wrote to in 0.3 s"):
        read_topology_text(fifo)
    monkeypatch.setattr(runtime, "FIFO_WAIT_S", 30.0)
    got: dict[str, str] = {}
    reader = threading.Thread(target=lambda: got.update(text=read_topology_text(fifo)))
    reader.start()
    with open(fifo, "w", encoding="utf-8") as writer:  # (this open waits for the reader's)
        writer.write("cluster: late\n")
    reader.join(30)
    assert got == {"text": "cluster: late\n"}


def test_check_needs_a_topology(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check"])
    assert result.exit_code == 2
    assert "Missing argument 'TOPOLOGY'" in result.stderr


def test_builtin_topology_is_the_shipped_local_yaml() -> None:
    assert builtin_topology_path() == LOCAL.resolve()
    assert builtin_topology_path().is_file()


def test_up_dry_run_without_argument_shows_the_builtin_topology(runner: CliRunner) -> None:
    """``--dry-run`` starts nothing; ``zmx up`` for real is tests/test_up.py."""
    result = runner.invoke(main, ["up", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "cluster 'local'" in result.output
    assert ("clients connect to ws://127.0.0.1:8765 (gateway g1); a browser opens http://127.0.0.1:8765/"
            in result.output)
    assert "would start" in result.output
    for name in ("r1", "m1", "m2"):
        assert name in result.output
    assert "BTC-USDT" in result.output


def test_up_dry_run_with_a_topology_lists_every_gateway(runner: CliRunner) -> None:
    result = runner.invoke(main, ["up", "--dry-run", str(SHARDED)])
    assert result.exit_code == 0, result.output
    assert "clients connect to ws://127.0.0.1:5780 (gateway g1)" in result.output
    assert "clients connect to ws://127.0.0.1:5781 (gateway g2)" in result.output


def test_up_with_a_bad_topology_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD, encoding="utf-8")
    result = runner.invoke(main, ["up", str(path)])
    assert result.exit_code == 2
    assert f"{path}:6: node 'm3': unknown role 'matchr'" in result.stderr


def test_up_without_the_builtin_topology_says_so(runner: CliRunner, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "topology" / "local.yaml"
    monkeypatch.setattr(cli, "builtin_topology_path", lambda: missing)
    result = runner.invoke(main, ["up"])
    assert result.exit_code == 2
    assert f"the built-in topology {missing} is missing" in result.stderr
    assert "zmx up TOPOLOGY" in result.stderr


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert zmx.__version__ in result.output


def test_real_process_checks_a_topology(tmp_path: Path) -> None:
    """``python -m zmx.cli`` in a child process: the entry point works outside the test runner."""
    good = subprocess.run([sys.executable, "-m", "zmx.cli", "check", str(LOCAL)],
                          check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert "BTC-USDT" in good.stdout and "m1" in good.stdout
    path = tmp_path / "bad.yaml"
    path.write_text(BAD, encoding="utf-8")
    bad = subprocess.run([sys.executable, "-m", "zmx.cli", "check", "bad.yaml"],
                         check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("Error: bad.yaml:6: node 'm3': unknown role 'matchr'"), bad.stderr
    assert "Traceback" not in bad.stderr
