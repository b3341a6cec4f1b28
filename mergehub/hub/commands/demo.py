"""``hub demo``: every verb on a tiny random model, in a store of its own."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--keep", type=click.Path(path_type=Path), default=None,
              help="Build the demo in this directory and keep it (default: a temp dir, removed).")
def demo(keep: Path | None) -> None:
    """Show every verb on a tiny random Llama, in a store of its own (not --store): add two
    fine-tune-like variants and a LoRA against the base and show the savings, export each and
    check it bit for bit, TIES-merge three of them into the store, compress one with ComPEFT,
    train a LoRA on a synthetic task, and verify the store."""
    from mergehub.hub.demo import run_demo

    run_demo(keep, echo=click.echo)
