"""The callbacks build from YAML ``class_path`` entries, as LightningCLI's ``trainer.callbacks`` reads them:
the bundled configs' entries and every public path of each callback."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback

from lightning_tsd.callbacks import (
    ReduceTSDWeightOnAgreementDrop,
    SaliencyAlignmentMonitor,
    SaliencyMapLogger,
)


def _build(entries: list[dict]) -> list[Callback]:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    config = parser.parse_string(yaml.safe_dump({"callbacks": entries}))
    return parser.instantiate_classes(config).callbacks


@pytest.mark.parametrize(
    ("class_path", "init_args", "cls"),
    [
        ("lightning_tsd.callbacks.SaliencyAlignmentMonitor", {"max_batches": 2}, SaliencyAlignmentMonitor),
        ("lightning_tsd.SaliencyAlignmentMonitor", {"max_batches": 2}, SaliencyAlignmentMonitor),
        ("lightning_tsd.callbacks.SaliencyMapLogger", {"num_samples": 2}, SaliencyMapLogger),
        (
            "lightning_tsd.callbacks.ReduceTSDWeightOnAgreementDrop",
            {"factor": 0.25},
            ReduceTSDWeightOnAgreementDrop,
        ),
        ("lightning_tsd.ReduceTSDWeightOnAgreementDrop", {"factor": 0.25}, ReduceTSDWeightOnAgreementDrop),
    ],
)
def test_each_public_class_path_builds_its_callback(class_path, init_args, cls):
    (callback,) = _build([{"class_path": class_path, "init_args": init_args}])
    assert type(callback) is cls
    assert all(getattr(callback, k) == v for k, v in init_args.items())


@pytest.mark.parametrize("name", ["gunpoint", "basicmotions", "japanesevowels"])
def test_the_bundled_configs_callbacks_build(name):
    config = yaml.safe_load((resources.files("lightning_tsd") / "configs" / f"{name}.yaml").read_text())
    entries = config["trainer"]["callbacks"]
    ours = [e for e in entries if e["class_path"].startswith("lightning_tsd.callbacks.")]
    assert ours, "the bundled configs watch the saliency alignment"
    callbacks = _build(entries)
    assert [type(c).__name__ for c in callbacks] == [e["class_path"].rsplit(".", 1)[1] for e in entries]
    monitor = next(c for c in callbacks if isinstance(c, SaliencyAlignmentMonitor))
    assert (monitor.method, monitor.max_batches) == ("integrated_gradients", 2)
