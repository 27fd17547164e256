"""Unit tests for inferbus.repository: model configs and model repositories."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inferbus.errors import ConfigError
from inferbus.repository import (
    CONFIG_FILE,
    DEFAULT_MAX_REQUEST_BYTES,
    ModelConfig,
    load_model_config,
    load_repository,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_MODELS = ROOT / "examples" / "models"
TEST_MODELS = ROOT / "tests" / "models"


def write_model(
    folder: Path,
    config: str | bytes,
    model_file: str | None = "model.onnx",
) -> Path:
    """A model folder with ``config`` as its config.toml and an empty dummy model file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONFIG_FILE
    if isinstance(config, bytes):
        path.write_bytes(config)
    else:
        path.write_text(config, encoding="utf-8")
    if model_file is not None:
        (folder / model_file).write_bytes(b"not really onnx")
    return folder


# ------------------------------------------------------------------------ shipped repositories


def test_example_repository() -> None:
    configs = load_repository(EXAMPLE_MODELS)
    assert [(c.name, c.version) for c in configs] == [("digits", 1)]
    (digits,) = configs
    assert digits.max_batch_size == 64
    assert digits.instances == 1
    assert digits.engine == "onnxruntime"
    assert digits.directory == (EXAMPLE_MODELS / "digits").resolve()
    assert digits.path == digits.directory / "model.onnx"
    assert digits.path.is_file()


def test_test_repository() -> None:
    configs = load_repository(TEST_MODELS)
    keys = [(c.name, c.version) for c in configs]
    assert keys == sorted(keys)
    assert ("echo", 1) in keys
    assert ("slow", 1) in keys
    assert ("failing", 1) in keys
    add = [c for c in configs if c.name == "add"]
    assert [c.version for c in add] == [1, 2]
    assert [c.directory.name for c in add] == ["add_v1", "add_v2"]
    assert all(c.path.is_file() for c in configs)
    assert all(c.directory.is_absolute() for c in configs)
    slow = next(c for c in configs if c.name == "slow")
    assert slow.engine_class == "slow_engine.py:SlowEngine"
    assert slow.max_batch_size == 8


@pytest.mark.parametrize(("folder", "version"), [("add_v1", 1), ("add_v2", 2)])
def test_named_model_in_differently_named_folder(folder: str, version: int) -> None:
    config = load_model_config(TEST_MODELS / folder)
    assert config.name == "add"
    assert config.version == version
    assert config.directory == (TEST_MODELS / folder).resolve()


# ------------------------------------------------------------------------------- good configs


def test_defaults_when_keys_absent(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "my_model-2", "# nothing but a comment\n")
    config = load_model_config(folder)
    assert config == ModelConfig(
        name="my_model-2",
        directory=folder.resolve(),
        version=1,
        engine="onnxruntime",
        file="model.onnx",
        max_batch_size=1,
        max_queue_delay_ms=0.0,
        instances=1,
        engine_class=None,
        max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
        description="",
    )
    assert DEFAULT_MAX_REQUEST_BYTES == 512 * 1024 * 1024
    assert config.path == folder.resolve() / "model.onnx"


def test_every_key_set(tmp_path: Path) -> None:
    folder = write_model(
        tmp_path / "folder",
        """
        name = "custom"
        version = 7
        engine = "other"
        file = "weights.bin"
        max_batch_size = 32
        max_queue_delay_ms = 2.5
        instances = 64
        engine_class = "pre.py:Pre"
        max_request_bytes = 1024
        description = "a model"
        """,
        model_file="weights.bin",
    )
    config = load_model_config(folder)
    assert config == ModelConfig(
        name="custom",
        directory=folder.resolve(),
        version=7,
        engine="other",
        file="weights.bin",
        max_batch_size=32,
        max_queue_delay_ms=2.5,
        instances=64,
        engine_class="pre.py:Pre",
        max_request_bytes=1024,
        description="a model",
    )
    assert config.path == folder.resolve() / "weights.bin"


@pytest.mark.parametrize(
    ("line", "attribute", "value"),
    [
        ("max_queue_delay_ms = 5", "max_queue_delay_ms", 5),
        ("max_queue_delay_ms = 0.0", "max_queue_delay_ms", 0.0),
        ("version = 123456", "version", 123456),
        ("instances = 1", "instances", 1),
        ("max_request_bytes = 1", "max_request_bytes", 1),
        ('name = "A-Z_09"', "name", "A-Z_09"),
        ('description = "ünïcode ✓"', "description", "ünïcode ✓"),
    ],
)
def test_accepted_values(tmp_path: Path, line: str, attribute: str, value: object) -> None:
    config = load_model_config(write_model(tmp_path / "m", line + "\n"))
    assert getattr(config, attribute) == value


def test_model_file_in_subfolder(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", 'file = "sub/model.onnx"\n', model_file=None)
    (folder / "sub").mkdir()
    (folder / "sub" / "model.onnx").write_bytes(b"x")
    assert load_model_config(folder).path == folder.resolve() / "sub" / "model.onnx"


# -------------------------------------------------------------------------------- bad configs


BAD_CONFIGS: dict[str, tuple[str, str]] = {
    "invalid-toml": ("version = \n", "not valid TOML"),
    "invalid-toml-unclosed-string": ('name = "add\n', "not valid TOML"),
    "invalid-toml-duplicate-key": ("version = 1\nversion = 2\n", "not valid TOML"),
    "unknown-key-typo": ("max_batchsize = 8\n", "unknown keys ['max_batchsize']"),
    "unknown-key-table": ("[model]\nversion = 1\n", "unknown keys ['model']"),
    "unknown-key-directory": ('directory = "/tmp"\n', "unknown keys ['directory']"),
    "version-string": ('version = "1"\n', "version must be int"),
    "version-bool": ("version = true\n", "version must be int"),
    "version-float": ("version = 1.0\n", "version must be int"),
    "version-array": ("version = [1]\n", "version must be int"),
    "name-int": ("name = 5\n", "name must be str"),
    "max-batch-size-string": ('max_batch_size = "8"\n', "max_batch_size must be int"),
    "max-batch-size-float": ("max_batch_size = 8.0\n", "max_batch_size must be int"),
    "instances-bool": ("instances = true\n", "instances must be int"),
    "queue-delay-string": ('max_queue_delay_ms = "5"\n', "max_queue_delay_ms must be int or float"),
    "queue-delay-bool": ("max_queue_delay_ms = false\n", "max_queue_delay_ms must be"),
    "engine-class-int": ("engine_class = 1\n", "engine_class must be str"),
    "file-table": ("file = { path = 'x' }\n", "file must be str"),
    "description-date": ("description = 2024-01-01\n", "description must be str"),
    "version-zero": ("version = 0\n", "version must be >= 1"),
    "version-negative": ("version = -3\n", "version must be >= 1"),
    "max-batch-size-zero": ("max_batch_size = 0\n", "max_batch_size must be >= 1"),
    "max-batch-size-negative": ("max_batch_size = -1\n", "max_batch_size must be >= 1"),
    "instances-zero": ("instances = 0\n", "instances must be between 1 and 64"),
    "instances-too-many": ("instances = 65\n", "instances must be between 1 and 64"),
    "queue-delay-negative": ("max_queue_delay_ms = -0.5\n", "max_queue_delay_ms must be >= 0"),
    "max-request-bytes-zero": ("max_request_bytes = 0\n", "max_request_bytes must be >= 1"),
    "name-dot": ('name = "a.b"\n', "'a.b'"),
    "name-empty": ('name = ""\n', "model name ''"),
    "name-space": ('name = "a b"\n', "model name 'a b'"),
    "name-star": ('name = "a*"\n', "model name 'a*'"),
    "name-greater": ('name = "a>"\n', "model name 'a>'"),
    "name-slash": ('name = "a/b"\n', "model name 'a/b'"),
    "name-non-ascii": ('name = "modèle"\n', "model name 'modèle'"),
    "name-trailing-newline": ('name = "add\\n"\n', "model name 'add\\n'"),
    "name-leading-newline": ('name = "\\nadd"\n', "model name"),
    "missing-model-file": ('file = "missing.onnx"\n', "model file 'missing.onnx' not found"),
}


@pytest.mark.parametrize(("text", "fragment"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_raises_config_error(tmp_path: Path, text: str, fragment: str) -> None:
    folder = write_model(tmp_path / "model", text)
    with pytest.raises(ConfigError, match=re.escape(fragment)) as caught:
        load_model_config(folder)
    if not fragment.startswith(("model name", "'a.b'")):  # the name error names the name
        assert CONFIG_FILE in str(caught.value)


@pytest.mark.parametrize(("text", "fragment"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_fails_whole_repository(tmp_path: Path, text: str, fragment: str) -> None:
    write_model(tmp_path / "good", "")
    write_model(tmp_path / "model", text)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_repository(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b'description = "caf\xe9"\n', b"\xff\xfe\x00v\x00e\x00r\x00", b'name = "\x80"\n'],
    ids=["latin-1", "utf-16-bom", "stray-continuation-byte"],
)
def test_config_not_utf8_raises_config_error(tmp_path: Path, content: bytes) -> None:
    folder = write_model(tmp_path / "model", content)
    with pytest.raises(ConfigError, match=re.escape(CONFIG_FILE)):
        load_model_config(folder)


@pytest.mark.parametrize("folder_name", ["my.model", "with space", "star*"])
def test_bad_folder_name_as_default_name(tmp_path: Path, folder_name: str) -> None:
    folder = write_model(tmp_path / folder_name, "version = 1\n")
    with pytest.raises(ConfigError, match=re.escape(repr(folder_name))):
        load_model_config(folder)


def test_bad_folder_name_is_fine_when_name_given(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "my.model", 'name = "my_model"\n')
    assert load_model_config(folder).name == "my_model"


def test_missing_model_file(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", "version = 1\n", model_file=None)
    with pytest.raises(ConfigError, match=re.escape("model file 'model.onnx' not found")):
        load_model_config(folder)


def test_model_file_that_is_a_folder(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", "", model_file=None)
    (folder / "model.onnx").mkdir()
    with pytest.raises(ConfigError, match=re.escape("model file 'model.onnx' not found")):
        load_model_config(folder)


def test_missing_config(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"x")
    with pytest.raises(ConfigError, match="no such file") as caught:
        load_model_config(folder)
    assert str(folder / CONFIG_FILE) in str(caught.value)


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_model_config(tmp_path / "absent")


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "a.b"}, "model name"),
        ({"name": "ok", "version": 0}, "version must be >= 1"),
        ({"name": "ok", "version": True}, "version must be >= 1"),
        ({"name": "ok", "max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({"name": "ok", "instances": 0}, "instances must be between 1 and 64"),
        ({"name": "ok", "max_queue_delay_ms": -1.0}, "max_queue_delay_ms must be >= 0"),
        ({"name": "ok", "max_request_bytes": 0}, "max_request_bytes must be >= 1"),
    ],
)
def test_model_config_validates_itself(
    tmp_path: Path, kwargs: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        ModelConfig(directory=tmp_path, **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- repositories


def test_repository_not_a_folder(tmp_path: Path) -> None:
    file = tmp_path / "repo.toml"
    file.write_text("version = 1\n")
    with pytest.raises(ConfigError, match="is not a folder") as caught:
        load_repository(file)
    assert str(file) in str(caught.value)


def test_repository_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a folder"):
        load_repository(tmp_path / "nowhere")


def test_repository_without_models(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("has no <model>/config.toml")):
        load_repository(tmp_path)


def test_repository_with_only_folders_lacking_config(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "model" / "sub").mkdir(parents=True)
    (tmp_path / "model" / "model.onnx").write_bytes(b"x")
    (tmp_path / CONFIG_FILE).write_text("version = 1\n")  # at the top, not in a model folder
    with pytest.raises(ConfigError, match=re.escape("has no <model>/config.toml")):
        load_repository(tmp_path)


def test_repository_skips_non_model_entries(tmp_path: Path) -> None:
    write_model(tmp_path / "real", "")
    (tmp_path / "notes").mkdir()
    (tmp_path / "README.md").write_text("hi\n")
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    write_model(tmp_path / "nested" / "deeper" / "hidden", "")
    configs = load_repository(tmp_path)
    assert [c.name for c in configs] == ["real"]


@pytest.mark.parametrize(
    "folders",
    [("one", "two"), ("first", "second")],
    ids=["names", "reversed-folders"],
)
def test_same_name_and_version_twice(tmp_path: Path, folders: tuple[str, str]) -> None:
    for folder in folders:
        write_model(tmp_path / folder, 'name = "m"\nversion = 3\n')
    with pytest.raises(ConfigError, match="m version 3 is defined twice") as caught:
        load_repository(tmp_path)
    message = str(caught.value)
    for folder in folders:
        assert str((tmp_path / folder).resolve()) in message


def test_same_name_by_folder_and_by_key(tmp_path: Path) -> None:
    write_model(tmp_path / "m", "")
    write_model(tmp_path / "other", 'name = "m"\n')
    with pytest.raises(ConfigError, match="m version 1 is defined twice"):
        load_repository(tmp_path)


def test_repository_ordered_by_name_then_numeric_version(tmp_path: Path) -> None:
    write_model(tmp_path / "z_first_folder", 'name = "b"\nversion = 10\n')
    write_model(tmp_path / "y", 'name = "b"\nversion = 2\n')
    write_model(tmp_path / "x", 'name = "a"\nversion = 9\n')
    write_model(tmp_path / "a", 'name = "c"\n')
    configs = load_repository(tmp_path)
    assert [(c.name, c.version, c.directory.name) for c in configs] == [
        ("a", 9, "x"),
        ("b", 2, "y"),
        ("b", 10, "z_first_folder"),
        ("c", 1, "a"),
    ]


def test_repository_accepts_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_model(tmp_path / "repo" / "m", "")
    monkeypatch.chdir(tmp_path)
    (config,) = load_repository(Path("repo"))
    assert config.directory == (tmp_path / "repo" / "m").resolve()
    assert config.path.is_file()
