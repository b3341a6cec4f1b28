"""``hub push`` and ``hub pull``: store entries to and from the Hugging Face Hub (the work is
:mod:`mergehub.hub.remote`'s)."""

from __future__ import annotations

import click

from mergehub.hub.commands.common import open_store, progress_bars, summary
from mergehub.units import human_bytes


@click.command()
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

    with open_store(ctx) as store:
        result = push_entry(store, name, repo_id, revision=revision, private=private,
                            fmt=list(formats) or None, base_model=base_model, message=message,
                            subfolder=subfolder, progress=progress_bars())
    click.echo(f"pushed {name!r} to {result.repo_id}@{result.revision} as "
               f"{' + '.join(result.forms)}: {len(result.files)} files, "
               f"{human_bytes(result.bytes)}, commit {result.commit[:12]} ({result.url})")


@click.command()
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

    with open_store(ctx, create=True) as store:
        result = pull_model(store, repo, revision=revision, name=name, subfolder=subfolder,
                            base=base, progress=progress_bars())
    click.echo(f"pulled {result.repo_id}@{result.revision} (commit {result.commit[:12]}, "
               f"{result.form} form) as {summary(result.info)}")
