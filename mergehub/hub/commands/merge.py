"""``hub merge``: a recipe merged into a folder and/or a store entry (mergekit's
``mergekit-yaml``, spelled its way too)."""

from __future__ import annotations

from pathlib import Path

import click

from mergehub.hub.commands.common import not_both, note, progress_bars
from mergehub.storage.store import Store, default_root
from mergehub.units import human_bytes, parse_kmb, parse_size


@click.command(name="merge")
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

    not_both(ctx, "output", out, "OUT", "--output")
    not_both(ctx, "max_shard_size", out_shard_size, "--out-shard-size", "--max-shard-size")
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
                       output_format=output_format, progress=progress_bars(),
                       allow_foreign_base=allow_foreign_base,
                       echo=click.echo if dry_run else note,
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
