"""
DistributedDataParallel for models on CPU, and a check that every rank resumed alike.

Detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]`` whatever the model's
device, which ``DistributedDataParallel`` refuses for a CPU module (v0.6 and main alike), so
``DefaultTrainer`` cannot train on CPU with several processes. ``create_ddp_model`` here is
Detectron2's with ``device_ids=None`` for a CPU model; both trainers wrap their model with it
(``fpn_plugin.engine.precision.build_train_loop``). Everything else (``broadcast_buffers=False``,
``find_unused_parameters=False``, gradient averaging) stays Detectron2's and torch's.
"""
from detectron2.engine import create_ddp_model as _D2_CREATE_DDP_MODEL
from detectron2.utils import comm
from torch import nn

__all__ = ["create_ddp_model", "check_resumed_alike", "check_started_alike"]


def _check_no_cuda_only_sync_bn(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.SyncBatchNorm):
            raise ValueError(
                f"module {name!r} is torch.nn.SyncBatchNorm (norm 'SyncBN' in MODEL.FPN.NORM, "
                "MODEL.RPN.HEAD_NORM, MODEL.ROI_BOX_HEAD.NORM, MODEL.ROI_MASK_HEAD.NORM, "
                "MODEL.RESNETS.NORM; a norm/conv_norm argument in a LazyConfig), which "
                "synchronizes only CUDA tensors. On CPU processes "
                "(gloo) use 'naiveSyncBN' (Detectron2's NaiveSyncBatchNorm, the same "
                "statistics when every process has the same batch shape) or 'GN'.")


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """
    ``detectron2.engine.defaults.create_ddp_model`` that also wraps a model on CPU (gloo).

    Args:
        model: the model; returned as it is when there is one process.
        kwargs: ``DistributedDataParallel`` / Detectron2 arguments (``broadcast_buffers``,
            ``find_unused_parameters``, ``fp16_compression``, ...).

    Raises:
        ValueError: a CPU model contains ``nn.SyncBatchNorm``, which would fail at the first
            training step (it needs CUDA tensors when a process group exists).
    """
    if comm.get_world_size() > 1 and "device_ids" not in kwargs:
        devices = {p.device.type for p in model.parameters()}
        if devices == {"cpu"}:
            _check_no_cuda_only_sync_bn(model)
            kwargs["device_ids"] = None  # DDP's rule for CPU modules
    return _D2_CREATE_DDP_MODEL(model, **kwargs)


def check_resumed_alike(trainer) -> None:
    """
    Raise a ``RuntimeError`` unless every rank starts at the same iteration after
    ``resume_or_load`` (a collective: call it on every rank).

    Every rank reads ``OUTPUT_DIR/last_checkpoint`` itself and DDP does not broadcast weights
    again after construction, so a machine that cannot see rank 0's checkpoints (OUTPUT_DIR
    not on shared storage) would silently train different weights from iteration 0.
    """
    check_started_alike(int(trainer.start_iter), trainer.cfg.OUTPUT_DIR)


def check_started_alike(start_iter: int, output_dir: str, key: str = "OUTPUT_DIR") -> None:
    """
    :func:`check_resumed_alike` for any training loop: this rank's first iteration and its
    checkpoint folder (``key`` names the setting in the message, e.g. ``train.output_dir``).
    """
    if comm.get_world_size() == 1:
        return
    starts = comm.all_gather(int(start_iter))
    if len(set(starts)) > 1:
        raise RuntimeError(
            f"ranks resumed at different iterations {starts} (index = rank): {key}="
            f"{output_dir!r} must be storage that every machine sees, since rank "
            "0 writes the checkpoints and every rank reads them on --resume")
