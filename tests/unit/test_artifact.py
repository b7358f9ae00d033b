"""Model directories: export round trip, and refusal of anything that is not the card's weights."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from inference.architectures import build_model
from inference.artifact import (
    CARD_FILE,
    WEIGHTS_FILE,
    ModelCard,
    ModelLoadError,
    load_model,
    resolve_device,
    save_model,
    sha256_file,
)
from inference.preprocess import PreprocessSpec


def _export(tmp_path: Path, arch: str = "resnet18") -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model(arch, 2).eval()
    out = tmp_path / "model"
    spec = PreprocessSpec(size=64, resize=131)
    save_model(
        model, out, {"arch": arch, "classes": ["abd", "chest"], "preprocessing": spec.to_json()}
    )
    return model, out


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, arch: str) -> None:
    model, out = _export(tmp_path, arch)
    loaded = load_model(out, device="cpu")
    batch = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(batch), loaded.model(batch))
    card = json.loads((out / CARD_FILE).read_text())
    assert card["sha256"] == sha256_file(out / WEIGHTS_FILE)
    assert loaded.card.classes == ("abd", "chest")
    assert loaded.model_id.endswith(card["sha256"][:12])


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    _, out = _export(tmp_path)
    weights = out / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256 .* does not match"):
        load_model(out, device="cpu")


class _Boom:
    def __reduce__(self) -> tuple:
        return (Path("/tmp/radgate-pickle-ran").touch, ())


def test_pickle_in_place_of_weights_never_runs(tmp_path: Path) -> None:
    _, out = _export(tmp_path)
    marker = Path("/tmp/radgate-pickle-ran")
    marker.unlink(missing_ok=True)
    weights = out / WEIGHTS_FILE
    weights.write_bytes(pickle.dumps(_Boom()))
    card = json.loads((out / CARD_FILE).read_text())
    card["sha256"] = sha256_file(weights)  # even a card that vouches for the pickle
    (out / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        load_model(out, device="cpu")
    assert not marker.exists()


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    _, out = _export(tmp_path, "efficientnet_lite0")
    card = json.loads((out / CARD_FILE).read_text())
    card["arch"] = "resnet18"
    (out / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="weights do not fit resnet18"):
        load_model(out, device="cpu")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda card: card.pop("classes"), "invalid model card"),
        (lambda card: card.update(arch="vgg16"), "unknown arch 'vgg16'"),
        (lambda card: card.update(weights_file="../x.safetensors"), "plain file name"),
    ],
)
def test_bad_cards_are_named(tmp_path: Path, mutate, message: str) -> None:
    _, out = _export(tmp_path)
    card = json.loads((out / CARD_FILE).read_text())
    mutate(card)
    (out / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match=message):
        ModelCard.read(out)


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model card missing"):
        load_model(tmp_path / "empty")


def test_device_selection() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelLoadError, match="not one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")
