"""Trigger rules and bucket-notification parsing: pure functions, no services."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from transcoder.triggers import (
    EventFormatError,
    RulesCache,
    TriggerRulesError,
    invocation_id,
    is_service_output_key,
    load_rules,
    parse_event,
    parse_rules,
    plan_jobs,
)

RULES = [
    {
        "bucket": "media",
        "prefix": "uploads/",
        "suffix": ".mp4",
        "dst_formats": ["mov", "M3U8"],
        "output_dir": "transcoded/{dir}/{stem}",
        "crf": 23,
    },
    {
        "bucket": "media",
        "prefix": "raw/",
        "dst_formats": ["webm"],
        "output_dir": "web",
        "output_bucket": "public-media",
    },
]


def record(
    key: str,
    *,
    event_name: str = "s3:ObjectCreated:Put",
    bucket: str = "media",
    etag: str = "0123abcd",
    sequencer: str = "17A0000000000001",
    metadata: dict[str, str] | None = None,
) -> dict:
    obj: dict = {"key": key, "eTag": etag, "size": 1234, "sequencer": sequencer}
    if metadata is not None:
        obj["userMetadata"] = metadata
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventName": event_name,
        "s3": {"bucket": {"name": bucket}, "object": obj},
    }


def one_event(key: str, **kwargs) -> dict:
    return {
        "EventName": kwargs.get("event_name", "s3:ObjectCreated:Put"),
        "Records": [record(key, **kwargs)],
    }


@pytest.fixture
def rules():
    return parse_rules(RULES)


@pytest.mark.parametrize(
    ("raw_key", "key"),
    [
        ("uploads/my+clip.mp4", "uploads/my clip.mp4"),
        ("uploads/a%2Bb.mp4", "uploads/a+b.mp4"),
        ("uploads/100%25+done.mp4", "uploads/100% done.mp4"),
        ("uploads/%C3%A9t%C3%A9+%E6%97%A5%E6%9C%AC.mp4", "uploads/été 日本.mp4"),
        ("uploads/sub%2Fdir/x.mp4", "uploads/sub/dir/x.mp4"),
    ],
)
def test_keys_are_url_decoded_as_minio_sends_them(raw_key: str, key: str) -> None:
    (event,) = parse_event(one_event(raw_key))
    assert event.key == key
    assert event.bucket == "media"
    assert event.etag == "0123abcd"


@pytest.mark.parametrize(
    "event_name",
    [
        "s3:ObjectCreated:Put",
        "s3:ObjectCreated:CompleteMultipartUpload",
        "s3:ObjectCreated:Copy",
        "ObjectCreated:Put",  # AWS form, no "s3:" prefix
        "ObjectCreated:CompleteMultipartUpload",
    ],
)
def test_create_events_make_a_job(rules, event_name: str) -> None:
    (event,) = parse_event(one_event("uploads/a.mp4", event_name=event_name))
    decision = plan_jobs(event, rules)
    assert not decision.ignored
    assert len(decision.requests) == 1


@pytest.mark.parametrize(
    "event_name",
    [
        "s3:ObjectRemoved:Delete",
        "s3:ObjectAccessed:Get",
        "s3:ObjectCreated:PutTagging",
        "s3:ObjectCreated:PutRetention",
        "ObjectRemoved:Delete",
        "",
        "s3:Replication",
    ],
)
def test_other_events_are_ignored(rules, event_name: str) -> None:
    (event,) = parse_event(one_event("uploads/a.mp4", event_name=event_name))
    decision = plan_jobs(event, rules)
    assert decision.requests == []
    assert "not an object-created event" in decision.ignored


def test_rule_matching_by_bucket_prefix_and_suffix(rules) -> None:
    def jobs(key: str, bucket: str = "media") -> int:
        (event,) = parse_event(one_event(key, bucket=bucket))
        return len(plan_jobs(event, rules).requests)

    assert jobs("uploads/a.mp4") == 1
    assert jobs("uploads/deep/er/a.mp4") == 1
    assert jobs("uploads/a.mov") == 0  # suffix
    assert jobs("other/a.mp4") == 0  # prefix
    assert jobs("uploads/a.mp4", bucket="elsewhere") == 0  # bucket
    assert jobs("raw/anything.avi") == 1  # no suffix: any key under the prefix


def test_request_follows_the_rule(rules) -> None:
    (event,) = parse_event(one_event("uploads/2024/my+clip.final.mp4"))
    (request,) = plan_jobs(event, rules).requests
    assert request.bucket == "media"
    assert request.object == "uploads/2024/my clip.final.mp4"
    assert request.output_dir == "transcoded/uploads/2024/my clip.final"
    assert request.formats == ["mov", "m3u8"]
    assert request.crf == 23
    assert request.target_bucket == "media"
    assert request.invocation_id is not None and request.invocation_id.startswith("s3_")

    (event,) = parse_event(one_event("raw/x.avi"))
    (request,) = plan_jobs(event, rules).requests
    assert (request.output_dir, request.target_bucket, request.formats) == (
        "web",
        "public-media",
        ["webm"],
    )


def test_template_with_empty_dir_leaves_no_leading_slash() -> None:
    (rule,) = parse_rules(
        [{"bucket": "media", "dst_formats": ["mp4"], "output_dir": "{dir}/out/{stem}"}]
    )
    assert rule.render_output_dir("top.mov") == "out/top"
    assert rule.render_output_dir("a/b/top.mov") == "a/b/out/top"


def test_invocation_id_is_deterministic(rules) -> None:
    (first,) = parse_event(one_event("uploads/a.mp4"))
    (again,) = parse_event(one_event("uploads/a.mp4"))
    (other_etag,) = parse_event(one_event("uploads/a.mp4", etag="ffff"))
    (other_key,) = parse_event(one_event("uploads/b.mp4"))
    rule = rules[0]
    assert invocation_id(first, rule) == invocation_id(again, rule)
    assert invocation_id(first, rule) != invocation_id(other_etag, rule)
    assert invocation_id(first, rule) != invocation_id(other_key, rule)
    assert invocation_id(first, rule) != invocation_id(first, rules[1])
    assert len(invocation_id(first, rule)) == 43
    # without an eTag the sequencer identifies the upload
    (no_etag,) = parse_event(one_event("uploads/a.mp4", etag=""))
    (no_etag_other_seq,) = parse_event(one_event("uploads/a.mp4", etag="", sequencer="17A2"))
    assert invocation_id(no_etag, rule) != invocation_id(no_etag_other_seq, rule)


def test_service_outputs_never_trigger(rules) -> None:
    # outputs of rule 0 live under transcoded/...; make a rule that would match them
    loop_rules = parse_rules(
        [
            *RULES,
            {"bucket": "media", "suffix": ".mov", "dst_formats": ["mp4"], "output_dir": "again"},
        ]
    )
    (event,) = parse_event(one_event("transcoded/uploads/a/a.mov"))
    decision = plan_jobs(event, loop_rules)
    assert decision.requests == []
    assert "output" in decision.ignored

    # an HLS rule claims every file in its output directory (segments)
    assert is_service_output_key("media", "transcoded/uploads/a/a_00001.ts", rules)
    assert is_service_output_key("public-media", "web/x.webm", rules)
    assert not is_service_output_key("media", "web/x.webm", rules)  # rule 1 writes elsewhere
    assert not is_service_output_key("media", "uploads/a.mp4", rules)


def test_metadata_marks_service_outputs(rules) -> None:
    event = parse_event(one_event("uploads/a.mp4", metadata={"X-Amz-Meta-Transcoder-Job": "j1"}))[0]
    assert plan_jobs(event, rules).ignored == "object was written by the service"
    event = parse_event(one_event("uploads/a.mp4", metadata={"content-type": "video/mp4"}))[0]
    assert len(plan_jobs(event, rules).requests) == 1


def test_several_records_per_call(rules) -> None:
    body = {"Records": [record("uploads/a.mp4"), record("uploads/b.mp4"), record("nothing/c.mp4")]}
    events = parse_event(body)
    assert [len(plan_jobs(event, rules).requests) for event in events] == [1, 1, 0]


def test_bad_request_from_a_rule_is_reported_not_raised(rules) -> None:
    (event,) = parse_event(one_event("uploads/..mp4"))  # stem "." makes an invalid output_dir
    decision = plan_jobs(event, rules)
    assert decision.requests == []
    assert decision.ignored.startswith("invalid request from rule")


@pytest.mark.parametrize(
    "body",
    [
        [],
        "x",
        {"Records": "x"},
        {"Records": [{"s3": {}}]},
        {"Records": [{"s3": {"bucket": {"name": "b"}, "object": {}}}]},
    ],
)
def test_malformed_bodies_are_refused(body) -> None:
    with pytest.raises(EventFormatError):
        parse_event(body)


def test_a_body_without_records_is_a_no_op() -> None:
    assert parse_event({"EventName": "s3:TestEvent"}) == []


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"bucket": "media", "dst_formats": ["mp4"], "output_dir": "x", "colour": "red"}, "colour"),
        ({"bucket": "media", "dst_formats": ["mp3"], "output_dir": "x"}, "unsupported format"),
        ({"bucket": "media", "dst_formats": [], "output_dir": "x"}, "dst_formats"),
        (
            {"bucket": "media", "dst_formats": ["mp4"], "output_dir": "{name}"},
            "only {stem} and {dir}",
        ),
        ({"bucket": "media", "dst_formats": ["mp4"], "output_dir": "../up"}, ".."),
        ({"bucket": "media", "dst_formats": ["mp4"], "output_dir": "/abs"}, "relative"),
        ({"bucket": "Bad_Bucket", "dst_formats": ["mp4"], "output_dir": "x"}, "bucket"),
        ({"bucket": "media", "dst_formats": ["mp4"], "output_dir": "x", "crf": 99}, "crf"),
        ({"bucket": "media", "dst_formats": ["mp4"]}, "output_dir"),
    ],
)
def test_invalid_rules_are_rejected_with_a_clear_message(rule: dict, message: str) -> None:
    with pytest.raises(TriggerRulesError, match=re.escape(message)):
        parse_rules([rule])


def test_rules_file_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "triggers.yml"
    yaml_file.write_text(
        "- bucket: media\n  prefix: uploads/\n"
        "  dst_formats: [mp4, webm]\n  output_dir: out/{stem}\n"
    )
    json_file = tmp_path / "triggers.json"
    json_file.write_text(json.dumps(RULES))
    assert load_rules(yaml_file)[0].dst_formats == ["mp4", "webm"]
    assert len(load_rules(json_file)) == 2
    with pytest.raises(TriggerRulesError, match="cannot read"):
        load_rules(tmp_path / "missing.yml")
    (tmp_path / "bad.yml").write_text("- bucket: [unclosed\n")
    with pytest.raises(TriggerRulesError, match="not valid YAML"):
        load_rules(tmp_path / "bad.yml")


def test_rules_cache_rereads_a_changed_file(tmp_path: Path) -> None:
    path = tmp_path / "triggers.json"
    path.write_text(json.dumps(RULES[:1]))
    cache = RulesCache(path)
    assert len(cache.get()) == 1
    path.write_text(json.dumps(RULES))
    assert len(cache.get()) == 2
    assert RulesCache(None).get() == []


def test_an_attempts_temporary_upload_never_triggers_a_job() -> None:
    rules = parse_rules([{"bucket": "media", "dst_formats": ["mp4"], "output_dir": "out/{stem}"}])
    body = {
        "Records": [
            {
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": "media"},
                    "object": {"key": "x/.transcoder-tmp/job1/1/clip.mp4.part", "eTag": "e1"},
                },
            }
        ]
    }
    (event,) = parse_event(body)
    decision = plan_jobs(event, rules)
    assert not decision.requests
    assert decision.ignored == "object was written by the service"
