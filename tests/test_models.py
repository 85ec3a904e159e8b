"""The job request model: what it accepts, and messages a user can act on when it refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from transcoder.models import EncodingOptions, JobRequest

SEED = {"bucket": "my-bucket", "object": "480P.mp4", "output_dir": "a", "dst_format": "mov"}


def refusal(**changes: object) -> str:
    """The validation message for the seed payload with `changes` applied (None deletes)."""
    payload = {**SEED, **changes}
    payload = {key: value for key, value in payload.items() if value is not None}
    with pytest.raises(ValidationError) as caught:
        JobRequest.model_validate(payload)
    return str(caught.value)


def test_the_seed_payload_is_accepted_as_is() -> None:
    request = JobRequest.model_validate(SEED)
    assert request.formats == ["mov"]
    assert request.stem == "480P"
    assert request.target_bucket == "my-bucket"
    assert request.output_key("480P.mov") == "a/480P.mov"
    assert request.copy_policy == "auto"


def test_several_formats_case_insensitive_without_duplicates() -> None:
    request = JobRequest.model_validate(
        {**SEED, "dst_format": "MOV", "dst_formats": ["flv", "mov", "M3U8"]}
    )
    assert request.formats == ["mov", "flv", "m3u8"]


@pytest.mark.parametrize(
    "key",
    ["dir/sub/my video (1).mp4", "ünïcödé.mov", "100%+plus.mp4", "no-extension"],
)
def test_any_valid_s3_key_is_a_source(key: str) -> None:
    request = JobRequest.model_validate({**SEED, "object": key})
    assert request.object == key
    assert "/" not in request.stem


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, "colour"),  # unknown fields are named
        (
            {"dst_format": "mkv"},
            "unsupported format 'mkv': choose from mov, flv, avi, m3u8, mp4, webm",
        ),
        ({"dst_format": None}, "give dst_format or dst_formats"),
        ({"output_dir": "a/../b"}, "must not contain '.' or '..' segments"),
        ({"output_dir": "/abs"}, "relative prefix"),
        ({"output_dir": "a\nb"}, "control characters"),
        ({"bucket": "My_Bucket"}, "invalid bucket name 'My_Bucket'"),
        ({"bucket": "192.168.1.1"}, "invalid bucket name"),
        ({"invocation_id": "1abc"}, "invocation_id must match"),
        ({"invocation_id": "a" * 129}, "invocation_id must match"),
        ({"object": "dir/"}, "does not name a file"),
        ({"object": ""}, "1-1024 bytes"),
        ({"video_codec": "rm -rf"}, "video_codec"),
        ({"video_bitrate": "fast"}, "invalid bitrate 'fast'"),
        ({"height": 5}, "height"),
        ({"copy_policy": "sometimes"}, "copy_policy"),
    ],
)
def test_refusals_say_what_is_wrong(changes: dict, message: str) -> None:
    assert message in refusal(**changes)


def test_encoding_options_come_out_without_request_fields() -> None:
    request = JobRequest.model_validate({**SEED, "height": 360, "crf": 20, "copy_policy": "never"})
    options = request.encoding_options()
    assert isinstance(options, EncodingOptions)
    assert (options.height, options.crf, options.copy_policy) == (360, 20, "never")


def test_an_output_that_would_overwrite_its_source_is_refused() -> None:
    same_place = {"bucket": "media", "object": "src/clip.mp4", "output_dir": "src"}
    with pytest.raises(ValidationError, match="would overwrite the source object"):
        JobRequest.model_validate({**same_place, "dst_formats": ["m3u8", "MP4"]})
    # another format, another directory or another bucket is fine
    assert JobRequest.model_validate({**same_place, "dst_format": "mov"}).formats == ["mov"]
    assert JobRequest.model_validate({**same_place, "output_dir": "out", "dst_format": "mp4"})
    other_bucket = {**same_place, "dst_format": "mp4", "output_bucket": "media-out"}
    assert JobRequest.model_validate(other_bucket).target_bucket == "media-out"
