"""Deprecated in the callbacks: the module ``lightning_tsd.weight_guard``, ``ReduceTSDWeightOnAgreementDrop.scale``
(both removed in 0.3.0), and the old method and option names of the saliency callbacks."""

from __future__ import annotations

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback

from lightning_tsd.callbacks import (
    ReduceTSDWeightOnAgreementDrop,
    SaliencyAlignmentMonitor,
    SaliencyMapLogger,
)


def test_weight_guard_module_serves_the_callback_with_a_warning_naming_the_removal_version():
    with pytest.warns(
        DeprecationWarning, match="weight_guard is deprecated and will be removed in 0.3.0"
    ) as w:
        from lightning_tsd.weight_guard import ReduceTSDWeightOnAgreementDrop as old
    assert old is ReduceTSDWeightOnAgreementDrop
    assert w[0].filename == __file__  # the warning points at the import, not at the package
    import lightning_tsd.weight_guard as weight_guard

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        weight_guard.nope  # noqa: B018


def test_weight_guard_class_path_still_builds_from_yaml():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[Callback])
    entry = {
        "class_path": "lightning_tsd.weight_guard.ReduceTSDWeightOnAgreementDrop",
        "init_args": {"factor": 0.25},
    }
    with pytest.warns(DeprecationWarning, match="removed in 0.3.0"):
        config = parser.parse_string(yaml.safe_dump({"callbacks": [entry]}))
        (callback,) = parser.instantiate_classes(config).callbacks
    assert type(callback) is ReduceTSDWeightOnAgreementDrop and callback.factor == 0.25


def test_scale_reads_the_last_checks_scale_with_a_warning():
    weight_cut = ReduceTSDWeightOnAgreementDrop()
    with pytest.warns(DeprecationWarning, match="scale is deprecated and will be removed in 0.3.0") as w:
        assert weight_cut.scale == 1.0  # no check yet
    assert w[0].filename == __file__
    weight_cut.history = [(0, 0.9, 1.0), (1, 0.7, 0.5)]
    with pytest.warns(DeprecationWarning, match="tsd_weight_scale"):
        assert weight_cut.scale == 0.5


def test_old_method_and_option_names_of_the_saliency_callbacks_still_work():
    with pytest.warns(DeprecationWarning, match="'saliency' is deprecated"):
        assert SaliencyAlignmentMonitor(method="saliency").method == "gradient"
    with pytest.warns(DeprecationWarning, match="method_kwargs is deprecated"):
        logger = SaliencyMapLogger(method="integrated_gradients", method_kwargs={"n_steps": 4})
    assert logger.options == {"steps": 4}
    with pytest.warns(DeprecationWarning, match="'n_steps' is deprecated"):
        assert SaliencyAlignmentMonitor(options={"n_steps": 4}).options == {"steps": 4}
