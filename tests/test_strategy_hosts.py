"""The multi-worker exposure check: which TF_CONFIG hosts are public."""

from __future__ import annotations

import json

import pytest

from medseg.training.strategy import _multiworker, public_hosts


def spec(*hosts):
    return {"cluster": {"worker": list(hosts)}, "task": {"type": "worker", "index": 0}}


def test_loopback_and_private_hosts_are_not_public():
    hosts = ["127.0.0.1:2222", "localhost:2223", "10.1.2.3:2222", "192.168.0.7:2222",
             "172.16.5.4:2222", "[::1]:2222", "[fd00::5]:2222"]
    assert public_hosts(spec(*hosts)) == []


def test_public_and_unresolvable_hosts_are_listed():
    hosts = ["8.8.8.8:2222", "10.0.0.1:2222", "no-such-host.invalid:2222"]
    assert public_hosts(spec(*hosts)) == ["8.8.8.8:2222", "no-such-host.invalid:2222"]


def test_multiworker_warns_about_public_workers(monkeypatch):
    # one worker only: the strategy is refused after the warning, so TF never starts one
    monkeypatch.setenv("TF_CONFIG", json.dumps(spec("8.8.8.8:2222")))
    with pytest.warns(RuntimeWarning, match=r"8\.8\.8\.8:2222.*unauthenticated"):
        with pytest.raises(ValueError, match="needs TF_CONFIG listing"):
            _multiworker()
