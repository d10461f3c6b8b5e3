"""The YAML configs in configs/ parse with anomalib's own machinery and build what they say."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from anomalib.data import AnomalibDataModule
from anomalib.models import AnomalibModule
from jsonargparse import ArgumentParser

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "model").glob("*.yaml")), ids=lambda p: p.name)
def test_model_configs_build_the_model_they_describe(path: Path) -> None:
    config = yaml.safe_load(path.read_text())["model"]
    init_args = dict(config["init_args"])
    if init_args["backbone"] != "tf_efficientnet_lite0":
        init_args["pretrained"] = False  # the hub is out of reach in tests; the architecture is what is checked
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibModule, "model")  # as anomalib's CLI reads --model / --config
    parsed = parser.parse_object({"model": {"class_path": config["class_path"], "init_args": init_args}})
    model = parser.instantiate_classes(parsed).model
    assert isinstance(model, AnomalibModule)
    assert type(model).__name__ == config["class_path"].rsplit(".", 1)[-1]
    for name, value in init_args.items():
        expected = tuple(value) if isinstance(value, list) else value
        actual = model.hparams[name]
        assert (tuple(actual) if isinstance(actual, list | tuple) else actual) == expected, name


@pytest.mark.parametrize("path", sorted((CONFIGS / "data").glob("*.yaml")), ids=lambda p: p.name)
def test_data_configs_parse_into_datamodules(path: Path) -> None:
    parser = ArgumentParser()
    parser.add_subclass_arguments(AnomalibDataModule, "data")
    config = parser.parse_object(yaml.safe_load(path.read_text()))
    datamodule = parser.instantiate_classes(config).data
    assert isinstance(datamodule, AnomalibDataModule)
    assert type(datamodule).__name__ == yaml.safe_load(path.read_text())["data"]["class_path"].rsplit(".", 1)[-1]
