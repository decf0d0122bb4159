"""`kvrt serve --replicas / --ray-address / --router`: flags reach the config; bad values are a
one-line error (exit 2) before anything starts; without Ray installed, the error says how to
install it."""

from __future__ import annotations

import sys

import pytest

from kvrt.runtime.cli import build_parser, main, serve_config
from kvrt.runtime.config import ConfigError, ServeConfig
from kvrt.runtime.replicas.ray_cluster import import_ray, uses_ray


def test_replica_flags_reach_the_config() -> None:
    args = build_parser().parse_args(["serve", "--replicas", "4", "--ray-address", "auto",
                                      "--router", "prefix"])
    config = serve_config(args)
    assert (config.replicas, config.ray_address, config.router) == (4, "auto", "prefix")
    assert uses_ray(config)


def test_one_replica_without_a_cluster_is_the_in_process_engine() -> None:
    assert not uses_ray(ServeConfig())
    assert not uses_ray(ServeConfig(replicas=1))
    assert uses_ray(ServeConfig(replicas=2))
    assert uses_ray(ServeConfig(replicas=1, ray_address="auto"))  # one replica on a cluster


@pytest.mark.parametrize(("argv", "words"), [
    (["serve", "--replicas", "0"], "replicas must be at least 1, got 0"),
    (["serve", "--replicas", "-2"], "replicas must be at least 1, got -2"),
    (["serve", "--replicas", "two"], "--replicas"),
    (["serve", "--router", "random"], "--router"),
    (["serve", "--ray-address", " "], "ray_address is empty"),
])
def test_bad_replica_flags_exit_2_with_one_line(argv, words, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and words in err, err


def test_without_ray_the_error_says_how_to_install_it(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'kvrt\[ray\]'"):
        import_ray()
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--replicas", "2", "--model", "/nonexistent"])
    assert exited.value.code == 2
    assert "pip install 'kvrt[ray]'" in capsys.readouterr().err
