"""``hub init``, ``add``, ``ls``, ``show``, ``export``, ``compress``, ``rm``, ``gc`` and
``verify``: the commands that keep entries in a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mergehub.errors import InputError
from mergehub.hub.commands.common import (HelpFrom, json_arg, note, open_store, progress_bars,
                                          summary)
from mergehub.safejson import parse_json
from mergehub.storage.store import KINDS, Store, default_root
from mergehub.units import human_bytes, parse_size


@click.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create the store (a directory with a SQLite catalog and content-addressed blobs)."""
    root = ctx.obj["store"] or default_root()
    existed = (root / "mergehub-store.json").is_file()
    with Store.init(root) as store:
        click.echo(f"{'store already exists' if existed else 'initialized store'} at {store.root}")


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", "-n", required=True, help="Name of the new model in the store (unique).")
@click.option("--base", "-b", default=None,
              help="Stored model this one was fine-tuned from: unchanged tensors cost nothing, "
                   "changed ones are kept as lossless deltas. Names and shapes must match.")
@click.option("--kind", type=click.Choice(KINDS), default=None,
              help="Model kind. Default: adapter for a PEFT dir, finetune with --base, else base.")
@click.option("--metrics", default=None,
              help='Metrics as a JSON object, inline (\'{"loss": 0.41}\') or @FILE.')
@click.option("--provenance", default=None,
              help="Extra provenance (recipe, run id, ...) as a JSON object, inline or @FILE.")
@click.pass_context
def add(ctx: click.Context, path: Path, name: str, base: str | None, kind: str | None,
        metrics: str | None, provenance: str | None) -> None:
    """Add the checkpoint at PATH: an HF model dir (sharded or not), a PEFT adapter dir, or a
    .safetensors file. Creates the store if needed. A directory is kept whole (every file, at
    any depth); pickle files (.bin/.pt/...) are not kept (and refused as the weights), nor are
    .git and other tools' folders: a note lists them."""
    m, p = json_arg(metrics, "--metrics"), json_arg(provenance, "--provenance")
    with open_store(ctx, create=True) as store:
        info = store.add(path, name, base=base, kind=kind, metrics=m, provenance=p,
                         progress=progress_bars())
    not_kept = info.provenance.get("not_kept")
    if isinstance(not_kept, dict) and not_kept:
        note("note: not kept: " + "; ".join(f"{path} ({why})" for path, why in
                                             not_kept.items()))
    click.echo(f"added {summary(info)}")


@click.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def ls_(ctx: click.Context, as_json: bool) -> None:
    """List stored models with their kind, base and sizes."""
    with open_store(ctx) as store:
        models = store.ls()
        disk = store.disk_bytes()
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in models], indent=2))
        return
    rows = [("NAME", "KIND", "BASE", "TENSORS", "LOGICAL", "STORED", "SAVED", "CREATED")]
    rows += [(m.name, m.kind, m.base or "-", str(m.tensors), human_bytes(m.logical_bytes),
              human_bytes(m.stored_bytes), f"{m.saving:.1%}", m.created) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if models:
        logical = sum(m.logical_bytes for m in models)
        saved = f" ({1 - disk / logical:.1%} saved)" if logical else ""
        click.echo(f"total: {human_bytes(logical)} logical in {human_bytes(disk)} of blobs{saved}")


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show one model: kind, base, tensor count, logical and stored bytes, metrics, provenance."""
    with open_store(ctx) as store:
        info = store.show(name)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=2))
        return
    ratio = info.logical_bytes / info.stored_bytes if info.stored_bytes else float("inf")
    rows = [("name", info.name), ("kind", info.kind), ("base", info.base or "-"),
            ("format", info.format), ("created", info.created),
            ("tensors", info.tensors),
            ("logical bytes", f"{info.logical_bytes} ({human_bytes(info.logical_bytes)})"),
            ("bytes on disk", f"{info.stored_bytes} ({human_bytes(info.stored_bytes)})"),
            ("saving vs raw", f"{info.saving:.1%} ({ratio:.2f}x smaller)"),
            *((f"codec {c}", f"{v['blobs']} blobs, {human_bytes(v['stored_bytes'])} "
               f"for {human_bytes(v['raw_bytes'])} decoded "
               f"({v['raw_bytes'] / max(1, v['stored_bytes']):.2f}x)")
              for c, v in info.codecs.items()),
            ("metrics", json.dumps(info.metrics, sort_keys=True)),
            ("provenance", json.dumps(info.provenance, sort_keys=True))]
    width = max(len(key) for key, _ in rows) + 2  # "codec lossless:" is as long as the column
    for key, value in rows:
        click.echo(f"{key + ':':{width}s}{value}")


@click.command()
@click.argument("name")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Directory to write (must not exist or be empty, unless --overwrite).")
@click.option("--max-shard-size", default=None,
              help="Re-shard an HF model into shards of at most this size (e.g. 2GB, 500MiB). "
                   "Default: re-create the files exactly as they were added.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically).")
@click.option("--task", default=None,
              help="For a reversible merge (merge_method rmm): rebuild this input task (its "
                   "name as in the recipe, or its index from 0) as a full HF model.")
@click.pass_context
def export(ctx: click.Context, name: str, output: Path, max_shard_size: str | None,
           overwrite: bool, task: str | None) -> None:
    """Write model NAME to a directory, bit for bit as it was added. The output appears only
    once complete: a failed export leaves nothing at OUTPUT."""
    size = parse_size(max_shard_size) if max_shard_size is not None else None
    with open_store(ctx) as store:
        if task is not None:
            from mergehub.storage.tasks import export_task

            export_task(store, name, task, output, overwrite=overwrite, progress=progress_bars())
            click.echo(f"exported task {task!r} of {name!r} to {output}")
            return
        store.export(name, output, max_shard_size=size, overwrite=overwrite,
                     progress=progress_bars())
    click.echo(f"exported {name!r} to {output}")


def _codec_help() -> str:
    """``hub compress --codec``'s help, from the codec registries (a codec added there shows
    up here)."""
    from mergehub.storage.codecs import LOSSY
    from mergehub.storage.codecs.multi import MULTI

    def listed(names: list[str]) -> str:
        return "; ".join(f"{n}: {(LOSSY.get(n) or MULTI[n]).summary}" for n in names)

    return ("Lossy codec. One fine-tune at a time: "
            + listed(sorted(n for n in LOSSY if n not in MULTI))
            + ". Two or more fine-tunes of one base together (NAMES A B ...): "
            + listed(sorted(n for n, c in MULTI.items() if c.layout == "entries"))
            + ". Not this command's: " + "; ".join(
                f"{c.name} ({c.made_by[0]} writes it: `hub merge` with {c.made_by[1]})"
                for _, c in sorted(MULTI.items()) if c.layout == "bundle") + ".")


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--codec", "-c", required=True, cls=HelpFrom, help_from=_codec_help)
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="Codec parameter, repeatable: bit1 granularity=matrix|row "
                   "scope=bitdelta|linear|all; compeft "
                   "density=0.1 alpha=1.0; lowrank rank=16 (or rank=0 energy=0.9); tall "
                   "lambda=0.4 (or [0.3,0.4,...] per fine-tune) alpha=1.0.")
@click.option("--name", "-n", "--as", "as_name", default=None,
              help="Name of the new (compressed) entry. Default: NAME-CODEC; one NAME only.")
@click.pass_context
def compress(ctx: click.Context, names: tuple[str, ...], codec: str, params: tuple[str, ...],
             as_name: str | None) -> None:
    """Store lossy-compressed copies of fine-tunes NAMES against their base (one entry each,
    NAME-CODEC). Export and merge read them like any other entry."""
    parsed: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        try:
            parsed[key] = parse_json(value, "--param")
        except InputError:
            parsed[key] = value
    if as_name is not None and len(names) > 1:
        raise click.BadParameter("names one entry: give one NAME", param_hint="--name")
    from mergehub.storage.codecs.multi import MULTI

    with open_store(ctx) as store:
        if getattr(MULTI.get(codec), "layout", None) == "entries":  # tall: several together
            infos = store.compress_multi(list(names), codec, parsed, progress=progress_bars())
        else:
            infos = [store.compress(n, codec, parsed, as_name=as_name, progress=progress_bars())
                     for n in names]
    for info in infos:
        click.echo(f"compressed {summary(info)}")


@click.command()
@click.argument("name")
@click.pass_context
def rm(ctx: click.Context, name: str) -> None:
    """Remove model NAME from the catalog (refused while other models use it as base).
    Its blobs are freed by `hub gc`."""
    with open_store(ctx) as store:
        store.rm(name)
    click.echo(f"removed {name!r} (run `hub gc` to free its blobs)")


@click.command()
@click.pass_context
def gc(ctx: click.Context) -> None:
    """Delete blobs that no model references, leftovers of interrupted adds, and the partial
    downloads of interrupted pulls (a pull started again then starts from scratch).
    Waits for running adds, compresses and exports of other processes to finish; leaves the
    work folders of running merges, pushes and pulls alone. Refused while the catalog is
    damaged (see `hub verify --repair`)."""
    with open_store(ctx) as store:
        report = store.gc()
    click.echo(f"removed {report.blobs_removed} blobs ({human_bytes(report.bytes_freed)}), "
               f"{report.temp_files_removed} temporary files, {report.transfers_removed} "
               f"unfinished transfers and {report.records_removed} records of no model")


@click.command()
@click.option("--repair", is_flag=True,
              help="First make the catalog agree with the entry records (entries/*.json, one "
                   "per model, written when it was stored): rebuild a lost, emptied or "
                   "unreadable catalog from them, restore edited rows, write missing records "
                   "again, restore models of records no row lists. Removed models stay removed. "
                   "Blobs are never changed. Then verify as without --repair.")
@click.pass_context
def verify(ctx: click.Context, repair: bool) -> None:
    """Check the catalog (SQLite's integrity and foreign key checks; each model's rows against
    the digest recorded when it was stored, and its record file), then every blob against its
    sha256, decode it, and check the decoded bytes against the original's sha256. Exits with
    status 2 and names every affected model if anything is wrong."""
    if repair:
        fixed = Store.repair(ctx.obj["store"])
        for action in fixed.actions:
            click.echo(f"repaired: {action}")
        for problem in fixed.problems:
            click.echo(f"error: {problem}", err=True)
    with open_store(ctx) as store:
        report = store.verify(progress=progress_bars())
    for problem in report.problems:
        click.echo(f"error: {problem}", err=True)
    if report.affected:
        click.echo(f"affected models: {', '.join(sorted(report.affected))}", err=True)
    notes = []
    if report.unreferenced_files:
        notes.append(f"{report.unreferenced_files} unreferenced blob files (`hub gc` removes "
                     "them)")
    if report.unreferenced_records:
        notes.append(f"{report.unreferenced_records} entry records of no model, left by adds "
                     "interrupted before their commit (`hub gc` removes them, `hub verify "
                     "--repair` restores them)")
    status = "OK" if report.ok else f"{len(report.problems)} problems"
    click.echo(f"checked {report.blobs} blobs ({human_bytes(report.bytes)}): {status}"
               + "".join(f"; {n}" for n in notes))
    if not report.ok or (repair and fixed.problems):
        ctx.exit(2)
