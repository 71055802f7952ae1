"""Fingerprints of mlic's own source code: what a saved state or a study is valid for.

No TensorFlow here: `tune` (which must start without it) and `resume` both hash their modules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def source_fingerprint(modules: Iterable[str]) -> str:
    """SHA-256 over the source files of the named mlic modules, in the order given."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in modules:
        digest.update((here / f"{name}.py").read_bytes())
    return digest.hexdigest()
