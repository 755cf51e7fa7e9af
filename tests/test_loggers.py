"""wandb never waits for a network: offline unless a key is configured and the host answers."""
import socket

import pytest

from clip_hvt import loggers


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    return monkeypatch


def test_no_key_means_offline_without_touching_the_network(clean_env):
    def refuse(*args, **kwargs):
        raise AssertionError("must not probe the network without an API key")
    clean_env.setattr(socket, "create_connection", refuse)
    assert loggers.should_run_offline() == (True, "no wandb API key (WANDB_API_KEY or ~/.netrc)")


def test_key_but_unreachable_host_means_offline(clean_env):
    clean_env.setenv("WANDB_API_KEY", "x" * 40)
    clean_env.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")  # closed port on loopback: refused at once
    offline, why = loggers.should_run_offline(timeout=1.0)
    assert offline and "not reachable" in why


def test_key_and_reachable_host_means_online(clean_env):
    clean_env.setenv("WANDB_API_KEY", "x" * 40)
    clean_env.setattr(loggers, "_reachable", lambda url, timeout: True)
    assert loggers.should_run_offline() == (False, "API key present and host reachable")


def test_explicit_mode_wins(clean_env):
    clean_env.setenv("WANDB_MODE", "offline")
    clean_env.setenv("WANDB_API_KEY", "x" * 40)
    assert loggers.should_run_offline()[0] is True


def test_logger_takes_the_slurm_run_id_and_resumes_it(clean_env, tmp_path):
    clean_env.setenv("WANDB_RUN_ID", "cluster-1234")
    logger = loggers.WandbLogger(save_dir=str(tmp_path), project="t")
    assert logger._wandb_init["id"] == "cluster-1234" and logger._wandb_init["resume"] == "allow"
    assert logger._offline is True
