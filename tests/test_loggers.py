"""wandb never waits for a network: offline unless a key is configured and the host answers."""
import glob
import os
import socket
import threading

import pytest

from clip_hvt import loggers


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_BASE_URL", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield monkeypatch
    import wandb
    wandb.teardown()  # wandb keeps the settings it read from the environment for the whole process


@pytest.fixture
def listening():
    """A TCP listener on loopback: the 'wandb host' that answers."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


def test_no_key_means_offline_without_touching_the_network(clean_env):
    def refuse(*args, **kwargs):
        raise AssertionError("must not probe the network without an API key")
    clean_env.setattr(socket, "create_connection", refuse)
    clean_env.setattr(socket, "getaddrinfo", refuse)
    assert loggers.should_run_offline() == (True, "no wandb API key (WANDB_API_KEY or ~/.netrc)")


def test_key_in_netrc_counts_as_a_key(clean_env, tmp_path, listening):
    (tmp_path / "netrc").write_text("machine 127.0.0.1 login user password " + "k" * 40 + "\n")
    os.chmod(tmp_path / "netrc", 0o600)
    clean_env.setenv("NETRC", str(tmp_path / "netrc"))
    clean_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening}")
    assert loggers.should_run_offline(timeout=5.0) == (False, "API key present and host reachable")


def test_key_but_refused_connection_means_offline(clean_env):
    clean_env.setenv("WANDB_API_KEY", "x" * 40)
    clean_env.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")  # closed port on loopback: refused at once
    assert loggers.should_run_offline(timeout=1.0) == (True, "https://127.0.0.1:9 not reachable within 1 s")


def test_key_and_answering_host_means_online(clean_env, listening):
    clean_env.setenv("WANDB_API_KEY", "x" * 40)
    clean_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening}")
    assert loggers.should_run_offline(timeout=5.0) == (False, "API key present and host reachable")


def test_a_hanging_name_lookup_is_not_waited_for(clean_env, listening):
    """socket timeouts do not bound DNS: a lookup that hangs must not hold the run.

    The fake lookup answers (with a host that is up) only after the decision was due, so a probe
    that waited for it would say online."""
    release = threading.Event()
    real_getaddrinfo = socket.getaddrinfo

    def slow_lookup(host, port, *args, **kwargs):
        release.wait(30)
        return real_getaddrinfo("127.0.0.1", listening, *args, **kwargs)

    clean_env.setattr(socket, "getaddrinfo", slow_lookup)
    clean_env.setenv("WANDB_API_KEY", "x" * 40)
    clean_env.setenv("WANDB_BASE_URL", "https://wandb.example.internal")
    try:
        assert loggers.should_run_offline(timeout=0.5) == (
            True, "https://wandb.example.internal not reachable within 0.5 s")
    finally:
        release.set()


def test_offline_logger_continues_the_slurm_run_id_through_wandb_itself(clean_env, tmp_path):
    clean_env.setenv("WANDB_RUN_ID", "cluster-1234")  # what slurm/launch.sh exports
    logger = loggers.WandbLogger(save_dir=str(tmp_path), project="t")  # no key: decides offline
    try:
        assert logger.experiment.id == "cluster-1234" and logger.version == "cluster-1234"
        logger.log_metrics({"loss": 1.5}, step=0)
    finally:
        logger.experiment.finish()
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*-cluster-1234" / "run-cluster-1234.wandb"))


def test_offline_decision_drops_log_model_instead_of_failing(clean_env, tmp_path, caplog):
    logger = loggers.WandbLogger(save_dir=str(tmp_path), project="t", log_model=True)
    assert "log_model=True dropped" in caplog.text
    with pytest.raises(Exception, match="log_model=True.*offline=True"):  # what Lightning does without us
        loggers._WandbLogger(save_dir=str(tmp_path), project="t", log_model=True, offline=True)
    assert logger.name == "t"


def test_a_user_set_wandb_mode_is_left_to_wandb(clean_env, tmp_path):
    clean_env.setenv("WANDB_MODE", "disabled")  # Lightning's offline=True would turn it into dryrun
    logger = loggers.WandbLogger(save_dir=str(tmp_path), project="t")
    run = logger.experiment
    try:
        assert run.disabled
    finally:
        run.finish()
    assert os.environ["WANDB_MODE"] == "disabled" and not (tmp_path / "wandb").exists()
