"""Where raysal works around Ray's behaviour, each with the Ray version and what it works around.

- `ray_address` (Ray 2.60, ``ray._private.services.get_ray_address_from_environment``): ``ray.init()`` without an
  address joins the cluster recorded in ``$RAY_TMPDIR|/tmp/ray/ray_current_cluster`` whether or not it still runs.
  ``ray start`` writes that file and only ``ray stop`` removes it, so a head that died (a killed test cluster, a
  rebooted container with a persistent ``/tmp``) leaves every later plain ``ray.init`` trying to join a dead cluster,
  or refusing a local one's resources ("When connecting to an existing cluster, num_cpus and num_gpus must not be
  provided"). raysal joins the recorded cluster only when its GCS answers.
"""

from __future__ import annotations

import logging
import os
import socket

from ray._common.utils import get_ray_address_file  # private: the file Ray itself reads (RAY_TMPDIR, TMPDIR)

log = logging.getLogger(__name__)
# a live GCS on this host or the head answers a TCP connect at once; a dead one is refused at once
CONNECT_TIMEOUT_S = 2.0


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


def ray_address() -> str:
    """The address for ``ray.init``: ``RAY_ADDRESS`` (``ray job submit`` sets it); else the cluster ``ray start``
    recorded on this host if it answers (a shell on the head of a ``ray up`` cluster); else ``"local"``, a new local
    instance (a stale record is named in the log and ignored)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            recorded = f.read().strip()
    except OSError:
        return "local"
    if recorded and _answers(recorded):
        return recorded
    log.warning(
        "%s names %r, which does not answer (a head that ended without `ray stop`): starting a local Ray",
        path,
        recorded,
    )
    return "local"
