"""YAML + --set overrides, typed errors."""

import pytest

from tests.conftest import REPO_ROOT
from trainer.config import DataConfig, config_yaml, load_config
from trainer.errors import TrainerError


def test_yaml_and_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ntrain:\n  lr: 0.1\n")
    cfg = load_config(
        path, ["train.lr=2e-3", "adapter.targets=[q_proj, up_proj]", "method.name=ella"]
    )
    assert cfg.train.lr == 2e-3 and cfg.adapter.targets == ["q_proj", "up_proj"]
    assert cfg.method.name == "ella"
    text = config_yaml(cfg, "jlserve train --config c.yaml --out r")
    assert text.startswith("# jlserve train --config c.yaml --out r\n")
    path.write_text(text)
    assert load_config(path) == cfg  # the saved config reloads to the same run


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr=-1"], "train.lr"),
        (["adapter.gate=maybe"], "adapter.gate"),
        (["nonsense=1"], "nonsense"),
        (["train.lr"], "key=value"),
    ],
)
def test_bad_values_are_typed_errors(tmp_path, overrides, message) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: m\n")
    with pytest.raises(TrainerError, match=message):
        load_config(path, overrides)


def test_missing_file_is_typed_error(tmp_path) -> None:
    with pytest.raises(TrainerError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_default_data_root_is_the_checkouts_from_any_directory(tmp_path, monkeypatch) -> None:
    """The default needs no ../shared and does not depend on the current directory; a path
    given explicitly is taken as it is."""
    monkeypatch.chdir(tmp_path)
    assert DataConfig().root == REPO_ROOT / "data" / "cl_benchmark"
    path = tmp_path / "c.yaml"
    path.write_text("model: m\n")
    assert load_config(path).data.root == REPO_ROOT / "data" / "cl_benchmark"
    assert load_config(path, ["data.root=mine"]).data.root.as_posix() == "mine"
