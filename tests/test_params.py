"""Tests for the typed params loader (`mlic.params`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlic import params
from mlic.params import Data, ParamsError, Preprocess, Split, flatten, load_section, read_params_file

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_section_gives_the_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "common:\n  seed: 1\n")
    assert load_section("preprocess", path) == Preprocess()
    assert load_section("split", path) == Split(val_fraction=0.15, test_fraction=0.15)
    assert load_section("common", path).seed == 1


def test_given_keys_override_and_the_rest_keep_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "preprocess:\n  image_size: 64\n  encoding: png\n")
    got = load_section("preprocess", path)
    assert (got.image_size, got.encoding) == (64, "png")
    assert (got.resize_mode, got.shard_size) == (Preprocess().resize_mode, Preprocess().shard_size)


def test_project_params_yaml_loads_every_section() -> None:
    raw = read_params_file(ROOT / "params.yaml")
    for name in params.SECTIONS:
        if name in raw:
            load_section(name, ROOT / "params.yaml", raw)  # raises on any unknown key or bad type


@pytest.mark.parametrize(
    "text, expected",
    [
        ("preprocess:\n  imagesize: 64\n", ["preprocess", "unknown key", "imagesize", "image_size"]),
        ("data:\n  clases: [a]\n", ["data", "unknown key", "clases", "classes"]),
    ],
    ids=["typo-in-preprocess", "typo-in-data"],
)
def test_unknown_key_is_rejected_naming_section_and_key(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = _write(tmp_path, text)
    section = expected[0]
    with pytest.raises(ParamsError) as err:
        load_section(section, path)
    for word in expected:
        assert word in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_section_name_is_rejected() -> None:
    with pytest.raises(ParamsError, match="unknown params section 'trian'"):
        load_section("trian", raw={})


@pytest.mark.parametrize(
    "section, text, expected",
    [
        ("split", "split:\n  val_fraction: 1e-3x\n", ["split.val_fraction", "expected a number", "'1e-3x'"]),
        ("split", "split:\n  val_fraction: true\n", ["split.val_fraction", "expected a number"]),
        ("preprocess", "preprocess:\n  image_size: 96.0\n", ["preprocess.image_size", "expected an integer"]),
        ("preprocess", "preprocess:\n  image_size: '96'\n", ["preprocess.image_size", "expected an integer"]),
        ("common", "common:\n  seed: true\n", ["common.seed", "expected an integer"]),
        ("data", "data:\n  skip_bad_images: 'yes'\n", ["data.skip_bad_images", "expected true or false"]),
        ("data", "data:\n  classes: a b\n", ["data.classes", "expected a list"]),
        ("data", "data:\n  classes: [a, 2]\n", ["data.classes[1]", "expected text"]),
        ("data", "data:\n  delimiter: 3\n", ["data.delimiter", "expected text"]),
        ("data", "data: [1, 2]\n", ["data", "expected a mapping"]),
        ("train", "train:\n  deterministic_ops: 'yes'\n", ["train.deterministic_ops", "'auto'", "true or false"]),
    ],
    ids=["text-for-float", "bool-for-float", "float-for-int", "string-for-int", "bool-for-int",
         "string-for-bool", "string-for-list", "int-in-list", "int-for-str", "list-for-section",
         "auto-or-bool"],
)
def test_wrong_type_is_rejected_with_a_hint(tmp_path: Path, section: str, text: str, expected: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ParamsError) as err:
        load_section(section, path)
    for word in expected:
        assert word in str(err.value)


@pytest.mark.parametrize("text, value", [
    ("1e-05", 1e-05), ("1e-4", 1e-4), ("1E3", 1000.0), ("+1.5e2", 150.0), ("2.5e-3", 0.0025),
    ("1.0e-5", 1e-05), ("0.001", 0.001), (".5", 0.5), ("2E+2", 200.0),
])
def test_numbers_read_as_yaml_1_2_and_dvc_read_them(tmp_path: Path, text: str, value: float) -> None:
    # PyYAML alone (YAML 1.1) reads an exponent without a dot as text: `dvc exp run -S
    # train.learning_rate=0.00001` writes 1e-05, and that was refused as "not a number".
    path = _write(tmp_path, f"train:\n  learning_rate: {text}\n")
    got = load_section("train", path).learning_rate
    assert got == value and type(got) is float
    assert read_params_file(path)["train"]["learning_rate"] == value


def test_what_dvc_writes_reads_back_as_the_same_number(tmp_path: Path) -> None:
    from ruamel.yaml import YAML  # what `dvc exp run -S` writes params.yaml with

    path = tmp_path / "params.yaml"
    values = {"learning_rate": 0.00001, "weight_decay": 1e-4, "finetune_learning_rate": 3e-7, "dropout": 0.25}
    with path.open("w", encoding="utf-8") as f:
        YAML().dump({"train": values}, f)
    assert "1e-05" in path.read_text()
    train = load_section("train", path)
    assert {k: getattr(train, k) for k in values} == values


@pytest.mark.parametrize("text", ["e5", "1e", "1e-", "1.2.3", "0x1p3", "1e5x"])
def test_what_is_no_number_stays_text(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, f"data:\n  tags_column: {text}\n")
    assert load_section("data", path).tags_column == text


def test_integers_stay_integers(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  epochs: 80\n  width: 1_6\n")
    train = load_section("train", path)
    assert (train.epochs, train.width) == (80, 16) and type(train.epochs) is int


@pytest.mark.parametrize(
    "text, expected",
    [
        ("split:\n  val_fraction: 1.0e-3\n", 0.001),
        ("split:\n  val_fraction: 0.001\n", 0.001),
    ],
)
def test_floats_are_accepted_and_ints_widen(tmp_path: Path, text: str, expected: float) -> None:
    got = load_section("split", _write(tmp_path, text)).val_fraction
    assert got == expected and isinstance(got, float)


def test_an_int_where_a_float_is_expected_widens(tmp_path: Path) -> None:
    got = load_section("calibrate", _write(tmp_path, "calibrate:\n  beta: 2\n")).beta
    assert got == 2.0 and isinstance(got, float)


@pytest.mark.parametrize(
    "text, words",
    [
        ("train:\n  dropout: 1.0\n", "train.dropout: 1.0 is out of range; allowed: [0.0, 1.0)"),
        ("preprocess:\n  shard_size: 0\n", "preprocess.shard_size: 0 is out of range; allowed: >= 1"),
        ("split:\n  val_fraction: 0\n", "split.val_fraction: 0.0 is out of range; allowed: (0.0, 1.0)"),
        ("split:\n  val_fraction: 0.5\n  test_fraction: 0.5\n", "leaves nothing to train on"),
        ("sample:\n  min_size: 64\n  max_size: 32\n", "max_size 32 is below min_size 64"),
        ("train:\n  learning_rate: 0\n", "train.learning_rate: 0.0 is out of range; allowed: > 0.0"),
        ("preprocess:\n  jpeg_quality: 100\n", "allowed: [1, 95]"),
        ("calibrate:\n  beta: -1\n", "calibrate.beta: -1.0 is out of range"),
        ("data:\n  max_image_pixels: 0\n", "data.max_image_pixels: 0 is out of range; allowed: >= 1"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(tmp_path: Path, text: str, words: str) -> None:
    section = text.split(":", 1)[0]
    with pytest.raises(ParamsError) as err:
        load_section(section, _write(tmp_path, text))
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["lr-dropout", "s", "Batch_size.2", "a" * 40])
def test_a_sweep_name_is_accepted(tmp_path: Path, name: str) -> None:
    assert load_section("tracking", _write(tmp_path, f"tracking:\n  sweep: '{name}'\n")).sweep == name


@pytest.mark.parametrize(
    "value, words",
    [
        ("'lr dropout'", "tracking: sweep 'lr dropout' is not a sweep name; use a letter, then up to 39"),
        ("\"it's\"", "is not a sweep name"),        # a quote would break the UI filter
        ("'-x'", "is not a sweep name"),            # would read as an option on a command line
        ("'a/b'", "is not a sweep name"),
        ("''", "is not a sweep name"),
        ("'" + "a" * 41 + "'", "is not a sweep name"),
        ("2024", "tracking.sweep: expected text, got 2024"),   # what `-S tracking.sweep=2024` writes
    ],
)
def test_a_bad_sweep_name_is_one_clear_line(tmp_path: Path, value: str, words: str) -> None:
    with pytest.raises(ParamsError) as err:
        load_section("tracking", _write(tmp_path, f"tracking:\n  sweep: {value}\n"))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_misspelled_section_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"unknown section\(s\) 'trian' \(did you mean 'train'\?\)"):
        load_section("train", _write(tmp_path, "trian:\n  epochs: 3\n"))


def test_the_shipped_params_file_is_valid_whole() -> None:
    from mlic.params import SECTIONS

    for name in SECTIONS:
        load_section(name, ROOT / "params.yaml")


@pytest.mark.parametrize(
    "key, value, ok",
    [
        ("resize_mode", "squash", True),
        ("resize_mode", "crop", True),
        ("resize_mode", "pad", True),
        ("resize_mode", "stretch", False),
        ("encoding", "png", True),
        ("encoding", "webp", False),
        ("encoding", "JPEG", False),  # Literal values are case-sensitive
    ],
)
def test_literal_values_are_checked(tmp_path: Path, key: str, value: str, ok: bool) -> None:
    path = _write(tmp_path, f"preprocess:\n  {key}: {value}\n")
    if ok:
        assert getattr(load_section("preprocess", path), key) == value
    else:
        with pytest.raises(ParamsError) as err:
            load_section("preprocess", path)
        assert f"preprocess.{key}" in str(err.value)
        assert repr(value) in str(err.value) and "use one of" in str(err.value)


def test_data_format_literal_and_nullable_classes(tmp_path: Path) -> None:
    got = load_section("data", _write(tmp_path, "data:\n  format: tags\n  classes: null\n"))
    assert got == Data(format="tags", classes=None)
    with pytest.raises(ParamsError, match="'csv' is not allowed"):
        load_section("data", _write(tmp_path, "data:\n  format: csv\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "expected a mapping of sections"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("common: [\n", "not valid YAML"),
    ],
)
def test_unusable_file_is_rejected(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        read_params_file(_write(tmp_path, text))


def test_missing_file_says_where_to_run(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found; run from the project root"):
        read_params_file(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({}, {}),
        ({"a": 1}, {"a": 1}),
        ({"train": {"lr": 0.1, "epochs": 2}}, {"train.lr": 0.1, "train.epochs": 2}),
        ({"a": {"b": {"c": None}}, "d": [1, 2]}, {"a.b.c": None, "d": [1, 2]}),
        ({"data": {"classes": ["x", "y"]}}, {"data.classes": ["x", "y"]}),
    ],
)
def test_flatten_gives_dotted_keys(raw: dict, expected: dict) -> None:
    assert flatten(raw) == expected
