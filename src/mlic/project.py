"""Point a clone of mlic at the user's own data: `mlic init --labels CSV --images DIR`.

Writes the `data` section of params.yaml (the labels CSV, the images folder, the CSV's format)
and takes the `sample` stage out of dvc.yaml, where it only makes the built-in sample; both files
keep their comments and layout (ruamel.yaml, the library DVC itself edits them with). Before
anything is written the labels are read and checked as `split` checks them (`labels.read_labels`:
every row, every image decoded), so a wrong file is found now, with the CSV line to fix, and
nothing changes until the data can be used.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mlic.atomic import atomic_open
from mlic.errors import UserError
from mlic.labels import LabelTable, read_header, read_labels
from mlic.params import Data, load_section

SAMPLE_STAGE = "sample"


def _yaml(null: str) -> Any:
    """A round-trip YAML that writes None as `null` (params.yaml's way) or "" (dvc.yaml's)."""
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments, order and quoting stay as they were
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long comment line
    yaml.indent(mapping=2, sequence=4, offset=2)  # the files' own style: "  - item" under its key
    from ruamel.yaml.representer import RoundTripRepresenter

    # add_representer registers on the class: a subclass of its own, so the two styles never mix.
    representer = type("Representer", (RoundTripRepresenter,), {})
    representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", null))
    yaml.Representer = representer
    return yaml


def project_path(root: Path, given: str | Path, what: str) -> str:
    """`given` as a POSIX path relative to the project `root`; outside the project is refused
    (DVC tracks, and the pipeline's deps name, files inside it)."""
    path = (root / given).resolve() if not Path(given).is_absolute() else Path(given).resolve()
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise UserError(f"{what} {given} is outside the project {root}: move or copy it under data/ "
                        "(DVC tracks files inside the project), then run mlic init again") from None


def detect_format(header: list[str], filename_column: str, tags_column: str) -> str:
    """`tags` when the CSV is a filename column and the tags column, else `onehot`."""
    return "tags" if sorted(header) == sorted([filename_column, tags_column]) else "onehot"


@dataclasses.dataclass(frozen=True)
class InitResult:
    data: dict[str, Any]      # the data params written
    labels: LabelTable        # what split will read
    skipped: int              # rows whose image is unusable (data.skip_bad_images)
    sample_removed: bool      # the sample stage was in dvc.yaml and is gone


def init_project(root: Path, labels_csv: str | Path, images_dir: str | Path, *, fmt: str = "auto",
                 tags_column: str | None = None, delimiter: str | None = None,
                 filename_column: str | None = None, skip_bad_images: bool | None = None) -> InitResult:
    """Check the user's labels and images, then point params.yaml at them and drop the sample stage.

    Raises `labels.LabelError` (every problem, with its CSV line) or UserError before writing anything.
    """
    params_file, dvc_file = root / "params.yaml", root / "dvc.yaml"
    current: Data = load_section("data", params_file)
    csv_rel, images_rel = project_path(root, labels_csv, "--labels"), project_path(root, images_dir, "--images")
    settings = {"filename_column": filename_column or current.filename_column,
                "tags_column": tags_column or current.tags_column,
                "delimiter": delimiter if delimiter is not None else current.delimiter,
                "skip_bad_images": current.skip_bad_images if skip_bad_images is None else skip_bad_images}
    if fmt == "auto":
        fmt = detect_format(read_header(root / csv_rel), settings["filename_column"], settings["tags_column"])
    data = {"labels_csv": csv_rel, "images_dir": images_rel, "format": fmt, **settings}
    spec = dataclasses.replace(current, **{**data, "labels_csv": str(root / csv_rel),
                                           "images_dir": str(root / images_rel)})
    table, skipped = read_labels(spec)

    params_yaml, dvc_yaml = _yaml("null"), _yaml("")
    params = params_yaml.load(params_file.read_text(encoding="utf-8"))
    for key, value in data.items():
        params["data"][key] = value
    pipeline = dvc_yaml.load(dvc_file.read_text(encoding="utf-8"))
    removed = SAMPLE_STAGE in pipeline["stages"]
    if removed:
        del pipeline["stages"][SAMPLE_STAGE]
    for path, doc, yaml in ((params_file, params, params_yaml), (dvc_file, pipeline, dvc_yaml)):
        with atomic_open(path, "w", encoding="utf-8") as f:
            yaml.dump(doc, f)
    return InitResult(data=data, labels=table, skipped=len(skipped), sample_removed=removed)


def next_steps(result: InitResult) -> list[str]:
    """The commands to run after `mlic init`: version the data with DVC, commit, run."""
    data = [result.data["images_dir"], result.data["labels_csv"]]
    ignores = dict.fromkeys(f"{Path(p).parent.as_posix()}/.gitignore" for p in data)
    return [f"dvc add {' '.join(data)}",
            f"git add {' '.join(f'{p}.dvc' for p in data)} {' '.join(ignores)} params.yaml dvc.yaml",
            "dvc repro"]
