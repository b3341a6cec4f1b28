"""The ``hub`` command line.

Every command that touches a store takes ``--store PATH`` (default ``$MERGEHUB_HOME``, else
``~/.cache/mergehub``), before or after the command's name (``hub --store X ls`` and ``hub ls
--store X``), and so do ``--debug``, ``--quiet`` and ``-v``. Errors caused by input print one
line ``error: ...`` naming the file, model or tensor and exit with status 2; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from pathlib import Path
from typing import Any

import click

from mergehub import __version__
from mergehub.errors import InputError, MergehubError, cli_spelling
from mergehub.safejson import parse_json
from mergehub.storage.store import KINDS, ModelInfo, Store, default_root
from mergehub.units import human_bytes, parse_kmb, parse_size


def _set_shared(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Record a shared option in ``ctx.obj``, given before or after the command's name (the
    command's own spelling wins over the group's; ``-v`` counts both)."""
    obj = ctx.ensure_object(dict)
    if param.name == "verbose":
        obj["verbose"] = obj.get("verbose", 0) + value
        if value:
            _log_at(obj["verbose"])
    elif value is not None and value is not False:
        obj[param.name] = value
    else:
        obj.setdefault(param.name, None if param.name == "store" else False)


def _log_at(verbosity: int) -> None:
    """``-v``: log INFO, ``-vv``: DEBUG, from mergehub and the libraries it drives (mergekit's
    ``-v``)."""
    level = logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    for name in ("", "mergehub", "huggingface_hub", "transformers", "peft"):
        logging.getLogger(name).setLevel(level)


def _shared_options(with_store: bool) -> list[click.Option]:
    """The options every command accepts before or after its name (``hub ls --store X``)."""
    options = [
        click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_shared,
                     help="Show full tracebacks instead of one-line errors."),
        click.Option(["--quiet", "-q"], is_flag=True, expose_value=False, callback=_set_shared,
                     help="No progress bars and no notes on stderr (results and errors "
                          "still print)."),
        click.Option(["--verbose", "-v"], count=True, expose_value=False, callback=_set_shared,
                     help="Log what mergehub and the libraries it uses (huggingface_hub, "
                          "transformers, peft) report: -v at INFO, -vv at DEBUG."),
    ]
    if with_store:
        options.insert(0, click.Option(
            ["--store"], type=click.Path(file_okay=False, path_type=Path), expose_value=False,
            callback=_set_shared,
            help=f"Store root directory. Default: $MERGEHUB_HOME, else {default_root()}."))
    return options


class _Group(click.Group):
    """Turns :class:`MergehubError`, OS errors and catalog (SQLite) errors (a locked, full or
    damaged catalog) into one line on stderr and exit status 2, and gives every command the
    shared options (``--store`` to those that open a store)."""

    #: commands that never open the user's store
    STORELESS = frozenset({"demo"})

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(_shared_options(with_store=(name or cmd.name) not in self.STORELESS))
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with cli_spelling():  # messages name --options, not Python arguments
                return super().invoke(ctx)
        except BrokenPipeError:
            raise  # the reader went away (`hub show X | head -1`): click exits quietly
        except (MergehubError, OSError, sqlite3.Error) as e:
            if (ctx.obj or {}).get("debug"):
                raise
            where = "store catalog: " if isinstance(e, sqlite3.Error) else ""
            click.echo(f"error: {where}{e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _progress() -> bool:
    """Progress bars: on a terminal only, and never with ``--quiet``."""
    return sys.stderr.isatty() and not click.get_current_context().obj.get("quiet")


def _note(text: str) -> None:
    """A note on stderr (what a merge or a training run reports on the way), unless ``--quiet``."""
    if not click.get_current_context().obj.get("quiet"):
        click.echo(text, err=True)


def _open_store(ctx: click.Context, create: bool = False) -> Store:
    return Store(ctx.obj["store"], create=create)


def _json_arg(value: str | None, option: str) -> dict[str, Any] | None:
    """Parse a JSON object given inline or as ``@FILE`` / a path to a JSON file."""
    if value is None:
        return None
    text = value
    if value.startswith("@") or Path(value).is_file():
        path = Path(value.removeprefix("@"))
        try:
            text = path.read_text()
        except OSError as e:
            raise click.BadParameter(f"{path}: {e.strerror or e}", param_hint=option) from e
    try:
        obj = parse_json(text, "value")
    except InputError as e:
        raise click.BadParameter(str(e), param_hint=option) from None
    if not isinstance(obj, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return obj


def _not_both(ctx: click.Context, param: str, other: Any, other_hint: str, hint: str) -> None:
    """Refuse an option given under both of its spellings (a positional OUT and ``-o``;
    mergekit's ``--out-shard-size`` and ``--max-shard-size``)."""
    if other is not None and (ctx.get_parameter_source(param)
                              == click.core.ParameterSource.COMMANDLINE):
        raise click.BadParameter(f"given twice, as {other_hint} and as {hint}: give one",
                                 param_hint=hint)


def _summary(info: ModelInfo) -> str:
    of = f" of {info.base!r}" if info.base else ""
    return (f"{info.name!r} ({info.kind}{of}): {info.tensors} tensors, "
            f"{human_bytes(info.logical_bytes)} logical, {human_bytes(info.stored_bytes)} stored "
            f"({info.saving:.1%} saved)")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             params=_shared_options(with_store=True))
@click.version_option(__version__, prog_name="mergehub")
def cli() -> None:
    """mergehub: keep fine-tunes and adapters of one base as compressed deltas, merge and ship them.

    A store keeps each base checkpoint once and every fine-tune as a lossless delta against it.
    Start with `hub demo`, or `hub init` then `hub add`. --store, --debug, --quiet and -v go
    before or after the command's name.
    """


@cli.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create the store (a directory with a SQLite catalog and content-addressed blobs)."""
    root = ctx.obj["store"] or default_root()
    existed = (root / "mergehub-store.json").is_file()
    with Store.init(root) as store:
        click.echo(f"{'store already exists' if existed else 'initialized store'} at {store.root}")


@cli.command()
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
    m, p = _json_arg(metrics, "--metrics"), _json_arg(provenance, "--provenance")
    with _open_store(ctx, create=True) as store:
        info = store.add(path, name, base=base, kind=kind, metrics=m, provenance=p,
                         progress=_progress())
    not_kept = info.provenance.get("not_kept")
    if isinstance(not_kept, dict) and not_kept:
        _note("note: not kept: " + "; ".join(f"{path} ({why})" for path, why in
                                             not_kept.items()))
    click.echo(f"added {_summary(info)}")


@cli.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def ls_(ctx: click.Context, as_json: bool) -> None:
    """List stored models with their kind, base and sizes."""
    with _open_store(ctx) as store:
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


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.pass_context
def show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show one model: kind, base, tensor count, logical and stored bytes, metrics, provenance."""
    with _open_store(ctx) as store:
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


@cli.command()
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
    with _open_store(ctx) as store:
        if task is not None:
            from mergehub.merge.rmm import revert

            revert(store, name, task, output, overwrite=overwrite, progress=_progress())
            click.echo(f"exported task {task!r} of {name!r} to {output}")
            return
        store.export(name, output, max_shard_size=size, overwrite=overwrite, progress=_progress())
    click.echo(f"exported {name!r} to {output}")


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--codec", "-c", required=True,
              help="Lossy codec: bit1 (1 sign bit per weight + a scale per matrix, attention "
                   "and MLP projections only, as BitDelta), compeft "
                   "(top-k signs times alpha·std), lowrank (truncated SVD of each matrix) or "
                   "tall (several fine-tunes of one base: a shared multi-task vector plus one "
                   "bitmask per task).")
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
    with _open_store(ctx) as store:
        if codec == "tall":
            infos = store.compress_tall(list(names), parsed, progress=_progress())
        else:
            infos = [store.compress(n, codec, parsed, as_name=as_name, progress=_progress())
                     for n in names]
    for info in infos:
        click.echo(f"compressed {_summary(info)}")


@cli.command()
@click.argument("name")
@click.pass_context
def rm(ctx: click.Context, name: str) -> None:
    """Remove model NAME from the catalog (refused while other models use it as base).
    Its blobs are freed by `hub gc`."""
    with _open_store(ctx) as store:
        store.rm(name)
    click.echo(f"removed {name!r} (run `hub gc` to free its blobs)")


@cli.command()
@click.pass_context
def gc(ctx: click.Context) -> None:
    """Delete blobs that no model references, leftovers of interrupted adds, and the partial
    downloads of interrupted pulls (a pull started again then starts from scratch).
    Waits for running adds, compresses and exports of other processes to finish; leaves the
    work folders of running merges, pushes and pulls alone. Refused while the catalog is
    damaged (see `hub verify --repair`)."""
    with _open_store(ctx) as store:
        report = store.gc()
    click.echo(f"removed {report.blobs_removed} blobs ({human_bytes(report.bytes_freed)}), "
               f"{report.temp_files_removed} temporary files, {report.transfers_removed} "
               f"unfinished transfers and {report.records_removed} records of no model")


@cli.command()
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
    with _open_store(ctx) as store:
        report = store.verify(progress=_progress())
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


@cli.command(name="merge")
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Directory to write (the same as OUT): an HF model dir, or a PEFT adapter "
                   "dir (see --format). It appears only when the whole merge succeeded.")
@click.option("--name", "-n", "--to-store", "to_store", default=None,
              help="Also (or instead) add the result to the store as a new entry of this name, "
                   "with the recipe in its provenance.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the arithmetic runs (always in float32).")
@click.option("--cuda", is_flag=True, help="The same as --device cuda (mergekit's spelling).")
@click.option("--missing", type=click.Choice(["error", "take-base"]), default="error",
              show_default=True,
              help="Tensors some input lacks or has with another shape: stop with an error, or "
                   "use the base's tensor there (each case is reported).")
@click.option("--seed", "--random-seed", "seed", type=int, default=0, show_default=True,
              help="Seed of the random methods (DARE): same seed, same output.")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest output shard in bytes (e.g. 2GB, 500MiB).")
@click.option("--out-shard-size", default=None, metavar="SIZE",
              help="Largest output shard as mergekit spells it: bytes as an integer, or with "
                   "K, M or B for thousand, million, billion (5B = 5GB).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (atomically).")
@click.option("--format", "output_format", type=click.Choice(["hf", "peft", "auto"]),
              default="hf", show_default=True,
              help="hf: a full HF model dir. peft: a PEFT adapter dir of the base (only when all "
                   "inputs are LoRAs and the method is task_arithmetic or normalized linear; "
                   "its base_model_name_or_path is where the base came from). auto: peft when "
                   "possible, else hf.")
@click.option("--dry-run", is_flag=True,
              help="Check the recipe and inputs and print the plan (tensors, bytes, inputs) "
                   "on stdout without computing anything.")
@click.option("--allow-foreign-base", is_flag=True,
              help="Merge store entries that were added against another base than the "
                   "recipe's base_model (refused by default: a task vector is relative to the "
                   "base it was taken from, so against another model it is meaningless).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None,
              metavar="[ADDRESS]",
              help="Merge on a Ray cluster: the output's shards are split among Ray tasks, "
                   "each writing its own shard files (bit-identical to a merge without --ray). "
                   "ADDRESS: the cluster to join (ray://HOST:10001, HOST:6379, auto); without "
                   "it, a local Ray instance. OUTPUT (or the store) must be on a file system "
                   "every node sees. Give it as --ray=ADDRESS, or after RECIPE. Needs "
                   "pip install 'mergehub[ray]'.")
@click.pass_context
def merge_(ctx: click.Context, recipe: Path, out: Path | None, output: Path | None,
           to_store: str | None, device: str, cuda: bool, missing: str, seed: int,
           max_shard_size: str, out_shard_size: str | None, overwrite: bool,
           output_format: str, dry_run: bool, allow_foreign_base: bool,
           ray_address: str | None) -> None:
    """Merge models as RECIPE (mergekit-style YAML) says into the directory OUT (or -o) and/or
    a new store entry (--name). Inputs are HF model dirs, PEFT LoRA dirs (used as dense deltas
    B·A·scaling), .safetensors files or store names. `hub merge RECIPE OUT` is `mergekit-yaml
    RECIPE OUT`; --random-seed, --out-shard-size, --cuda, -v and --quiet mean what they mean
    there."""
    from mergehub.merge.engine import merge
    from mergehub.merge.plan import kept_line

    _not_both(ctx, "output", out, "OUT", "--output")
    _not_both(ctx, "max_shard_size", out_shard_size, "--out-shard-size", "--max-shard-size")
    output = out if out is not None else output
    shard_bytes = (parse_kmb(out_shard_size) if out_shard_size is not None
                   else parse_size(max_shard_size))
    device = "cuda" if cuda else device
    store = None
    root = ctx.obj["store"]
    if to_store is not None:
        store = Store(root, create=True)
    elif (root or default_root()).joinpath("mergehub-store.json").is_file():
        store = Store(root)
    try:
        result = merge(recipe, output, store=store, to_store=to_store, device=device,
                       missing=missing, seed=seed, dry_run=dry_run,
                       max_shard_size=shard_bytes, overwrite=overwrite,
                       output_format=output_format, progress=_progress(),
                       allow_foreign_base=allow_foreign_base,
                       echo=click.echo if dry_run else _note,
                       executor="local" if ray_address is None else "ray",
                       ray_address=ray_address or None)
    finally:
        if store is not None:
            store.close()
    if dry_run:
        return
    if result.report and "relative_error_by_m" in result.report:
        click.echo("reconstruction error (||ΔW_t - recon||/||ΔW_t||) with m = 1..T basis terms:")
        for label, errs in result.report["relative_error_by_m"].items():
            click.echo(f"  {label}: " + "  ".join(f"m={j + 1}: {e:.4f}" for j, e in enumerate(errs)))
        click.echo(f"stored basis ({result.report['basis']}) with m = 1..T terms: " + "  ".join(
            f"m={j + 1}: {human_bytes(b)}" for j, b in enumerate(result.report["stored_bytes_by_m"])))
    if result.report and "kept" in result.report:
        tally = result.report["kept"]
        approx = any(tally.approximate)
        click.echo(kept_line([s.label for s in result.plan.inputs], tally.kept, tally.seen,
                             "kept about" if approx else "kept"))
    what = {"peft": "a PEFT adapter of the base", "rmm": "a reversible merge basis"}.get(
        result.format, "an HF model dir")
    where = " and ".join(x for x in (str(output) if output else "",
                                     f"store entry {to_store!r}" if to_store else "") if x)
    click.echo(f"merged {result.tensors} tensors ({human_bytes(result.bytes)}) in "
               f"{result.seconds:.1f} s ({result.bytes / max(result.seconds, 1e-9) / 1e9:.2f} GB/s) "
               f"into {where}: {what}")


@cli.command()
@click.argument("name")
@click.argument("repo_id")
@click.option("--revision", default=None,
              help="Branch to commit to; created from main if it does not exist. Default: main.")
@click.option("--private", is_flag=True,
              help="Create the repo as private (no effect on a repo that already exists).")
@click.option("--format", "formats", multiple=True, type=click.Choice(["peft", "hf", "mergehub"]),
              help="Form to push, repeatable. peft: a PEFT adapter repo (PeftModel."
                   "from_pretrained loads it). hf: the model's safetensors, config and "
                   "tokenizer files (transformers loads it). mergehub: the entry's own "
                   "compressed blobs, restored by `hub pull` without decoding (needs the base "
                   "in the pulling store). Default: peft for an adapter, hf + mergehub for a "
                   "compressed entry, else hf.")
@click.option("--base-model", default=None,
              help="Hub repo id of the base model, for the model card's base_model. Default: "
                   "the repo the base was pulled from, if it was.")
@click.option("--message", "-m", default=None, help="Commit message.")
@click.option("--subfolder", default=None,
              help="Push into this folder of the repo (with its own card and manifest; `hub "
                   "pull REPO --subfolder DIR` gets it back); other folders are left alone.")
@click.pass_context
def push(ctx: click.Context, name: str, repo_id: str, revision: str | None, private: bool,
         formats: tuple[str, ...], base_model: str | None, message: str | None,
         subfolder: str | None) -> None:
    """Push store entry NAME to the Hugging Face Hub repo REPO_ID (ORG/NAME) in one commit,
    with a model card (README.md) and mergehub/manifest.json. The repo is created if needed.
    Endpoint and token come from HF_ENDPOINT and HF_TOKEN or `hf auth login`."""
    from mergehub.hub.remote import push as push_entry

    with _open_store(ctx) as store:
        result = push_entry(store, name, repo_id, revision=revision, private=private,
                            fmt=list(formats) or None, base_model=base_model, message=message,
                            subfolder=subfolder, progress=_progress())
    click.echo(f"pushed {name!r} to {result.repo_id}@{result.revision} as "
               f"{' + '.join(result.forms)}: {len(result.files)} files, "
               f"{human_bytes(result.bytes)}, commit {result.commit[:12]} ({result.url})")


@cli.command()
@click.argument("repo")
@click.option("--name", "-n", default=None,
              help="Name of the new store entry. Default: the name it was pushed under, else "
                   "the repo's name.")
@click.option("--revision", default=None,
              help="Branch, tag or commit to pull, the same as REPO@REVISION. Default: main.")
@click.option("--subfolder", default=None, help="The model is in this folder of the repo.")
@click.option("--base", "-b", default=None,
              help="Stored model to use as the base. Default: for a repo pushed by mergehub, "
                   "the stored model with the base fingerprint its manifest records; for a "
                   "PEFT adapter, the entry named by (or pulled from) its "
                   "base_model_name_or_path; else none.")
@click.pass_context
def pull(ctx: click.Context, repo: str, name: str | None, revision: str | None,
         subfolder: str | None, base: str | None) -> None:
    """Add the model in Hub repo REPO (ORG/NAME or ORG/NAME@REVISION: branch, tag or commit)
    to the store, creating the store if needed. Every file is checked against the server's hash
    and the repo's manifest before anything is added; an interrupted pull resumes."""
    from mergehub.hub.remote import pull as pull_model

    with _open_store(ctx, create=True) as store:
        result = pull_model(store, repo, revision=revision, name=name, subfolder=subfolder,
                            base=base, progress=_progress())
    click.echo(f"pulled {result.repo_id}@{result.revision} (commit {result.commit[:12]}, "
               f"{result.form} form) as {_summary(result.info)}")


@cli.command(name="train")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--fresh", is_flag=True,
              help="Ignore checkpoints of an earlier run of this config (they are removed) and "
                   "start from step 0. Default: resume from the newest checkpoint in run_dir.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None, metavar="STEPS",
              help="Stop after this many steps as if interrupted (the last checkpoint stays, "
                   "no output is written); a later run resumes from it.")
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
           nproc: int | None, nnodes: str | None, rdzv_endpoint: str | None) -> None:
    """Fine-tune a base as CONFIG (YAML) says and put the result in the store and/or a dir.

    CONFIG names the base (store name or HF dir), the data (a built-in synthetic task, or a
    JSONL of prompt/completion pairs or plain text), the method (full, lora and any peft
    tuner, incrlora, sparse, onebit, mezo, sparse_mezo) and its parameters, steps, batch
    size, learning rate, seed, checkpoint interval and output (store entry name and/or output
    dir). See docs/training.md for every key. Shows a progress bar with the loss; writes a
    checkpoint every checkpoint_every steps; interrupted, the same command resumes.
    """
    from mergehub.adapters.trainer import train

    if nproc is not None or nnodes is not None or rdzv_endpoint is not None:
        ctx.exit(_torchrun(ctx, config, fresh, stop_after, nproc, nnodes, rdzv_endpoint))
    root = ctx.obj["store"]
    exists = (root or default_root()).joinpath("mergehub-store.json").is_file()
    store = Store(root, create=True) if exists or _wants_store(config) else None
    try:
        result = train(config, store=store, resume=not fresh, progress=_progress(),
                       stop_after=stop_after, echo=_note)
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
                                     _summary(result.entry) if result.entry else "") if x)
    click.echo(f"trained {result.steps} steps: loss {m['loss']:.4f}{evals}; wrote {where}")


def _torchrun(ctx: click.Context, config: Path, fresh: bool, stop_after: int | None,
              nproc: int | None, nnodes: str | None, rdzv_endpoint: str | None) -> int:
    """``hub train --nproc N``: check the config here (one error line, nothing started), then
    run ``torchrun ... -m mergehub train CONFIG`` with this command's options; its exit
    status."""
    import os
    import subprocess

    from mergehub.adapters import distributed
    from mergehub.adapters.config import load_config
    from mergehub.adapters.trainer import check_world

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
    cfg = load_config(config)
    check_world(cfg, nproc * int(nodes.split(":")[0] or 1))  # the fewest machines
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if rdzv_endpoint is None:
        command.append("--standalone")
    else:
        command += [f"--nnodes={nodes}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={rdzv_endpoint}"]
    command += ["-m", "mergehub", "train", str(config)]
    command += ["--fresh"] * fresh + ([f"--stop-after={stop_after}"] if stop_after else [])
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


@cli.command()
@click.option("--keep", type=click.Path(path_type=Path), default=None,
              help="Build the demo in this directory and keep it (default: a temp dir, removed).")
def demo(keep: Path | None) -> None:
    """Show every verb on a tiny random Llama, in a store of its own (not --store): add two
    fine-tune-like variants and a LoRA against the base and show the savings, export each and
    check it bit for bit, TIES-merge three of them into the store, compress one with ComPEFT,
    train a LoRA on a synthetic task, and verify the store."""
    from mergehub.hub.demo import run_demo

    run_demo(keep, echo=click.echo)


def main() -> None:
    """Console-script entry point of both ``hub`` and ``mergehub`` (and ``python -m
    mergehub``); usage lines name the one that was run."""
    invoked = Path(sys.argv[0]).stem
    cli(prog_name={"mergehub": "mergehub", "__main__": "python -m mergehub"}.get(invoked, "hub"))
