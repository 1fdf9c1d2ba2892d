from __future__ import annotations

from pathlib import Path

import pytest

from intertie_gateway.cli import _parser, config_from_args, main
from intertie_gateway.config import ConfigError, GatewayConfig, load_toml, parse_labels, parse_resources


def test_defaults_work_on_a_laptop() -> None:
    config = GatewayConfig()
    assert config.ray == "local"
    assert config.max_payload_bytes == 100 * 1024 * 1024
    assert config.fsync is False
    assert config.object_store_memory is None and config.embedded_object_store_bytes < 1024 ** 3
    assert config.compute_id == "urn:intertie:site:local:local"


@pytest.mark.parametrize("key,value,match", [
    ("listen", "nohost", "listen"),
    ("listen", "h:99999", "listen"),
    ("site_id", "bad id!", "site_id"),
    ("num_cpus", -1, "num_cpus"),
    ("num_cpus", "many", "num_cpus"),
    ("resources", {"x": -2}, "resources.x"),
    ("max_payload_bytes", 0, "max_payload_bytes"),
    ("max_payload_bytes", 2 * 1024 ** 3, "max_payload_bytes"),
    ("admission_overcommit", 0.5, "admission_overcommit"),
    ("fsync", "yes", "fsync"),
    ("labels", {"a": 1}, "labels"),
    ("ray", "10.0.0.5", "ray: expected 'local' or the cluster head's HOST:PORT"),
    ("ray", "ray://10.0.0.5:10001", "Ray Client address"),
    ("ray", "10.0.0.5:99999", "ray: expected"),
    ("ray_connect_timeout_s", 0, "ray_connect_timeout_s"),
    ("ray_token_file", "/some/token", "ray_token_file .* is for attaching"),
])
def test_bad_values_name_the_key(key: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GatewayConfig.build({key: value})


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown configuration key 'colour'"):
        GatewayConfig.build({"colour": "blue"})


def test_toml_then_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('site_id = "from-file"\nnum_cpus = 4\nfsync = true\n[gateway]\nregion = "eu-west"\n'
                    '[labels]\nprice = "0.02"\n')
    args = _parser().parse_args(["run", "--config", str(path), "--num-cpus", "2", "--label", "carbon=low",
                                 "--resources", '{"bigmem": 2}'])
    config = config_from_args(args)
    assert config.site_id == "from-file"
    assert config.num_cpus == 2  # flag beats file
    assert config.fsync is True
    assert config.region == "eu-west"
    assert config.labels == {"carbon": "low"}  # --label replaces the file's labels
    assert config.resources == {"bigmem": 2.0}
    assert config.compute_id == "urn:intertie:site:eu-west:from-file"


def test_toml_errors_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("site_id = \n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_flag_parsers() -> None:
    assert parse_resources('{"a": 1}') == {"a": 1}
    with pytest.raises(ConfigError, match="JSON"):
        parse_resources("{a")
    with pytest.raises(ConfigError, match="object"):
        parse_resources("[1]")
    assert parse_labels(["a=b", "c=d=e"]) == {"a": "b", "c": "d=e"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_labels(["novalue"])


@pytest.mark.parametrize("flags,named", [
    (["--num-cpus", "2"], "num_cpus (--num-cpus) is"),
    (["--object-store-memory", "1GiB", "--resources", '{"a": 1}'], "resources (--resources), object_store_memory"),
])
def test_embedded_ray_settings_are_refused_when_attaching(flags: list[str], named: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Flags of the embedded Ray would be silently ignored by an attached cluster (its nodes
    declare their own resources): refused, in one line naming them and what to do."""
    assert main(["run", "--ray", "10.0.0.5:6379", *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "ray start --num-cpus=N" in err and len(err.strip().splitlines()) == 1
    config = config_from_args(_parser().parse_args(["run", "--ray", "local", *flags]))
    assert config.ray == "local"  # the same flags are fine for the embedded Ray


def test_attaching_settings_from_flags_and_toml(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('ray = "10.0.0.5:6379"\nray_token_file = "/etc/intertie/ray-token"\n')
    args = _parser().parse_args(["run", "--config", str(path), "--ray-connect-timeout", "4"])
    config = config_from_args(args)
    assert (config.ray, config.ray_token_file, config.ray_connect_timeout_s) == \
        ("10.0.0.5:6379", "/etc/intertie/ray-token", 4.0)


def test_version_and_byte_sizes_with_units(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("intertie-gateway ") and "Ray 2." in out
    config = config_from_args(_parser().parse_args(["run", "--object-store-memory", "512MiB",
                                                    "--max-payload-bytes", "1e6"]))
    assert (config.object_store_memory, config.max_payload_bytes) == (512 << 20, 1_000_000)


def test_tls_settings_go_together_and_name_what_is_missing(tmp_path: Path) -> None:
    pem = tmp_path / "site.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    for values, match in (
            ({"tls_cert": str(pem)}, "tls_cert and tls_key .* go together"),
            ({"tls_cert": str(pem), "tls_key": str(tmp_path / "missing.key")}, "tls_key: no file"),
            ({"tls_ca": str(pem)}, "tls_ca .* needs tls_cert and tls_key"),
            ({"peer_listen": "127.0.0.1:7071"}, "peer_listen .* needs the federation CA"),
            ({"tls_cert": str(pem), "tls_key": str(pem), "tls_ca": str(pem), "peer_listen": "nohost"},
             "peer_listen: expected HOST:PORT"),
            ({"auth": "token", "peers": ("127.0.0.1:7072",)}, "peers authenticate by mutual TLS"),
            ({"auth": "token", "peers": ("127.0.0.1:7072",), "tls_cert": str(pem), "tls_key": str(pem),
              "tls_ca": str(pem)}, "--peer-listen")):
        with pytest.raises(ConfigError, match=match):
            GatewayConfig.build(values)
    config = GatewayConfig.build({"auth": "token", "peers": ("127.0.0.1:7072",), "tls_cert": str(pem),
                                  "tls_key": str(pem), "tls_ca": str(pem), "peer_listen": "127.0.0.1:7071"})
    assert config.peers_by_certificate
    assert not GatewayConfig.build({"auth": "none", "peers": ("127.0.0.1:7072",)}).peers_by_certificate
