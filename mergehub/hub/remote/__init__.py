"""Push store entries to, and pull models from, the Hugging Face Hub (``hub push`` / ``hub pull``).

Built on ``huggingface_hub.HfApi``; the endpoint and the token come the standard way
(``HF_ENDPOINT``, ``HF_TOKEN``, ``hf auth login``), or as arguments. The token is only ever
handed to ``huggingface_hub``: it is never printed, logged, stored in provenance or put in an
error message (messages are also scrubbed of it, in case a server echoes it).

A model goes into a repo in one or more *forms* (see ``docs/hub.md``):

* ``peft``: a PEFT adapter's own files at the repo root (``adapter_config.json``,
  ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained(base, repo_id)``;
* ``hf``: an HF model's own files (safetensors shards and index, config, tokenizer files, and
  every other file at any depth, such as a sentence-transformers model's ``1_Pooling/``), as
  they were added, loadable with ``AutoModel.from_pretrained(repo_id)``;
* ``mergehub``: the entry's own stored blobs under ``mergehub/blobs/<id>`` (a compressed delta
  stays compressed), which ``pull`` puts back into a store that holds the same base without
  decoding anything.

Every push also writes ``mergehub/manifest.json`` (kind, base name and fingerprint, files,
tensors and the sha256 of their bytes, codec, metrics, provenance) and a model card,
``README.md``, in one commit: all files or none. A pull verifies every downloaded file against
the hash the server reports for it (sha256 for LFS files, the git blob id for others) and
against the manifest before anything is added to the store; downloads go to
``STORE/transfers/pull-<repo>--<commit>/`` and an interrupted pull picks up where it stopped.

The parts: :mod:`~mergehub.hub.remote.pushing`, :mod:`~mergehub.hub.remote.pulling`, the model
card :mod:`~mergehub.hub.remote.card`, and the repo layout and hash checks they share,
:mod:`~mergehub.hub.remote.repo`.
"""

from mergehub.hub.remote.card import model_card
from mergehub.hub.remote.pulling import PullResult, pull
from mergehub.hub.remote.pushing import PushResult, push
from mergehub.hub.remote.repo import BLOBS, CARD, FORMS, MANIFEST, SHADOW

__all__ = ["BLOBS", "CARD", "FORMS", "MANIFEST", "SHADOW", "PullResult", "PushResult",
           "model_card", "pull", "push"]
