"""``hub train``: a fine-tune as a config says, in one process or, with ``--nproc``, under
torchrun."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mergehub.errors import InputError
from mergehub.hub.commands.common import note, progress_bars, summary
from mergehub.storage.store import Store, default_root


@click.command(name="train")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--fresh", is_flag=True,
              help="Ignore checkpoints of an earlier run of this config (they are removed) and "
                   "start from step 0. Default: resume from the newest checkpoint in run_dir.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None, metavar="STEPS",
              help="Stop after this many steps as if interrupted (the last checkpoint stays, "
                   "no output is written); a later run resumes from it.")
@click.option("--device", default=None, metavar="cpu|cuda|cuda:N",
              help="Where the model trains, instead of the config's device (default cpu): "
                   "cuda for this machine's GPU (with --nproc, each process's own), cuda:N for "
                   "GPU N. Refused before anything loads where there is no such device.")
@click.option("--nproc", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train on N processes of this machine (mezo and sparse_mezo): starts "
                   "torchrun, which runs `python -m mergehub train CONFIG` N times; the ranks "
                   "share out each batch and exchange only loss values (docs/training.md, "
                   "'More than one device').")
@click.option("--nnodes", default=None, metavar="N|MIN:MAX",
              help="With --nproc: the number of machines (torchrun's --nnodes); run the same "
                   "command on every one, with --rdzv-endpoint.")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="With --nnodes: where the machines meet (torchrun's c10d rendezvous), an "
                   "address of one of them that all can reach.")
@click.pass_context
def train_(ctx: click.Context, config: Path, fresh: bool, stop_after: int | None,
           device: str | None, nproc: int | None, nnodes: str | None,
           rdzv_endpoint: str | None) -> None:
    """Fine-tune a base as CONFIG (YAML) says and put the result in the store and/or a dir.

    CONFIG names the base (store name or HF dir), the data (a built-in synthetic task, or a
    JSONL of prompt/completion pairs or plain text), the method (full, lora and any peft
    tuner, incrlora, sparse, onebit, mezo, sparse_mezo) and its parameters, steps, batch
    size, learning rate, seed, checkpoint interval, device and output (store entry name
    and/or output dir). See docs/training.md for every key. Shows a progress bar with the
    loss; writes a checkpoint every checkpoint_every steps; interrupted, the same command
    resumes.
    """
    from mergehub.adapters.trainer import train

    if nproc is not None or nnodes is not None or rdzv_endpoint is not None:
        ctx.exit(_torchrun(ctx, config, fresh, stop_after, device, nproc, nnodes,
                           rdzv_endpoint))
    root = ctx.obj["store"]
    exists = (root or default_root()).joinpath("mergehub-store.json").is_file()
    store = Store(root, create=True) if exists or _wants_store(config) else None
    try:
        result = train(config, store=store, device=device, resume=not fresh,
                       progress=progress_bars(), stop_after=stop_after, echo=note)
    finally:
        if store is not None:
            store.close()
    if result.rank:  # one of several processes: rank 0 reports
        return
    if result.interrupted:
        ckpt = result.last_checkpoint
        click.echo(f"stopped after step {result.steps} (loss {result.losses[-1]:.4f}); "
                   + (f"run again to resume from {ckpt}" if ckpt else "no checkpoint was "
                      "written yet (checkpoint_every)"))
        return
    m = result.metrics
    evals = "".join(f", {k} {v:.4f}" for k, v in m.items() if k.startswith("eval_"))
    where = " and ".join(x for x in (str(result.output_dir) if result.output_dir else "",
                                     summary(result.entry) if result.entry else "") if x)
    click.echo(f"trained {result.steps} steps: loss {m['loss']:.4f}{evals}; wrote {where}")


def _torchrun(ctx: click.Context, config: Path, fresh: bool, stop_after: int | None,
              device: str | None, nproc: int | None, nnodes: str | None,
              rdzv_endpoint: str | None) -> int:
    """``hub train --nproc N``: check the config here (one error line, nothing started), then
    run ``torchrun ... -m mergehub train CONFIG`` with this command's options; its exit
    status."""
    import os
    import subprocess

    from mergehub.adapters import distributed
    from mergehub.adapters.config import load_config
    from mergehub.adapters.trainer import check_world, on_device

    if nproc is None:
        raise InputError("--nnodes and --rdzv-endpoint go with --nproc N (processes per "
                         "machine)")
    if distributed.launched():
        raise InputError("--nproc: this is already one of several processes (WORLD_SIZE="
                         f"{os.environ['WORLD_SIZE']}); run `hub train CONFIG` under torchrun, "
                         "or --nproc outside it")
    nodes = nnodes or "1"
    if not (nodes.isdigit() and int(nodes) >= 1 or ":" in nodes):
        raise InputError(f"--nnodes: want a number of machines N or a range MIN:MAX, not "
                         f"{nodes!r}")
    if nodes != "1" and rdzv_endpoint is None:
        raise InputError("--nnodes: machines meet at --rdzv-endpoint HOST:PORT (on one of "
                         "them); give it on every machine")
    cfg = on_device(load_config(config), device)
    check_world(cfg, nproc * int(nodes.split(":")[0] or 1))  # the fewest machines
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if rdzv_endpoint is None:
        command.append("--standalone")
    else:
        command += [f"--nnodes={nodes}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={rdzv_endpoint}"]
    command += ["-m", "mergehub", "train", str(config)]
    command += ["--fresh"] * fresh + ([f"--stop-after={stop_after}"] if stop_after else []) \
        + ([f"--device={device}"] if device else [])
    obj = ctx.obj
    command += ([f"--store={obj['store']}"] if obj.get("store") else []) + \
        ["--quiet"] * bool(obj.get("quiet")) + ["--debug"] * bool(obj.get("debug")) + \
        ["-v"] * int(obj.get("verbose") or 0)
    env = dict(os.environ)  # torchrun's default is 1 thread a process: give each its share
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(command, env=env)


def _wants_store(config: Path) -> bool:
    """Whether a training config sends its result to the store (read before training)."""
    from mergehub.adapters.config import load_config

    return bool(load_config(config).output.get("store"))
