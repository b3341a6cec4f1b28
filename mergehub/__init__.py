"""mergehub: keep, compress, merge and ship the fine-tunes and adapters of one base model.

The Python API mirrors the ``hub`` command line::

    from mergehub import Store
    store = Store.init("/tmp/store")
    store.add("path/to/base", name="base")
    store.add("path/to/finetune", name="ft", base="base")
    store.export("ft", "out/")
    mergehub.merge("recipe.yaml", out="merged/", store=store)   # mergekit-style YAML recipe
    model = mergehub.load("ft", store, device="cuda")            # a live transformers model
    composer = mergehub.Composer(model)                           # apply / reset recipes on it
"""

__version__ = "0.1.0"

from mergehub.errors import MergehubError  # noqa: E402
from mergehub.storage.checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from mergehub.storage.store import ModelInfo, Store  # noqa: E402
import mergehub.merge  # noqa: E402,F401  (callable: mergehub.merge(recipe, out=...))

__all__ = ["Checkpoint", "Composer", "MergehubError", "ModelInfo", "Store", "__version__", "load",
           "open_checkpoint"]


def __getattr__(name: str) -> object:
    """``mergehub.load`` and ``mergehub.Composer``, imported on first use (they import
    transformers, which ``import mergehub`` should not)."""
    if name == "load":
        from mergehub.loading import load

        return load
    if name == "Composer":
        from mergehub.compose import Composer

        return Composer
    raise AttributeError(f"module 'mergehub' has no attribute {name!r}")
