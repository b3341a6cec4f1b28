"""Child process for the crash and concurrency tests: one ``Store.add``, announced on stdout.

Usage: python store_worker.py ROOT PATH NAME BASE|- GOFILE|-
Prints ``ready`` once imports are done, waits for GOFILE to exist (a start barrier), adds,
prints ``done``.
"""

import sys
import time
from pathlib import Path

from mergehub.storage.store import Store


def main(root: str, path: str, name: str, base: str, go: str) -> None:
    print("ready", flush=True)
    if go != "-":
        while not Path(go).exists():
            time.sleep(0.005)
    with Store(root, create=True) as store:
        store.add(path, name, base=None if base == "-" else base, progress=False)
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
