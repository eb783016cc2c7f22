"""Uploaded classifiers (docs/architecture.md section 4, ``clf:{sha256}``): recognised as safetensors by
parsing the header, never by a first byte; a pickle is refused unread."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save
from service_helpers import CLASSIFIER_META

from actgen_generator.classifiers import ClassifierError, build_checked, read_state_dict
from actgen_shared import codecs
from actgen_shared.architectures import build_classifier
from actgen_shared.schemas import ClassifierMeta


def weights_with_header_low_byte(low: int) -> bytes:
    """simple_cnn safetensors bytes whose 8-byte header length has this low byte (padded with
    metadata), like resnet50 with 1000 classes, whose 28 800-byte header starts with 0x80."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in build_classifier("simple_cnn", 10).state_dict().items()}
    for pad in range(0, 2048):
        data = save(state, metadata={"pad": "x" * pad})
        if data[0] == low:
            return data
    raise AssertionError(f"no padding gives a header length with low byte {low:#x}")


def test_safetensors_whose_header_length_starts_with_0x80_is_accepted() -> None:
    data = weights_with_header_low_byte(0x80)
    assert data[:1] == b"\x80"  # pickle's PROTO opcode, and a valid safetensors file
    header = codecs.safetensors_header(data)
    assert "__metadata__" in header
    tensors = read_state_dict(data)
    assert "fc.weight" in tensors or len(tensors) > 0
    model = build_checked(data, ClassifierMeta.model_validate(CLASSIFIER_META))
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_real_pickle_is_refused_by_name(protocol: int) -> None:
    payload = pickle.dumps({"fc.weight": torch.zeros(2, 2)}, protocol=protocol)
    assert payload[:1] == b"\x80"
    with pytest.raises(ClassifierError, match="weights: this is a pickle; only safetensors"):
        read_state_dict(payload)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "too short"),
        ((10**9).to_bytes(8, "little") + b"{}", "does not fit"),
        ((4).to_bytes(8, "little") + b"[1] ", "not a JSON object"),
        ((6).to_bytes(8, "little") + b'{"a":1}', "not JSON"),
        ((8).to_bytes(8, "little") + b'{"a": 1}', "lacks dtype"),
    ],
)
def test_broken_headers_say_what_is_wrong(data: bytes, words: str) -> None:
    with pytest.raises(ClassifierError, match=words):
        read_state_dict(data)
