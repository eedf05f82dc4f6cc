"""The peer registry: names, bits and pins; parse-time names; importing diffptq.peers pulls in no peer library; an
absent package is one PeerUnavailable line with the install command."""
import subprocess
import sys
from pathlib import Path

import pytest

from diffptq.errors import ConfigError, DiffptqError
from diffptq.peers import INSTALL_HINT, PEERS, PINS, PeerUnavailable, parse_peers

ROOT = Path(__file__).resolve().parents[2]
ISSUE_PEERS = {"modelopt:int8_sq": (8, 8), "modelopt:w4a8_awq": (4, 8), "modelopt:int4_awq": (4, 16),
               "modelopt:nvfp4": (4, 4), "torchao:int8da_int4w": (4, 8), "torchao:int4wo": (4, 16),
               "quanto:w4a8": (4, 8), "quanto:w4a16": (4, 16), "brevitas:gptq": (4, 8), "brevitas:qronos": (4, 8)}


def test_every_named_configuration_is_there_with_its_bits():
    for name, bits in ISSUE_PEERS.items():
        assert (PEERS[name].wbits, PEERS[name].abits) == bits, name
    assert all(name.split(":")[0] == peer.module for name, peer in PEERS.items())


def test_pins_are_those_of_requirements_peers_and_the_extra():
    lines = [line.strip() for line in (ROOT / "requirements-peers.txt").read_text().splitlines()]
    pinned = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert pinned == PINS and {p.dist for p in PEERS.values()} == set(PINS)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'peers = { file = ["requirements-peers.txt"] }' in pyproject
    assert "requirements-peers" not in (ROOT / "Makefile").read_text()  # make test needs no peer


def test_parse_peers():
    assert parse_peers("quanto:w4a8, modelopt:int8_sq,quanto:w4a8") == ["quanto:w4a8", "modelopt:int8_sq"]
    assert parse_peers("") == parse_peers("none") == []
    with pytest.raises(ConfigError, match="unknown peer torchao:int2; choose from modelopt:int8_sq, "):
        parse_peers("quanto:w4a8,torchao:int2")


def test_importing_peers_imports_no_peer_library_nor_torch():
    code = ("import sys, diffptq.peers; print(sorted(m for m in ('torch', 'modelopt', 'torchao', 'optimum', "
            "'optimum.quanto', 'brevitas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["modelopt:int8_sq", "torchao:int8da_int4w", "quanto:w4a8", "brevitas:qronos"])
def test_an_absent_package_is_one_line_with_the_install_command(monkeypatch, name):
    peer = PEERS[name]
    monkeypatch.setitem(sys.modules, peer.package, None)  # what `import` and find_spec see for an absent package
    assert not peer.available()
    with pytest.raises(PeerUnavailable) as info:
        peer.quantize(None, [], "cpu")  # before anything else: no model is touched
    message = str(info.value)
    assert isinstance(info.value, DiffptqError) and "\n" not in message
    assert f"needs the Python package {peer.package!r} ({peer.dist}=={PINS[peer.dist]})" in message
    assert message.endswith(INSTALL_HINT)
    assert "pip install 'diffptq[peers]'" in message and "pip install -r requirements-peers.txt" in message


def test_a_missing_parent_package_is_absent_too(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum", None)
    monkeypatch.delitem(sys.modules, "optimum.quanto", raising=False)  # imported by an earlier test
    assert not PEERS["quanto:w4a8"].available()
