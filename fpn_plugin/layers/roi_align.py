"""
ROIAlign as a sparse matrix product: the same sampling as torchvision's kernel (the one
Detectron2's ``ROIAlign`` calls), with a multithreaded backward pass, for training on CPU.

torchvision's CPU ROIAlign computes its backward pass in one thread and recomputes the bilinear
weights of every sample for every channel: on a 2-core CPU it takes 3-5x the time of this
module's forward and backward together, and it was the one part of the fast training path
that did not speed up (docs/benchmarks.md). Here the weights of every (ROI, bin, sample) are
computed once, as a sparse matrix ``M`` of shape ``(R * ph * pw, N * H * W)`` (4 nonzeros per
sample), and

    pooled = M @ pixels        pixels: the features as rows (N * H * W, C), a view of NHWC
    grad_pixels = M^T @ grad   (autograd of the sparse product)

Sampling follows torchvision's kernel exactly: bin and grid geometry (``aligned`` shifts by
half a pixel; otherwise ROIs are at least 1x1), an adaptive grid ``ceil(roi_size / bins)`` when
``sampling_ratio <= 0``, samples beyond one pixel outside the map count as zero, coordinates
clamped to the border as the kernel does. Outputs and input gradients agree with it to float
rounding (``tests/layers/test_roi_align.py``). No gradient flows to ``rois``, as in
torchvision.

:class:`SparseROIAlign` has Detectron2's ``ROIAlign`` signature and calls torchvision's kernel
whenever no gradient is needed (inference, evaluation): there it is Detectron2's module.
:func:`use_sparse_roi_align` puts it in a model's ROI poolers (the fast training path on CPU does),
:func:`restore_roi_align` takes it out.
"""
import warnings
from typing import List, Tuple

import torch
from detectron2.layers import ROIAlign
from torch import Tensor, nn
from torchvision.ops import roi_align as torchvision_roi_align

__all__ = ["roi_align_weights", "sparse_roi_align", "SparseROIAlign", "use_sparse_roi_align",
           "restore_roi_align"]


def _axis(coord: Tensor, size: int, valid: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """torchvision's bilinear neighbours along one axis: (low, high, weight of low, weight of
    high, inside) for sample coordinates ``coord`` on an axis of ``size`` pixels."""
    inside = valid & (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    low = coord.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    coord = torch.where(at_end, low.to(coord.dtype), coord)
    frac = coord - low.to(coord.dtype)
    return low, high, 1.0 - frac, frac, inside


def _sample_coords(start: Tensor, length: Tensor, bins: int, grid: Tensor,
                   max_grid: int) -> Tensor:
    """Sample coordinates (R, bins, max_grid) along one axis, as torchvision computes them."""
    bin_size = length / bins
    b = torch.arange(bins, dtype=start.dtype, device=start.device)
    i = torch.arange(max_grid, dtype=start.dtype, device=start.device)
    return (start[:, None, None] + b[None, :, None] * bin_size[:, None, None]
            + (i[None, None, :] + 0.5) * bin_size[:, None, None] / grid[:, None, None])


def roi_align_weights(rois: Tensor, height: int, width: int, output_size: Tuple[int, int],
                      spatial_scale: float, sampling_ratio: int,
                      aligned: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """
    The nonzeros of ROIAlign's sampling matrix.

    Args:
        rois (Tensor): (R, 5) float, ``(batch index, x1, y1, x2, y2)`` in image coordinates.
        height, width: the feature map's size.
        output_size: (ph, pw) bins.
        spatial_scale, sampling_ratio, aligned: as torchvision's ``roi_align``.

    Returns:
        (rows, cols, values), each (nnz,): row ``(r * ph + i) * pw + j`` of output bin (i, j) of
        ROI r, column ``(n * height + y) * width + x`` of pixel (y, x) of image n, and the
        bilinear weight divided by the bin's sample count; rows in ascending order.
    """
    ph, pw = output_size
    rois = rois.detach().float()
    num = rois.shape[0]
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, float(sampling_ratio))
        grid_w = torch.full_like(roi_w, float(sampling_ratio))
    else:  # adaptive; a grid of 0 (an empty ROI) has no samples, as in torchvision
        grid_h, grid_w = torch.ceil(roi_h / ph), torch.ceil(roi_w / pw)
    max_h = max(int(grid_h.max().item()) if num else 1, 1)
    max_w = max(int(grid_w.max().item()) if num else 1, 1)
    count = (grid_h * grid_w).clamp(min=1.0)
    ys = _sample_coords(y1, roi_h, ph, grid_h.clamp(min=1.0), max_h)  # (R, ph, max_h)
    xs = _sample_coords(x1, roi_w, pw, grid_w.clamp(min=1.0), max_w)  # (R, pw, max_w)
    in_grid_h = torch.arange(max_h, device=rois.device)[None, None, :] < grid_h[:, None, None]
    in_grid_w = torch.arange(max_w, device=rois.device)[None, None, :] < grid_w[:, None, None]
    y_low, y_high, hy, ly, y_in = _axis(ys, height, in_grid_h.expand_as(ys))
    x_low, x_high, hx, lx, x_in = _axis(xs, width, in_grid_w.expand_as(xs))

    def along_y(t: Tensor) -> Tensor:  # (R, ph, G) -> (R, ph, 1, G, 1)
        return t[:, :, None, :, None]

    def along_x(t: Tensor) -> Tensor:  # (R, pw, G) -> (R, 1, pw, 1, G)
        return t[:, None, :, None, :]

    scale = (along_y(y_in) & along_x(x_in)).float() / count[:, None, None, None, None]
    image = (rois[:, 0].long() * (height * width))[:, None, None, None, None]
    corners: List[Tuple[Tensor, Tensor, Tensor]] = [
        (y_low, x_low, along_y(hy) * along_x(hx)), (y_low, x_high, along_y(hy) * along_x(lx)),
        (y_high, x_low, along_y(ly) * along_x(hx)), (y_high, x_high, along_y(ly) * along_x(lx)),
    ]
    shape = scale.shape  # (R, ph, pw, max_h, max_w)
    cols = torch.stack([(image + along_y(y) * width + along_x(x)).expand(shape)
                        for y, x, _ in corners], dim=-1)
    values = torch.stack([(w * scale).expand(shape) for _, _, w in corners], dim=-1)
    rows = torch.arange(num * ph * pw, device=rois.device).view(num, ph, pw, 1, 1, 1)
    keep = values != 0
    return rows.expand_as(cols)[keep], cols[keep], values[keep]


def sparse_roi_align(input: Tensor, rois: Tensor, output_size: Tuple[int, int],
                     spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """
    torchvision's ``roi_align`` as a sparse matrix product (see the module docstring).

    Args:
        input (Tensor): (N, C, H, W) features, any memory format (NHWC is used without a copy).
        rois (Tensor): (R, 5) ``(batch index, x1, y1, x2, y2)``.

    Returns:
        Tensor: (R, C, ph, pw) in ``input``'s dtype (computed in fp32, as torchvision's kernel
        does under autocast), NHWC-strided.
    """
    n, c, h, w = input.shape
    ph, pw = output_size
    if rois.shape[0] == 0:
        return input.new_zeros((0, c, ph, pw))
    rows, cols, values = roi_align_weights(rois, h, w, (ph, pw), spatial_scale, sampling_ratio,
                                           aligned)
    num_rows = rois.shape[0] * ph * pw
    crow = torch.zeros(num_rows + 1, dtype=torch.long, device=input.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=num_rows), 0)
    with warnings.catch_warnings():  # torch's notice that sparse CSR support is "beta"
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(crow, cols, values, (num_rows, n * h * w),
                                         check_invariants=False)
    pixels = input.float().permute(0, 2, 3, 1).reshape(n * h * w, c)
    pooled = torch.sparse.mm(matrix, pixels)
    return pooled.view(rois.shape[0], ph, pw, c).permute(0, 3, 1, 2).to(input.dtype)


class SparseROIAlign(nn.Module):
    """
    Detectron2's ``ROIAlign`` (same arguments, same outputs to float rounding) with a fast CPU
    backward: :func:`sparse_roi_align` where a gradient is needed, torchvision's kernel
    elsewhere.
    """

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int,
                 aligned: bool = True):
        super().__init__()
        size = tuple(output_size) if isinstance(output_size, (list, tuple)) \
            else (output_size, output_size)
        self.output_size: Tuple[int, int] = (int(size[0]), int(size[1]))
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    @classmethod
    def like(cls, module: ROIAlign) -> "SparseROIAlign":
        """The sparse twin of a Detectron2 ``ROIAlign``."""
        return cls(module.output_size, module.spatial_scale, module.sampling_ratio,
                   module.aligned)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        """input: (N, C, H, W); rois: (R, 5). Returns (R, C, ph, pw). Scripted or traced (a
        deployed model), it is torchvision's kernel."""
        assert rois.dim() == 2 and rois.size(1) == 5
        if not torch.jit.is_scripting() and not torch.jit.is_tracing() and input.requires_grad \
                and torch.is_grad_enabled() and input.device.type == "cpu":
            return self._sparse(input, rois)
        return torchvision_roi_align(input, rois.to(dtype=input.dtype), self.output_size,
                                     self.spatial_scale, self.sampling_ratio, self.aligned)

    @torch.jit.unused
    def _sparse(self, input: Tensor, rois: Tensor) -> Tensor:
        return sparse_roi_align(input, rois, self.output_size, self.spatial_scale,
                                self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


def _level_poolers(model: nn.Module):
    for module in model.modules():
        poolers = getattr(module, "level_poolers", None)
        if isinstance(poolers, nn.ModuleList):
            yield poolers


def use_sparse_roi_align(model: nn.Module) -> int:
    """
    Replace every Detectron2 ``ROIAlign`` in the model's ROI poolers (``ROIPooler.level_poolers``)
    by its :class:`SparseROIAlign` twin, in place; the originals are kept for
    :func:`restore_roi_align`. Returns how many were replaced. Poolers of other types
    (``ROIAlignRotated``, ``ROIPool``) are left alone.
    """
    replaced = 0
    for poolers in _level_poolers(model):
        for i, pooler in enumerate(poolers):
            if type(pooler) is ROIAlign:
                sparse = SparseROIAlign.like(pooler)
                # a plain attribute, not a submodule: the module tree stays Detectron2's shape
                object.__setattr__(sparse, "_fpn_plugin_replaced", pooler)
                poolers[i] = sparse
                replaced += 1
    return replaced


def restore_roi_align(model: nn.Module) -> int:
    """Undo :func:`use_sparse_roi_align`; returns how many poolers were restored."""
    restored = 0
    for poolers in _level_poolers(model):
        for i, pooler in enumerate(poolers):
            original = getattr(pooler, "_fpn_plugin_replaced", None)
            if isinstance(pooler, SparseROIAlign) and original is not None:
                poolers[i] = original
                restored += 1
    return restored
