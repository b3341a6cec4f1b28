"""Child process for the crash and concurrency tests: one store operation, announced on stdout.

Usage: python store_worker.py ROOT PATH NAME BASE|- GOFILE|- [OP]

OP is ``add`` (default: add the checkpoint PATH as NAME, against BASE), ``merge`` (the recipe
file PATH into the store as NAME), ``compress`` (entry PATH with bit1 over every tensor, as
NAME), ``gc``, or ``pull`` (Hub repo PATH as NAME against BASE; the endpoint and token come
from the environment). Prints ``ready`` once imports are done, waits for GOFILE to exist (a
start barrier), runs the operation, prints ``done``.
"""

import sys
import time
from pathlib import Path

from mergehub.storage.store import Store


def main(root: str, path: str, name: str, base: str, go: str, op: str = "add") -> None:
    base_name = None if base == "-" else base
    if op == "merge":
        from mergehub.merge.engine import merge
    if op == "pull":
        from mergehub.hub.remote import pull
    print("ready", flush=True)
    if go != "-":
        while not Path(go).exists():
            time.sleep(0.005)
    with Store(root, create=True) as store:
        if op == "add":
            store.add(path, name, base=base_name, progress=False)
        elif op == "merge":
            merge(Path(path), None, store=store, to_store=name, progress=False)
        elif op == "compress":
            store.compress(path, "bit1", {"scope": "all"}, as_name=name, progress=False)
        elif op == "gc":
            store.gc()
        elif op == "pull":
            pull(store, path, name=name, base=base_name, progress=False)
        else:
            raise SystemExit(f"unknown operation {op!r}")
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
