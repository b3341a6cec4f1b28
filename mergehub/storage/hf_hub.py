"""The Hugging Face Hub client as mergehub talks to it: one place that builds the API object,
resolves a revision to a commit, and turns ``huggingface_hub`` and HTTP errors into one-line
:class:`~mergehub.errors.RemoteError` messages with the token blanked out. ``hub push`` /
``hub pull`` (:mod:`mergehub.hub.remote`) and merge inputs on the Hub
(:mod:`mergehub.storage.hub_inputs`) both use it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from mergehub.errors import MergehubError, RemoteError

if TYPE_CHECKING:
    from huggingface_hub import HfApi

#: a repo id: ORG/NAME
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def split_repo_ref(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; no ``@`` -> ``revision`` (default
    ``None``). A revision both after ``@`` and in ``revision`` must be the same one."""
    repo_id, sep, at = ref.partition("@")
    if not REPO_ID.match(repo_id) or (sep and not at):
        raise RemoteError(f"{ref!r} is not a repo id of the form ORG/NAME[@REVISION]")
    if at and revision and at != revision:
        raise RemoteError(f"{ref!r}: revision {at!r} after '@' and {revision!r} given as well: "
                          "give one")
    return repo_id, at or revision or None


def hub_api(endpoint: str | None, token: str | None) -> "HfApi":
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


def public_endpoint(api: "HfApi") -> str:
    """The endpoint URL without any ``user:password@`` part."""
    parts = urlsplit(api.endpoint)
    if parts.username is None and parts.password is None:
        return api.endpoint
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


def _scrub(text: str, api: "HfApi") -> str:
    """``text`` with the token in use (argument, HF_TOKEN or saved login) blanked out."""
    from huggingface_hub import get_token

    for secret in {api.token if isinstance(api.token, str) else None, get_token()}:
        if secret:
            text = text.replace(secret, "***")
    return text


@contextlib.contextmanager
def hub_errors(api: "HfApi", what: str, *, writing: bool = False) -> Iterator[None]:
    """Turn ``huggingface_hub`` / HTTP exceptions into one-line :class:`RemoteError`\\ s."""
    from huggingface_hub.errors import (  # HTTPError: the base error of the HTTP client it uses
        EntryNotFoundError, HfHubHTTPError, HTTPError, RepositoryNotFoundError,
        RevisionNotFoundError)

    where = public_endpoint(api)
    try:
        yield
    except MergehubError:
        raise
    except RevisionNotFoundError:
        raise RemoteError(_scrub(f"{what}: revision not found on {where}", api)) from None
    except EntryNotFoundError:
        raise RemoteError(_scrub(f"{what}: file not found on {where}", api)) from None
    except RepositoryNotFoundError as e:
        status = e.response.status_code if e.response is not None else None
        if writing and status in (401, 403):
            raise RemoteError(_scrub(_no_write(what, where, status), api)) from None
        raise _not_found(what, api) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise RemoteError(_scrub(_no_write(what, where, status) if writing else
                                     f"{what}: access denied by {where} (HTTP {status})",
                                     api)) from None
        detail = (e.server_message or str(e)).strip().splitlines()
        raise RemoteError(_scrub(f"{what}: {where} answered HTTP {status}: "
                                 f"{detail[0] if detail else ''}", api)) from None
    except (HTTPError, OSError, ValueError, RuntimeError) as e:  # unreachable, malformed answers
        cause = e.__cause__ or e
        raise RemoteError(_scrub(f"{what}: {type(cause).__name__}: {cause} ({where})",
                                 api)) from None


def _not_found(what: str, api: "HfApi") -> RemoteError:
    return RemoteError(_scrub(f"{what}: repository not found on {public_endpoint(api)} (or not "
                              "visible with your token; check the name, `hf auth login` or "
                              "HF_TOKEN)", api))


def _no_write(what: str, where: str, status: int) -> str:
    return (f"{what}: no write permission on {where} (HTTP {status}): log in with "
            "`hf auth login` or set HF_TOKEN to a token with write access")


def resolve_revision(api: "HfApi", repo_id: str, revision: str | None) -> tuple[str, str]:
    """``(revision name, commit sha)``; clear errors for a missing repo or revision."""
    from huggingface_hub.errors import HfHubHTTPError

    with hub_errors(api, repo_id):
        try:
            refs = api.list_repo_refs(repo_id)
        except HfHubHTTPError as e:  # servers answer 401, 403 or 404 for a repo not there
            if e.response is not None and e.response.status_code in (401, 403, 404):
                raise _not_found(repo_id, api) from None
            raise
    revision = revision or "main"
    names = {r.name: r.target_commit for r in [*refs.branches, *refs.tags]}
    if revision in names:
        return revision, names[revision]
    known = ", ".join(sorted(names)) or "none"
    missing = RemoteError(f"{repo_id}: revision {revision!r} not found (branches and tags: "
                          f"{known})")
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        raise missing
    with hub_errors(api, f"{repo_id}@{revision}"):
        try:
            next(iter(api.list_repo_tree(repo_id, revision=revision)), None)
        except HfHubHTTPError as e:  # the repo is there: 401/404 mean no such commit
            if e.response is not None and e.response.status_code in (401, 404):
                raise missing from None
            raise
    return revision, revision
