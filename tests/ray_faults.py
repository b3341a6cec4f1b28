"""Fault injection for the Ray tests, run in every Ray worker of the test instance (its
``worker_process_setup_hook``): never imported by mergehub.

While the file named by ``$MERGEHUB_TEST_KILL`` exists, the first worker to finish writing a
tensor claims it (an atomic rename to ``<name>.claimed``) and kills its own process with
SIGKILL, as the OOM killer or a lost node would, with a shard file half-written. Ray then runs
the task again on another worker.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def arm() -> None:
    """Wrap :func:`mergehub.storage.writer.write_shard` in this worker (see the module
    docstring)."""
    import mergehub.merge.tensors as tensors

    original = tensors.write_shard

    def write_shard(path, shard, get, done=None):  # noqa: ANN001, ANN202  (same as wrapped)
        def done_then_maybe_die(spec):  # noqa: ANN001, ANN202
            if done is not None:
                done(spec)
            marker = os.environ.get("MERGEHUB_TEST_KILL")
            if marker:
                try:
                    os.rename(marker, marker + ".claimed")
                except FileNotFoundError:
                    return
                Path(marker + ".claimed").write_text(f"{path} {spec.name}\n")
                os.kill(os.getpid(), signal.SIGKILL)

        return original(path, shard, get, done_then_maybe_die)

    tensors.write_shard = write_shard
