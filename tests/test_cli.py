"""The ``manyview`` console script: dispatch, unknown commands, and training commands in a serving install."""
from __future__ import annotations

import importlib

import pytest

from app import cli


def test_unknown_command_exits_2_with_usage(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_missing_training_package_names_the_train_extra(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """What a serving install (no torch) prints for `manyview pretrain`: the extra to install, no traceback."""
    def without_torch(name: str):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(importlib, "import_module", without_torch)
    assert cli.main(["pretrain", "--help"]) == 2
    err = capsys.readouterr().err
    assert "manyview pretrain: needs torch" in err and "pip install 'manyview[train]'" in err


def test_other_missing_modules_are_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise ModuleNotFoundError("No module named 'not_a_training_package'", name="not_a_training_package")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ModuleNotFoundError):
        cli.main(["serve"])
