"""YAML + --set overrides, typed errors."""

import pytest

from tests.conftest import REPO_ROOT
from trainer.config import REFERENCE_THRESHOLD, DataConfig, config_yaml, load_config, same_config
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
        (["adapter.topk_density=0.02"], "topk_density applies to gate: topk, not gate: jump"),
        (["adapter.gate=topk", "adapter.topk_density=1.5"], "adapter.topk_density"),
        (
            ["adapter.threshold_training=reference", "adapter.l0_weight=2"],
            "threshold_training: reference sets l0_weight to 0.0",
        ),
        (["adapter.threshold_training=reference", "adapter.gate=none"], "needs gate: jump"),
        (["adapter.sparse_schedule=[0.8, 0.2]"], r"needs 0 <= start <= end <= 1, got \[0.8, 0.2\]"),
        (["adapter.sparse_schedule=[0.2]"], "adapter.sparse_schedule"),
        (["adapter.gate=none", "adapter.sparse_schedule=[1, 1]"], "not gate: none"),
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


def test_the_reference_preset_fills_the_authors_values_and_saves_them(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: m\n")
    cfg = load_config(path, ["adapter.threshold_training=reference", "adapter.bandwidth=1e-3"])
    assert {k: getattr(cfg.adapter, k) for k in REFERENCE_THRESHOLD} == REFERENCE_THRESHOLD
    path.write_text(config_yaml(cfg, "jlserve train --config c.yaml --out r"))
    assert load_config(path) == cfg  # the filled values are saved and reload as the preset


def test_a_saved_config_matches_when_only_defaulted_new_settings_are_missing(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: m\n")
    cfg = load_config(path)
    saved = cfg.model_dump(mode="json")
    del saved["adapter"]["topk_density"]  # as a run saved before the setting existed
    del saved["adapter"]["sparse_schedule"]
    assert same_config(saved, cfg)
    assert not same_config(saved, load_config(path, ["adapter.gate=topk"]))
    assert not same_config({**saved, "gone": 1}, cfg)  # a setting removed since: refused
