"""Python's cyclic garbage collector, paused while the worker imports its libraries, then told to skip them.

Importing torch and transformers creates about 600,000 objects that live as long as the process: modules,
functions, classes. The collector counts allocations and, every so often, walks every tracked object to
look for unreachable cycles; during those imports it walks the ever-growing heap again and again and finds
next to nothing. Paused, the worker's imports were done 2.05 s after process start instead of 2.99 s on the
2-core benchmark machine (`make bench-coldstart`), and the process held 8 MB more: the few cycles the
imports leave behind.

After the imports, `gc.freeze()` moves everything alive into a permanent generation that later collections
skip, so the collections that run while loading and serving walk the objects those create, not the
libraries. The pause ends before any weights exist: a frozen cycle is never freed, and one holding a tensor
would hold its memory for good.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection inside; then the survivors are frozen and collection resumes as it was.
    Reference counting still frees everything else at once, tensors included."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
