"""Progress bars: on a terminal only, and one at a time.

Every function with a ``progress`` argument takes ``None`` (the default: a bar only when stderr
is a terminal, so logs and pipes get none), ``True`` (always, e.g. in a notebook, whose stderr
is not a terminal) or ``False`` (never). The bars of the libraries mergehub drives
(huggingface_hub's downloads and uploads, transformers' loading and saving) would otherwise
appear regardless, nested in or between mergehub's own: :func:`library_bars` decides them the
same way for the length of an operation.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` argument (tqdm's ``None`` is its own terminal
    test on the bar's stream)."""
    return None if progress is None else not progress


def bar_shown(progress: bool | None) -> bool:
    """Whether a bar of ``progress`` shows on stderr."""
    return sys.stderr.isatty() if progress is None else progress


@contextlib.contextmanager
def library_bars(progress: bool | None) -> Iterator[None]:
    """Show the progress bars of huggingface_hub and of transformers (which keeps a switch of
    its own) inside the block only as ``progress`` says; their previous state comes back
    afterwards."""
    from huggingface_hub import utils as hf
    from transformers.utils import logging as tf

    was = hf.are_progress_bars_disabled(), tf.is_progress_bar_enabled()
    on = bar_shown(progress)
    (hf.enable_progress_bars if on else hf.disable_progress_bars)()
    (tf.enable_progress_bar if on else tf.disable_progress_bar)()
    try:
        yield
    finally:
        (tf.enable_progress_bar if was[1] else tf.disable_progress_bar)()
        (hf.disable_progress_bars if was[0] else hf.enable_progress_bars)()
