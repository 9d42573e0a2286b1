"""Who may call what (:mod:`helios_ray.serve.auth`): the rule table, the loopback test on every form an address
arrives in, and the start-time refusal - as ``helios-ray serve`` gives it, one line, before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helios_ray.serve.auth import Access, exposure_problem, is_loopback
from helios_ray.serve.protocol import APIError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host, local", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("ipv4:127.0.0.1:51234", True), ("ipv6:%5B::1%5D:51234", True), ("ipv6:[::ffff:127.0.0.1]:9", True),
    ("unix:/tmp/x.sock", True), ("0.0.0.0", False), ("::", False), ("192.0.2.2", False),
    ("ipv4:192.0.2.2:40000", False), ("ipv6:%5Bfd00::2%5D:1", False), ("example.com", False), ("", False),
    (None, False),
])
def test_loopback_in_every_form(host, local):
    assert is_loopback(host) is local


def _status(access: Access, key: str | None, peer: str, admin: bool = False) -> int:
    try:
        access.check(key, peer, admin)
    except APIError as e:
        return e.status
    return 200


REMOTE, LOCAL = "ipv4:192.0.2.2:5000", "127.0.0.1"


def test_user_and_admin_keys():
    a = Access(user_key="u", admin_key="a")
    assert [_status(a, k, REMOTE) for k in ("u", "a", None, "x")] == [200, 200, 401, 401]
    assert [_status(a, k, REMOTE, admin=True) for k in ("a", "u", None, "x")] == [200, 403, 401, 401]
    assert _status(a, None, LOCAL, admin=True) == 401  # the loopback is no way around a configured key


def test_without_an_admin_key_operator_endpoints_answer_only_a_keyless_servers_own_host():
    assert _status(Access(user_key="u"), "u", LOCAL, admin=True) == 403  # a users' key never moves the fleet
    open_local = Access()
    assert _status(open_local, None, LOCAL, admin=True) == 200
    assert _status(open_local, None, REMOTE, admin=True) == 403
    assert _status(Access(allow_unauthenticated=True), None, REMOTE, admin=True) == 403


def test_without_a_users_key_only_this_host_unless_allowed():
    assert _status(Access(), None, LOCAL) == 200
    assert _status(Access(), None, REMOTE) == 403
    assert _status(Access(), None, None) == 403  # an unknown caller is not assumed local
    assert _status(Access(allow_unauthenticated=True), None, REMOTE) == 200
    assert Access(allow_unauthenticated=True).summary()["open_to_other_hosts"] is True
    assert Access(user_key="u", allow_unauthenticated=True).summary()["open_to_other_hosts"] is False


def test_keys_come_from_the_named_environment_variables():
    env = {"MY_KEY": "u", "MY_ADMIN": "", "OTHER": "z"}
    a = Access.from_env("MY_KEY", "MY_ADMIN", False, env)
    assert (a.user_key, a.admin_key) == ("u", None)  # empty = unset
    assert Access.from_env(None, None, True, env) == Access(None, None, True)


def test_exposure_problems():
    assert exposure_problem("127.0.0.1", Access()) is None
    assert "refusing to serve on 0.0.0.0 without an API key" in exposure_problem("0.0.0.0", Access())
    assert exposure_problem("0.0.0.0", Access(user_key="u")) is None
    assert exposure_problem("0.0.0.0", Access(allow_unauthenticated=True)) is None
    assert "equals the users' API key" in exposure_problem("127.0.0.1", Access(user_key="k", admin_key="k"))


def _exposed_file(tmp_path: Path, **args) -> Path:
    cfg = yaml.safe_load((ROOT / "deployments" / "helios.yaml").read_text())
    cfg["http_options"]["host"] = "0.0.0.0"
    cfg["applications"][0]["args"].update(args)
    path = tmp_path / "exposed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_serve_refuses_a_public_host_without_a_key_in_one_line(tmp_path, monkeypatch, capsys):
    from helios_ray.cli import main

    monkeypatch.delenv("HELIOS_API_KEY", raising=False)
    rc = main(["serve", str(_exposed_file(tmp_path))])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "refusing to serve on 0.0.0.0 without an API key" in err


def test_a_public_host_is_accepted_with_a_key_or_when_allowed(tmp_path, monkeypatch):
    from helios_ray.serve.launch import load_deploy_config

    monkeypatch.delenv("HELIOS_API_KEY", raising=False)
    load_deploy_config(_exposed_file(tmp_path, allow_unauthenticated=True))
    monkeypatch.setenv("HELIOS_API_KEY", "k")
    load_deploy_config(_exposed_file(tmp_path))
    monkeypatch.setenv("HELIOS_ADMIN_KEY", "k")
    with pytest.raises(Exception, match="admin key equals"):
        load_deploy_config(_exposed_file(tmp_path))


def test_a_browser_on_this_host_is_no_way_into_a_keyless_server():
    """A page from elsewhere can POST to 127.0.0.1 (its Origin says where it is from) and a DNS-rebinding page
    reaches 127.0.0.1 under its own name (the Host header says so): access granted for being local needs both to
    be this host.  With a key, neither matters."""
    a = Access()
    assert _status(a, None, LOCAL) == 200
    assert _status(a, None, LOCAL, admin=True) == 200
    for host, origin in (("127.0.0.1:8000", "https://evil.example"), ("evil.example:8000", None),
                         ("127.0.0.1:8000", "null")):
        try:
            a.check(None, LOCAL, admin=True, host=host, origin=origin)
            raise AssertionError((host, origin))
        except APIError as e:
            assert e.status == 403
    a.check(None, LOCAL, host="localhost:8000", origin="http://127.0.0.1:8000")  # the live page itself
    a.check(None, LOCAL, host="[::1]:8000")
    Access(user_key="u").check("u", REMOTE, host="evil.example", origin="https://evil.example")


def test_keys_are_stripped_and_unparseable_peers_are_not_local():
    assert Access.from_env("K", None, False, {"K": "secret\n"}).user_key == "secret"
    assert is_loopback("ipv6:[::1") is False
