"""Lightning's ``WandbLogger`` that decides offline mode by itself, so a run never hangs on a login.

wandb in online mode without network blocks at ``wandb.init``; Lightning's logger only takes a
fixed ``offline`` flag. Here ``offline=None`` (the default) means: online only when an API key is
configured and the wandb host answers within a couple of seconds; otherwise offline (sync later
with ``wandb sync``). The host is never probed without a key.
"""
from __future__ import annotations

import logging
import netrc
import os
import socket
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _WandbLogger

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(_base_url()).hostname) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _reachable(url: str, timeout: float) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def should_run_offline(timeout: float = 2.0) -> tuple[bool, str]:
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True, f"WANDB_MODE={mode}"
    if not _has_api_key():
        return True, "no wandb API key (WANDB_API_KEY or ~/.netrc)"
    if not _reachable(_base_url(), timeout):
        return True, f"{_base_url()} not reachable"
    return False, "API key present and host reachable"


class WandbLogger(_WandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` with ``offline=None`` meaning "decide by itself".

    ``id`` defaults to ``$WANDB_RUN_ID``, so a requeued SLURM job (whose script exports a stable id)
    continues the same wandb run with ``resume="allow"``.
    """

    def __init__(self, *args, offline: bool | None = None, **kwargs):
        if offline is None:
            offline, why = should_run_offline()
            log.info("wandb %s: %s", "offline" if offline else "online", why)
        if offline:
            os.environ.setdefault("WANDB_MODE", "offline")
        if kwargs.get("id") is None and os.environ.get("WANDB_RUN_ID"):
            kwargs["id"] = os.environ["WANDB_RUN_ID"]
        if kwargs.get("id") is not None:
            kwargs.setdefault("resume", "allow")
        super().__init__(*args, offline=offline, **kwargs)
