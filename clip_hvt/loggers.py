"""Lightning's ``WandbLogger`` that decides offline mode by itself, so a run never hangs on a login.

wandb in online mode without network blocks at ``wandb.init``; Lightning's logger only takes a
fixed ``offline`` flag. Here ``offline=None`` (the default) means: online only when an API key is
configured and the wandb host answers within a couple of seconds (name lookup included); otherwise
offline (sync later with ``wandb sync``). The host is never probed without a key.

Everything else is Lightning's and wandb's own: ``wandb.init`` reads ``WANDB_RUN_ID`` (which
``slurm/launch.sh`` exports per job) and Lightning passes ``resume="allow"``, so a requeued job
continues its run.
"""
from __future__ import annotations

import logging
import netrc
import os
import socket
import threading
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _WandbLogger

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:  # where wandb looks: $NETRC, else ~/.netrc
        return netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(_base_url()).hostname) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _reachable(url: str, timeout: float) -> bool:
    """A TCP connection to the host within ``timeout``; the name lookup, which socket timeouts do
    not bound, runs in a daemon thread that is left behind if it takes longer."""
    parsed = urlparse(url)
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    answered = threading.Event()

    def probe():
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                answered.set()
        except OSError:
            pass

    threading.Thread(target=probe, daemon=True, name="wandb-reachability").start()
    return answered.wait(timeout)


def should_run_offline(timeout: float = 2.0) -> tuple[bool, str]:
    """(offline, why) for a run without an explicit ``offline`` or ``WANDB_MODE``."""
    if not _has_api_key():
        return True, "no wandb API key (WANDB_API_KEY or ~/.netrc)"
    if not _reachable(_base_url(), timeout):
        return True, f"{_base_url()} not reachable within {timeout:g} s"
    return False, "API key present and host reachable"


class WandbLogger(_WandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` with ``offline=None`` meaning "decide by itself".

    A ``WANDB_MODE`` the user set (``offline``, ``disabled``...) is left to wandb: Lightning's
    ``offline=True`` would overwrite it with ``dryrun``. When the decision is offline, ``log_model``
    is dropped with a warning (Lightning refuses the pair), so a run without network still starts.
    """

    def __init__(self, *args, offline: bool | None = None, **kwargs):
        if offline is None:
            if os.environ.get("WANDB_MODE"):
                offline = False  # not forced by us: wandb applies WANDB_MODE itself
                log.info("wandb mode from WANDB_MODE=%s", os.environ["WANDB_MODE"])
            else:
                offline, why = should_run_offline()
                log.info("wandb %s: %s", "offline" if offline else "online", why)
                if offline and kwargs.get("log_model"):
                    log.warning("wandb offline (%s): log_model=%r dropped, checkpoints stay local",
                                why, kwargs["log_model"])
                    kwargs["log_model"] = False
        super().__init__(*args, offline=offline, **kwargs)
