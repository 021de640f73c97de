"""
The one check of the plugin's training settings, for both config formats.

A YAML config and a LazyConfig hold the same settings under different names
(``SOLVER.BASE_LR`` / ``optimizer.lr``, ``DATALOADER.INVALID_RECORDS`` /
``dataloader.invalid_records``, ...). :class:`SettingKeys` names where each lives in one
format (:data:`YAML_KEYS`, :data:`LAZY_KEYS`); :func:`check_training_settings` checks every
rule once, reading each value through a ``read(key)`` function and naming the key as the
user wrote it in every error. :func:`check_precision_settings` is its precision part (the
device, ``AMP`` and channels-last rules), which the trainers also call to learn the
precision they train in.
"""
import math
from dataclasses import dataclass
from typing import Any, Callable

from ..data.build import check_invalid_record_policy
from ..data.images import check_max_image_pixels
from ..utils.env import check_cuda_available
from .config import AMP_PRECISIONS
from .precision import check_training_precision

__all__ = ["LAZY_KEYS", "YAML_KEYS", "SettingKeys", "check_precision_settings",
           "check_training_settings", "lazy_reader", "yaml_reader"]

Reader = Callable[[str], Any]


@dataclass(frozen=True)
class SettingKeys:
    """Where each training setting lives in one config format (dotted keys)."""

    device: str
    amp_enabled: str
    precision: str
    channels_last: str
    invalid_records: str
    check_images: str
    max_image_pixels: str
    divergence_factor: str
    lr: str


YAML_KEYS = SettingKeys(
    device="MODEL.DEVICE", amp_enabled="SOLVER.AMP.ENABLED", precision="SOLVER.AMP.PRECISION",
    channels_last="SOLVER.CHANNELS_LAST", invalid_records="DATALOADER.INVALID_RECORDS",
    check_images="DATALOADER.CHECK_IMAGES", max_image_pixels="INPUT.MAX_IMAGE_PIXELS",
    divergence_factor="SOLVER.DIVERGENCE_FACTOR", lr="SOLVER.BASE_LR")
LAZY_KEYS = SettingKeys(
    device="train.device", amp_enabled="train.amp.enabled", precision="train.amp.precision",
    channels_last="train.channels_last", invalid_records="dataloader.invalid_records",
    check_images="dataloader.check_images", max_image_pixels="dataloader.max_image_pixels",
    divergence_factor="train.divergence_factor", lr="optimizer.lr")


def yaml_reader(cfg) -> Reader:
    """``read(key)`` for a Detectron2 ``CfgNode`` (``"SOLVER.BASE_LR"`` -> its value)."""
    def read(key: str):
        node = cfg
        for part in key.split("."):
            node = node[part]
        return node
    return read


def lazy_reader(cfg) -> Reader:
    """``read(key)`` for a LazyConfig (omegaconf ``DictConfig``); None where a key is absent."""
    from omegaconf import OmegaConf

    return lambda key: OmegaConf.select(cfg, key, default=None)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_precision_settings(read: Reader, keys: SettingKeys) -> str:
    """
    The training precision the settings ask for: ``"fp32"`` unless AMP is enabled, else the
    precision setting for the device (``"auto"``: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32). The precision's
    value is checked even when AMP is off (a typo fails now).

    Raises:
        ValueError: naming the key of an unknown value, or of a precision the device cannot
            run (fp16 off CUDA, bf16 on a CUDA device without it, a CUDA device that is absent).
    """
    enabled, precision = read(keys.amp_enabled), read(keys.precision)
    if not isinstance(enabled, bool):
        raise ValueError(f"{keys.amp_enabled} must be True or False, got {enabled!r}")
    if precision not in AMP_PRECISIONS:
        raise ValueError(f"{keys.precision} must be one of {AMP_PRECISIONS}, got {precision!r}")
    device = str(read(keys.device))
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    if enabled:
        check_cuda_available(device, keys.device)
    return check_training_precision(precision if enabled else "fp32", device_type,
                                    read(keys.channels_last),
                                    keys=(keys.precision, keys.channels_last))


def check_training_settings(read: Reader, keys: SettingKeys, eval_only: bool = False) -> str:
    """
    Every training setting both trainers read, checked before anything is built; each error
    names the key as ``keys`` spells it. Returns the training precision
    (:func:`check_precision_settings`).

    Args:
        read: ``read(key)`` -> the setting's value (:func:`yaml_reader`, :func:`lazy_reader`).
        eval_only: the learning rate is not read (evaluation of a checkpoint).
    """
    check_cuda_available(read(keys.device), keys.device)
    precision = check_precision_settings(read, keys)
    check_invalid_record_policy(read(keys.invalid_records), key=keys.invalid_records)
    check_images = read(keys.check_images)
    if not isinstance(check_images, bool):
        raise ValueError(f"{keys.check_images} must be True or False, got {check_images!r}")
    check_max_image_pixels(read(keys.max_image_pixels), key=keys.max_image_pixels)
    factor = read(keys.divergence_factor)
    if not _is_number(factor) or (factor != 0 and factor <= 1):
        raise ValueError(f"{keys.divergence_factor} must be 0 (off) or a finite number > 1, "
                         f"got {factor!r}")
    lr = read(keys.lr)
    if not eval_only and (not _is_number(lr) or lr <= 0):
        raise ValueError(f"{keys.lr} must be a finite number > 0, got {lr!r}")
    return precision
