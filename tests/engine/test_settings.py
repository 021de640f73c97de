"""fpn_plugin.engine.settings: one check of the training settings for both config formats,
each error naming the key as the format spells it; the YAML and LazyConfig trainers' checks
are that one check."""
import dataclasses

import pytest
from detectron2.config import get_cfg

from fpn_plugin import add_fpn_plugin_config
from fpn_plugin.engine.settings import (
    LAZY_KEYS,
    YAML_KEYS,
    check_training_settings,
    lazy_reader,
    yaml_reader,
)

GOOD = {"device": "cpu", "amp_enabled": False, "precision": "auto", "channels_last": False,
        "invalid_records": "skip", "check_images": True, "max_image_pixels": 0,
        "divergence_factor": 100.0, "lr": 0.01}
BAD = [
    ("amp_enabled", "yes", "must be True or False"),
    ("precision", "fp8", "must be one of"),
    ("channels_last", 1, "must be True or False"),
    ("invalid_records", "ignore", "must be one of"),
    ("check_images", "no", "must be True or False"),
    ("max_image_pixels", -1, "must be an integer >= 0"),
    ("divergence_factor", 1.0, "must be 0 \\(off\\) or a finite number > 1"),
    ("divergence_factor", float("nan"), "must be 0 \\(off\\) or a finite number > 1"),
    ("lr", 0, "must be a finite number > 0"),
    ("lr", True, "must be a finite number > 0"),
]


def _reader(keys, **changes):
    values = {getattr(keys, name): value for name, value in dict(GOOD, **changes).items()}
    return values.__getitem__


@pytest.mark.parametrize("keys", [YAML_KEYS, LAZY_KEYS], ids=["yaml", "lazy"])
@pytest.mark.parametrize("name,value,problem", BAD)
def test_each_rule_names_the_key_of_the_callers_format(keys, name, value, problem):
    with pytest.raises(ValueError, match=f"^{getattr(keys, name)} {problem}"):
        check_training_settings(_reader(keys, **{name: value}), keys)


@pytest.mark.parametrize("keys", [YAML_KEYS, LAZY_KEYS], ids=["yaml", "lazy"])
def test_good_settings_give_the_training_precision(keys):
    assert check_training_settings(_reader(keys), keys) == "fp32"
    assert check_training_settings(_reader(keys, amp_enabled=True), keys) == "bf16"
    # Evaluation reads no learning rate.
    assert check_training_settings(_reader(keys, lr=None), keys, eval_only=True) == "fp32"


def test_the_two_key_sets_name_every_setting_and_read_both_configs():
    from omegaconf import OmegaConf

    assert {f.name for f in dataclasses.fields(YAML_KEYS)} == set(GOOD)
    cfg = add_fpn_plugin_config(get_cfg())
    read = yaml_reader(cfg)
    assert [read(getattr(YAML_KEYS, n)) for n in ("lr", "invalid_records")] == \
        [cfg.SOLVER.BASE_LR, cfg.DATALOADER.INVALID_RECORDS]
    lazy = OmegaConf.create({"optimizer": {"lr": 0.5}, "train": {}})
    assert lazy_reader(lazy)(LAZY_KEYS.lr) == 0.5
    assert lazy_reader(lazy)(LAZY_KEYS.device) is None


def test_both_trainers_check_with_it(monkeypatch):
    from fpn_plugin.engine import lazy, trainer

    seen = []
    monkeypatch.setattr(trainer, "check_training_settings",
                        lambda read, keys, **kw: seen.append(keys) or "fp32")
    monkeypatch.setattr(lazy, "check_training_settings",
                        lambda read, keys, **kw: seen.append(keys) or "fp32")
    trainer.check_training_config(add_fpn_plugin_config(get_cfg()))
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": {}, "train": {k: 1 for k in (
        "output_dir", "max_iter", "amp", "ddp", "eval_period", "log_period", "device")},
        "dataloader": {"test": {}, "evaluator": {}, "shapes": None}})
    cfg.train.checkpointer = {"period": 1}
    lazy.check_lazy_training_config(cfg, eval_only=True)
    assert seen == [YAML_KEYS, LAZY_KEYS]
