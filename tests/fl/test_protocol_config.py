"""What the coordinator puts in each task's configuration (no exchange: the grid is never used)."""

from __future__ import annotations

from fedqc.config import config_from_dict
from fedqc.fl.from_config import federation_settings
from fedqc.fl.protocol import Protocol
from fedqc.site.contract import ConfigKey, Task

LOCAL = ConfigKey.LOCAL_EPOCHS.value


def _protocol(tmp_path, **refine) -> Protocol:
    config = config_from_dict({"sites": [{"name": "a", "root": str(tmp_path), "labelled": True}],
                               "federation": {"local_epochs": 3}, "refine": refine})
    return Protocol(None, federation_settings(config), tmp_path / "run")


def test_refine_local_epochs_reach_every_refine_task_and_only_those(tmp_path):
    protocol = _protocol(tmp_path, local_epochs=1)
    # Task.REFINE carries the refine rounds, the control's rounds and both halves of a sequential round.
    assert protocol._train_config(Task.REFINE, 1)[LOCAL] == 1
    assert protocol._train_config(Task.SUPERVISED, 1)[LOCAL] == 3
    assert protocol._train_config(Task.QC_AUTOENCODER, 1)[LOCAL] == 3


def test_without_refine_local_epochs_a_refine_round_takes_the_federations(tmp_path):
    assert _protocol(tmp_path)._train_config(Task.REFINE, 1)[LOCAL] == 3
