"""mergehub: keep, compress, merge and ship the fine-tunes and adapters of one base model.

The Python API mirrors the ``hub`` command line::

    from mergehub import Store
    store = Store.init("/tmp/store")
    store.add("path/to/base", name="base")
    store.add("path/to/finetune", name="ft", base="base")
    store.export("ft", "out/")
    mergehub.merge("recipe.yaml", out="merged/", store=store)   # mergekit-style YAML recipe
"""

__version__ = "0.1.0"

from mergehub.errors import MergehubError  # noqa: E402
from mergehub.storage.checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from mergehub.storage.store import ModelInfo, Store  # noqa: E402
import mergehub.merge  # noqa: E402,F401  (callable: mergehub.merge(recipe, out=...))

__all__ = ["Checkpoint", "MergehubError", "ModelInfo", "Store", "__version__", "open_checkpoint"]
