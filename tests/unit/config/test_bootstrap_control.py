"""The bootstrap's ``control:`` form: exclusive with ``mesh:``/``tls:``, errors name the path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidecar.config.load import load_bootstrap
from sidecar.config.reader import ConfigError

LISTENERS = {"inbound": {"address": "127.0.0.1:0", "tls": True}, "admin": "127.0.0.1:0"}


def write(tmp_path: Path, **body: object) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump({"service": "orders", "app": "127.0.0.1:8080",
                                    "listeners": LISTENERS, **body}))
    return path


def test_control_gives_mesh_and_certificates(tmp_path: Path) -> None:
    boot = load_bootstrap(write(tmp_path, control={"addresses": ["127.0.0.1:15010", "10.0.0.2:15010"],
                                                   "token_file": "join.token"}))
    assert boot.control is not None and boot.tls is None
    assert boot.control.addresses == (("127.0.0.1", 15010), ("10.0.0.2", 15010))
    assert boot.control.token_file == tmp_path / "join.token"
    assert boot.control.state_dir == tmp_path / ".pake" / "sidecar-orders"
    assert boot.mesh_path == boot.control.state_dir / "snapshot.json"


def test_the_two_forms_are_exclusive_and_each_error_names_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, mesh="mesh.yaml", tls={"cert": "a", "key": "b", "bundle": "c"},
                 control={"addresses": ["127.0.0.1:15010", "nowhere"], "reconnect_max": "soon", "tokn": 1})
    with pytest.raises(ConfigError) as err:
        load_bootstrap(path)
    assert err.value.source == str(path)
    assert err.value.problems == [
        "mesh: cannot be combined with control: the control plane gives the mesh config and the "
        "certificates (remove one of them)",
        "tls: cannot be combined with control: the control plane gives the mesh config and the "
        "certificates (remove one of them)",
        "control.addresses[1]: must be an address like 127.0.0.1:8080, got 'nowhere'",
        "control.reconnect_max: must be a duration like 500ms or 1h30m, got 'soon'",
        "control.tokn: unknown key",
    ]


def test_neither_form_asks_for_mesh(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_bootstrap(write(tmp_path, control={"addresses": []}))
    assert err.value.problems == ["control.addresses: must name at least one control-plane address (host:port)"]
    with pytest.raises(ConfigError) as err:
        load_bootstrap(write(tmp_path))
    assert "mesh: is required" in err.value.problems
