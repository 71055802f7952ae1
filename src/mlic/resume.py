"""Resume an interrupted `train` at its last completed epoch, with the same results.

After every epoch `training.fit` saves what the rest of the run depends on into
`.mlic/train-resume/<key>/epoch-NNNN/`: every model variable (weights, BatchNorm statistics,
the dropout seed-generator state), the optimizer's variables (its step
count drives the cosine schedule), the history rows so far, the phase, which phases stopped
early, the best checkpoint and its monitored value, and EarlyStopping's counters. The next
`train` with the same key restores all of it and continues at the following epoch. Together
with epoch-keyed shuffling (`dataset.epoch_seeds`) a resumed run ends, on CPU with
`deterministic_ops`, with the same history, metrics and model as one that never stopped.

The key hashes the `train` params, `common.seed`, the train/val data fingerprints, the code of
the modules that shape an epoch (`CODE`) and the Keras/TensorFlow versions: a state saved for
other params, data or code is never loaded (another folder under `.mlic/train-resume/` is
ignored), and one whose variables do not fit the model is refused with a warning. `.mlic/` is outside git and DVC.
Each epoch's folder is written under a temp name and renamed into place, and the previous
one is removed only after that, so a kill at any moment leaves a complete state or the one
before. A successful `train` removes `.mlic/train-resume/` (`Resume.clear`).

Not saved: Python/NumPy global RNG state (nothing in training draws from it after the model
is built) and the Keras progress bar. Under a MirroredStrategy the variables are saved and
restored as mirrored values (tested only on CPU without a strategy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mlic.sources import source_fingerprint

log = logging.getLogger(__name__)

RESUME_ROOT = Path(".mlic") / "train-resume"
STATE_FILE, ARRAYS_FILE, BEST_FILE = "state.json", "variables.npz", "best.keras"
_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")


# The modules whose code decides what an epoch does: a state saved by other code is not resumed
# (DVC re-runs train when they change; finishing with the old code's epochs would not reproduce).
CODE = ("augment", "dataset", "devices", "losses", "model", "resume", "tfrecords", "training")


def code_fingerprint() -> str:
    return source_fingerprint(CODE)


def resume_key(train: Mapping[str, Any], seed: int, fingerprints: Mapping[str, str]) -> str:
    """What a saved state is valid for: train params (but `resume` itself), seed, data, code, versions."""
    payload = {
        "train": {k: v for k, v in train.items() if k != "resume"},
        "seed": seed,
        "data": dict(fingerprints),
        "code": code_fingerprint(),
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass
class State:
    """A training as it stood at the end of epoch `epochs_done` (counted from 1, over all phases)."""

    epochs_done: int
    phase: str                          # the phase of that epoch
    rows: list[dict[str, Any]]          # history rows (epoch, logs..., phase), one per epoch so far
    stopped: list[str]                  # phases EarlyStopping ended before their last epoch
    best: float | None                  # ModelCheckpoint's best monitored value (None: nothing saved yet)
    early_stopping: dict[str, Any] | None  # EarlyStopping's wait/best/best_epoch in `phase`
    model_variables: list[np.ndarray]
    optimizer_variables: list[np.ndarray]  # of `phase`'s optimizer
    best_file: Path | None              # the best checkpoint so far, a .keras file


def _shapes(arrays: list[np.ndarray]) -> list[list[int]]:
    return [list(np.shape(a)) for a in arrays]


def _values(variables: list[Any]) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def assign(variables: list[Any], values: list[np.ndarray], what: str) -> None:
    """Assign saved `values` to `variables` in order; the shapes must match one for one."""
    if _shapes(_values(variables)) != _shapes(values):
        raise ValueError(f"saved {what} do not match this model ({len(values)} saved, {len(variables)} here)")
    for var, value in zip(variables, values, strict=True):
        var.assign(value)


class Resume:
    """The resume folder of one key: `save` after each epoch, `load` at start, `clear` on success."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._last: Path | None = None     # the epoch folder this process last saved or loaded
        self._last_best: float | None = None

    @classmethod
    def for_run(cls, train: Mapping[str, Any], seed: int, fingerprints: Mapping[str, str],
                root: str | Path = RESUME_ROOT) -> Resume:
        return cls(Path(root) / resume_key(train, seed, fingerprints))

    def _epoch_dirs(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _EPOCH_DIR.match(p.name))]
        return sorted(found)

    def load(self) -> State | None:
        """The latest complete state of this key, or None (nothing saved, or unreadable: logged)."""
        others = [p for p in self.folder.parent.glob("*") if p.is_dir() and p != self.folder]
        if others:
            log.info("ignoring %d resume state(s) saved for other params or data in %s",
                     len(others), self.folder.parent)
        dirs = self._epoch_dirs()
        if not dirs:
            return None
        _, path = dirs[-1]
        try:
            meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
            with np.load(path / ARRAYS_FILE) as arrays:
                model_vars = [arrays[f"model_{i}"] for i in range(meta["n_model"])]
                opt_vars = [arrays[f"optimizer_{i}"] for i in range(meta["n_optimizer"])]
        except (OSError, ValueError, KeyError) as exc:  # a state from another mlic version, say
            log.warning("cannot read the resume state %s (%s); training from the start", path, exc)
            return None
        best_file = path / BEST_FILE
        self._last, self._last_best = path, meta["best"]
        return State(epochs_done=meta["epochs_done"], phase=meta["phase"], rows=meta["rows"],
                     stopped=meta["stopped"], best=meta["best"], early_stopping=meta["early_stopping"],
                     model_variables=model_vars, optimizer_variables=opt_vars,
                     best_file=best_file if best_file.is_file() else None)

    def save(self, model: keras.Model, *, epochs_done: int, phase: str, rows: list[dict[str, Any]],
             stopped: list[str], best: float | None, early_stopping: dict[str, Any] | None,
             checkpoint: Path, optimizer: keras.optimizers.Optimizer | None = None) -> None:
        """Save the state at the end of an epoch: a new epoch folder, renamed in whole, then the old one goes.

        `optimizer`: the one training `model` when another model fits it (default `model.optimizer`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"epoch-{epochs_done:04d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=self.folder))
        try:
            model_vars = _values(model.variables)
            optimizer = optimizer if optimizer is not None else model.optimizer
            opt_vars = _values(optimizer.variables) if optimizer is not None else []
            np.savez(tmp / ARRAYS_FILE, **{f"model_{i}": v for i, v in enumerate(model_vars)},
                     **{f"optimizer_{i}": v for i, v in enumerate(opt_vars)})
            meta = {"epochs_done": epochs_done, "phase": phase, "rows": rows, "stopped": stopped,
                    "best": best, "early_stopping": early_stopping,
                    "n_model": len(model_vars), "n_optimizer": len(opt_vars)}
            (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=_json_number), encoding="utf-8")
            if checkpoint.is_file():
                previous = None if self._last is None else self._last / BEST_FILE
                if best == self._last_best and previous is not None and previous.is_file():
                    _link_or_copy(previous, tmp / BEST_FILE)  # not improved: the same file as before
                else:
                    shutil.copyfile(checkpoint, tmp / BEST_FILE)
            for f in tmp.iterdir():  # on disk before the rename makes the folder count
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)  # only if this epoch was saved before a kill
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._last, self._last_best = final, best
        for _, old in self._epoch_dirs():  # older epochs, and temp folders of killed saves
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        for stray in self.folder.glob(".epoch-*.tmp"):
            shutil.rmtree(stray, ignore_errors=True)

    def clear(self) -> None:
        """Remove the resume folder of this key and any stale siblings: the training is done."""
        root = self.folder.parent
        if root.is_dir():
            shutil.rmtree(root, ignore_errors=True)


def _json_number(value: Any) -> Any:
    """NumPy scalars in Keras logs as JSON numbers (a float64 holds any float32 exactly)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot save {type(value).__name__} in the resume state")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
