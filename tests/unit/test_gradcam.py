"""CAM / Grad-CAM: batched, side-effect free, and the maps land where the image was."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from inference.architectures import build_model
from inference.gradcam import cam, gradcam, normalize_maps, upsample_to
from inference.preprocess import PreprocessSpec, crop_box, model_tensor, prepare


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _model(arch: str = "resnet18", seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return build_model(arch, 2).eval()


def _batch(count: int, size: int = 128, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator)


def _hook_counts(model: nn.Module) -> list[tuple[int, int, int]]:
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]


def _seed_gradcam(model: nn.Sequential, image: torch.Tensor, cls: int, block: int) -> torch.Tensor:
    """The seed notebook's cell, one image at a time, with ReLU and [0, 1] scaling added."""
    stored: dict[str, torch.Tensor] = {}
    module = model[0][block]
    forward = module.register_forward_hook(
        lambda m, i, o: stored.__setitem__("act", o.detach().clone())
    )
    backward = module.register_full_backward_hook(
        lambda m, gi, go: stored.__setitem__("grad", go[0].detach().clone())
    )
    try:
        output = model.eval()(image[None])
        output[0, cls].backward()
    finally:
        forward.remove()
        backward.remove()
        model.zero_grad(set_to_none=True)
    weights = stored["grad"][0].mean(dim=[1, 2], keepdim=True)
    cam_map = F.relu((weights * stored["act"][0]).sum(0))
    return (cam_map - cam_map.min()) / (cam_map.max() - cam_map.min())


def test_one_forward_and_one_backward_for_the_whole_batch() -> None:
    model = _model()
    forwards, backwards = [], []
    model[0][0].register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
    model[1][-1].register_full_backward_hook(lambda m, gi, go: backwards.append(go[0].shape[0]))
    result = gradcam(model, _batch(4))
    assert forwards == [4]
    assert backwards == [4]
    assert result.heatmaps.shape[0] == 4


def test_hooks_are_removed_afterwards_and_when_the_forward_raises() -> None:
    model = _model()
    model.train()
    before = _hook_counts(model)
    gradcam(model, _batch(2, 64), block=-2)
    cam(model, _batch(2, 64))
    assert _hook_counts(model) == before
    wrong_channels = torch.randn(2, 1, 64, 64)
    with pytest.raises(RuntimeError):
        gradcam(model, wrong_channels, block=-1)
    with pytest.raises(RuntimeError):
        cam(model, wrong_channels)
    assert _hook_counts(model) == before
    assert model.training, "the caller's training mode must be restored, also after an error"


def test_grad_mode_is_restored_when_the_forward_fails_after_the_block() -> None:
    model = _model()
    before = _hook_counts(model)

    def fail(module: nn.Module, inputs: object, output: object) -> None:
        raise RuntimeError("head failed")

    handle = model[1].register_forward_hook(fail)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="head failed"):
            gradcam(model, _batch(1, 64), block=-2)
        assert not torch.is_grad_enabled(), "the caller's no_grad must still hold"
    handle.remove()
    assert _hook_counts(model) == before


def test_only_the_layers_after_the_block_are_recorded() -> None:
    model = _model()
    recorded: dict[str, bool] = {}
    model[0][-3].register_forward_hook(
        lambda m, i, o: recorded.__setitem__("before", o.requires_grad)
    )
    model[0][-1].register_forward_hook(
        lambda m, i, o: recorded.__setitem__("after", o.requires_grad)
    )
    gradcam(model, _batch(1, 64), block=-2)
    assert recorded == {"before": False, "after": True}


def test_no_gradients_accumulate_across_calls() -> None:
    model = _model()
    batch = _batch(2)
    first = gradcam(model, batch)
    second = gradcam(model, batch)
    assert torch.equal(first.heatmaps, second.heatmaps)
    assert all(parameter.grad is None for parameter in model.parameters())
    assert not batch.requires_grad and batch.grad is None


def test_leftover_parameter_gradients_are_cleared() -> None:
    model = _model()
    model(_batch(2)).sum().backward()
    assert any(parameter.grad is not None for parameter in model.parameters())
    gradcam(model, _batch(2))
    assert all(parameter.grad is None for parameter in model.parameters())


def test_maps_are_in_unit_range_with_the_block_resolution() -> None:
    result = gradcam(_model(), _batch(3))
    assert result.heatmaps.shape == (3, 4, 4)
    assert result.heatmaps.dtype == torch.float32
    assert torch.isfinite(result.heatmaps).all()
    assert result.heatmaps.min() >= 0 and result.heatmaps.max() <= 1
    assert torch.allclose(result.heatmaps.amax(dim=(1, 2)), torch.ones(3))
    assert torch.allclose(result.probabilities.sum(dim=1), torch.ones(3))


def test_target_defaults_to_the_predicted_class() -> None:
    model = _model()
    batch = _batch(4)
    result = gradcam(model, batch)
    assert torch.equal(result.targets, result.logits.argmax(dim=1))
    other = 1 - result.targets
    explicit = gradcam(model, batch, target=other)
    assert torch.equal(explicit.targets, other)
    assert not torch.allclose(explicit.heatmaps, result.heatmaps)


@pytest.mark.parametrize("block", [-1, -2])
def test_each_map_matches_the_seed_computation_for_its_target(block: int) -> None:
    model = _model()
    batch = _batch(2)
    targets = torch.tensor([0, 1])
    result = gradcam(model, batch, target=targets, block=block)
    for index in range(2):
        expected = _seed_gradcam(model, batch[index], int(targets[index]), block)
        assert torch.allclose(result.heatmaps[index], expected, atol=1e-5)


def test_a_block_followed_by_an_in_place_relu_keeps_its_own_activation() -> None:
    """ResNet's bn1 (block -7) feeds ReLU(inplace=True), which must not overwrite the map."""
    model = _model()
    assert isinstance(model[0][-6], nn.ReLU) and model[0][-6].inplace
    batch = _batch(2, 64)
    result = gradcam(model, batch, target=torch.tensor([0, 1]), block=-7)
    reference_model = copy.deepcopy(model)
    reference_model[0][-6].inplace = False
    for index in range(2):
        expected = _seed_gradcam(reference_model, batch[index], index, -7)
        assert torch.allclose(result.heatmaps[index], expected, atol=1e-5)


def test_batch_result_equals_image_by_image() -> None:
    model = _model()
    batch = _batch(3)
    together = gradcam(model, batch, block=-2)
    for index in range(3):
        alone = gradcam(model, batch[index : index + 1], block=-2)
        assert torch.allclose(together.heatmaps[index], alone.heatmaps[0], atol=1e-5)
        assert torch.allclose(together.logits[index], alone.logits[0], atol=1e-5)


@pytest.mark.parametrize(("block", "side"), [(-1, 7), (-2, 14), (-3, 28), (-8, 112)])
def test_block_selects_the_resolution(block: int, side: int) -> None:
    result = gradcam(_model(), _batch(1, 224), block=block)
    assert result.heatmaps.shape == (1, side, side)


def test_block_outside_the_body_is_refused() -> None:
    with pytest.raises(ValueError, match=r"block -9 not in -8..-1"):
        gradcam(_model(), _batch(1, 64), block=-9)


def test_inference_mode_batches_and_callers_work() -> None:
    model = _model()
    with torch.inference_mode():
        batch = _batch(2)
        result = gradcam(model, batch)
    reference = gradcam(model, _batch(2))
    assert torch.equal(result.heatmaps, reference.heatmaps)
    with torch.no_grad():
        assert torch.equal(gradcam(model, _batch(2)).heatmaps, reference.heatmaps)


def test_cam_on_resnet18_is_the_seed_einsum() -> None:
    model = _model()
    batch = _batch(2)
    result = cam(model, batch, target=torch.tensor([1, 0]))
    with torch.no_grad():
        activations = model[0](batch)
        weight = model[1][-1].weight
        for index, cls in enumerate([1, 0]):
            raw = torch.einsum("ck,kij->cij", weight, activations[index])[cls]
            expected = normalize_maps(raw[None])[0]
            assert torch.allclose(result.heatmaps[index], expected, atol=1e-5)
    assert result.heatmaps.shape == (2, 4, 4)


def test_cam_on_a_body_without_matching_channels_says_why() -> None:
    with pytest.raises(ValueError, match="CAM needs the body's last block"):
        cam(_model("efficientnet_lite0"), _batch(1, 64))


def test_flat_maps_stay_zero_without_nan() -> None:
    maps = torch.stack([torch.zeros(3, 3), torch.full((3, 3), -2.0), torch.full((3, 3), 5.0)])
    normalized = normalize_maps(maps)
    assert torch.equal(normalized, torch.zeros(3, 3, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_matches_cpu() -> None:
    model = _model()
    batch = _batch(3)
    on_cpu = gradcam(model, batch, block=-2)
    on_gpu = gradcam(model.cuda(), batch, block=-2)
    assert on_gpu.heatmaps.device.type == "cpu"
    assert torch.allclose(on_cpu.heatmaps, on_gpu.heatmaps, atol=1e-3)
    assert all(parameter.grad is None for parameter in model.parameters())


# --------------------------------------------------------------------------- geometry


def test_upsample_crop_places_the_map_on_the_centre_square() -> None:
    spec = PreprocessSpec(size=64, resize=131, resize_method="crop")
    width, height = 300, 200
    box = crop_box(width, height, spec)
    assert box == (50, 0, 250, 200)
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[0, 0] = 1.0  # top-left cell of the square
    full = upsample_to(heat, box, (width, height))
    assert full.shape == (height, width)
    assert not full[:, :50].any() and not full[:, 250:].any()
    row, column = np.unravel_index(np.argmax(full), full.shape)
    assert row < 25 and 50 <= column < 75
    assert full.min() >= 0 and full.max() <= 1


def test_upsample_pad_keeps_only_the_part_inside_the_image() -> None:
    spec = PreprocessSpec(size=64, resize=131, resize_method="pad")
    width, height = 200, 100
    box = crop_box(width, height, spec)
    assert box == (0, -50, 200, 150)
    heat = np.array([[1.0, 1.0], [0.0, 0.0]], dtype=np.float32)  # top half of the square hot
    full = upsample_to(heat, box, (width, height))
    assert full.shape == (height, width)
    # Image row 0 is the square's row 50 (still hot), the last row its row 149 (cold).
    assert full[0].min() > 0.98
    assert full[-1].max() < 0.02


@pytest.mark.parametrize("method", ["crop", "pad"])
@pytest.mark.parametrize(("width", "height"), [(300, 200), (180, 260)])
def test_a_bright_spot_comes_back_where_it_was(method: str, width: int, height: int) -> None:
    """The network input's own pixels, used as a heat map, land back on the original."""
    spec = PreprocessSpec(size=64, resize=131, resize_method=method)
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    spot_y, spot_x = height // 2 + 20, width // 2 - 25
    rgb[spot_y - 6 : spot_y + 6, spot_x - 6 : spot_x + 6] = 255
    seen = model_tensor(rgb, spec)[0]
    heat = (seen - seen.min()) / (seen.max() - seen.min())
    full = upsample_to(heat, crop_box(width, height, spec), (width, height))
    rows, columns = np.nonzero(full > 0.5)
    assert abs(rows.mean() - spot_y) < 3 and abs(columns.mean() - spot_x) < 3


def test_trimmed_borders_keep_the_map_on_the_anatomy(tmp_path: Path) -> None:
    """With flat borders trimmed, the network saw a square of the content, not the file."""
    width, height = 300, 220
    rng = np.random.default_rng(0)
    grey = np.zeros((height, width), dtype=np.uint8)  # flat border: 60 px left, 30 px top
    grey[30:, 60:] = rng.integers(40, 110, size=(height - 30, width - 60), dtype=np.uint8)
    spot_y, spot_x = 140, 150
    grey[spot_y - 8 : spot_y + 8, spot_x - 8 : spot_x + 8] = 255
    path = tmp_path / "bordered.png"
    Image.fromarray(grey).save(path)
    spec = PreprocessSpec(size=64, resize=131, trim_borders=True)
    prepared = prepare(path, spec)
    assert prepared.box[0] >= 50, "the left border is not part of what the network saw"
    seen = prepared.tensor[0]
    heat = (seen - seen.min()) / (seen.max() - seen.min())
    full = upsample_to(heat, prepared.box, (width, height))
    rows, columns = np.nonzero(full > 0.7)
    assert abs(rows.mean() - spot_y) < 3 and abs(columns.mean() - spot_x) < 3
