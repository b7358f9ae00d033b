"""Class activation maps: CAM and Grad-CAM for a batch, with hooks that always come off.

Both work on the `nn.Sequential(body, head)` models of `inference.architectures`:

- `gradcam(model, batch, target, block)`: Grad-CAM at `body[block]` (-1 is the last block,
  as in the seed's slider). One forward and one backward for the whole batch: the backward
  starts from the sum of each image's selected logit, and since images do not interact in
  eval mode, each image's gradient is that of its own logit. The layers up to the block run
  without autograd (as fast as inference, nothing kept for a backward); autograd records
  from the block's output on, and `torch.autograd.grad` stops there, so nothing is written
  to any parameter's `.grad`.
- `cam(model, batch, target)`: the seed's CAM, the head's last Linear weight times the
  body's output, in one forward without gradients.

Maps are ReLU'd and scaled to [0, 1] per image (a flat map stays 0), at the block's
resolution; `upsample_to` puts one back onto the original image's geometry.

The model runs in eval mode for the call (its previous mode is restored) on whatever device
its parameters are on; `batch` is moved there. Gradients are enabled even when the caller
is inside `torch.no_grad()` or `torch.inference_mode()`. A batch created under
`inference_mode` is an inference tensor, which autograd may not record; it is cloned
outside inference mode first (a copy of the batch, done here so callers need not).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class GradCamResult:
    """Heat maps and the outputs they explain; all detached, float32, on the CPU."""

    heatmaps: torch.Tensor  # (N, h, w) in [0, 1], at the hooked block's resolution
    logits: torch.Tensor  # (N, classes)
    probabilities: torch.Tensor  # (N, classes), softmax of logits
    targets: torch.Tensor  # (N,) int64, the class each map explains


class ActivationHook:
    """Forward hook on one module that keeps its output, as a context manager.

    The next layer gets a copy of the output, so an in-place layer that follows (ResNet's
    `bn1` -> `ReLU(inplace=True)`) cannot overwrite the kept activation. With
    `grad_from_here`, the kept activation is a fresh leaf that requires grad and autograd is
    switched on for the rest of the forward pass: run the forward under `torch.no_grad()`
    and only the layers after this module are recorded (leaving the `no_grad` block restores
    the grad mode, also on error). The handle is removed on exit, also on error.
    """

    def __init__(self, module: nn.Module, grad_from_here: bool = False) -> None:
        self.module = module
        self.grad_from_here = grad_from_here
        self.activation: torch.Tensor | None = None
        self._handle: RemovableHandle | None = None

    def _store(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: object) -> object:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"{type(module).__name__} output is {type(output).__name__}, not a tensor"
            )
        if self.grad_from_here:
            torch.set_grad_enabled(True)
            output = output.detach().requires_grad_(True)
        self.activation = output
        return output.clone()

    def __enter__(self) -> ActivationHook:
        self._handle = self.module.register_forward_hook(self._store)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def stored(self) -> torch.Tensor:
        if self.activation is None:
            raise RuntimeError(f"{type(self.module).__name__} was not called in the forward pass")
        return self.activation


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def body_and_head(model: nn.Module) -> tuple[nn.Sequential, nn.Module]:
    if not isinstance(model, nn.Sequential) or len(model) != 2:
        raise ValueError("expected a model built as nn.Sequential(body, head)")
    body, head = model[0], model[1]
    if not isinstance(body, nn.Sequential):
        raise ValueError("expected the model's body to be an nn.Sequential of blocks")
    return body, head


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _as_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A detached batch on the model's device that autograd may record."""
    if batch.ndim != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(batch.shape)}")
    inputs = batch.detach().to(device, non_blocking=True)
    if inputs.is_inference():
        inputs = inputs.clone()  # we are outside inference mode here: a normal tensor
    return inputs


def _targets(target: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    count, classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    chosen = torch.as_tensor(target, dtype=torch.int64).reshape(-1).to(logits.device)
    if chosen.numel() == 1 and count != 1:
        chosen = chosen.expand(count)
    if chosen.numel() != count:
        raise ValueError(f"target has {chosen.numel()} entries for a batch of {count}")
    if bool(((chosen < 0) | (chosen >= classes)).any()):
        raise ValueError(f"target {chosen.tolist()} outside the {classes} classes")
    return chosen


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """ReLU, then each (h, w) map scaled to [0, 1]; a flat map becomes all 0 (no NaN)."""
    maps = F.relu(maps.float())
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    span = flat.max(dim=1).values.view(-1, 1, 1) - low
    scaled = (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny)
    return torch.where(span > 1e-12, scaled, torch.zeros_like(maps)).clamp_(0.0, 1.0)


def _result(maps: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> GradCamResult:
    logits = logits.detach().float()
    return GradCamResult(
        heatmaps=normalize_maps(maps.detach()).cpu(),
        logits=logits.cpu(),
        probabilities=torch.softmax(logits, dim=1).cpu(),
        targets=targets.detach().cpu(),
    )


def check_block(model: nn.Module, block: int) -> int:
    """The block index as given, if the body has it; ValueError naming the range if not."""
    body, _ = body_and_head(model)
    if not -len(body) <= block <= -1:
        raise ValueError(
            f"block {block} not in -{len(body)}..-1 (the model's body has {len(body)} blocks)"
        )
    return block


def gradcam(
    model: nn.Sequential,
    batch: torch.Tensor,
    target: torch.Tensor | None = None,
    block: int = -1,
) -> GradCamResult:
    """Grad-CAM at `body[block]` for every image in `batch` (N, 3, H, W).

    `target` is one class index per image (or one for all); by default the predicted class.
    Channel weights are the gradient's spatial mean; the map is the weighted sum of the
    block's channels, ReLU'd and scaled to [0, 1].
    """
    body, _ = body_and_head(model)
    check_block(model, block)
    model.zero_grad(set_to_none=True)
    with torch.inference_mode(False), torch.enable_grad(), _eval_mode(model):
        inputs = _as_input(batch, _model_device(model))
        with ActivationHook(body[block], grad_from_here=True) as hook, torch.no_grad():
            logits = model(inputs)
        activation = hook.stored()
        targets = _targets(target, logits)
        selected = logits.gather(1, targets.view(-1, 1)).sum()
        (gradient,) = torch.autograd.grad(selected, activation)
        weights = gradient.float().mean(dim=(2, 3), keepdim=True)
        maps = (weights * activation.detach().float()).sum(dim=1)
    return _result(maps, logits, targets)


def last_linear(head: nn.Module) -> nn.Linear:
    linears = [module for module in head.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("CAM needs a Linear layer in the model's head")
    return linears[-1]


def cam(
    model: nn.Sequential, batch: torch.Tensor, target: torch.Tensor | None = None
) -> GradCamResult:
    """The seed's CAM: the head's last Linear weight (classes, K) times the body's output.

    That product only means something when the body's last block has K channels (ResNet18:
    512 channels, and its head's last Linear is 512 -> classes); other bodies raise
    ValueError, and Grad-CAM is the method for them.
    """
    body, head = body_and_head(model)
    weight = last_linear(head).weight
    with torch.no_grad(), _eval_mode(model):
        inputs = batch.detach().to(_model_device(model), non_blocking=True)
        if inputs.ndim != 4:
            raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(inputs.shape)}")
        with ActivationHook(body) as hook:
            logits = model(inputs)
        activation = hook.stored()
        if activation.ndim != 4 or activation.shape[1] != weight.shape[1]:
            raise ValueError(
                f"CAM needs the body's last block to have as many channels as the head's last "
                f"Linear has inputs ({weight.shape[1]}); this body gives "
                f"{tuple(activation.shape[1:])}. Use Grad-CAM for this model"
            )
        targets = _targets(target, logits)
        class_weights = weight.detach().float()[targets]  # (N, K)
        maps = torch.einsum("nk,nkij->nij", class_weights, activation.float())
    return _result(maps, logits, targets)


def upsample_to(
    heatmap: torch.Tensor | np.ndarray,
    box: tuple[int, int, int, int],
    size: tuple[int, int],
) -> np.ndarray:
    """A (h, w) map onto the original image: float32 (height, width) in [0, 1].

    `box` (left, top, right, bottom) is the square of the original the network saw:
    `Prepared.box`, or `preprocess.crop_box(width, height, spec)` for an image without
    trimmed borders. The map covers that square, so it is resized to the square (bilinear)
    and placed at its position; outside the square the map is 0. Where the square overhangs
    the image (the pad method) only the part inside the image is kept.
    """
    width, height = size
    left, top, right, bottom = box
    side_x, side_y = right - left, bottom - top
    if side_x <= 0 or side_y <= 0 or width <= 0 or height <= 0:
        raise ValueError(f"empty box {box} or size {size}")
    source = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
    if source.ndim != 2:
        raise ValueError(f"expected a (h, w) heat map, got shape {tuple(source.shape)}")
    resized = F.interpolate(
        source[None, None], size=(side_y, side_x), mode="bilinear", align_corners=False
    )[0, 0].clamp_(0.0, 1.0)
    canvas = np.zeros((height, width), dtype=np.float32)
    # The part of the square inside the image, in image and in square coordinates.
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(right, width), min(bottom, height)
    if x1 > x0 and y1 > y0:
        canvas[y0:y1, x0:x1] = resized[y0 - top : y1 - top, x0 - left : x1 - left].numpy()
    return canvas
