"""Teacher-Ref against a local fake chat endpoint: good replies, garbage, slowness, HTTP errors, a dead port, replies
only in reasoning_content, extra request fields, bounded retries with exponential backoff."""

import dataclasses
import http.server
import json
import logging
import re
import socket
import threading
import time

import pytest

from p2o_jax.p2o.records import FeedbackRecord, ReflectionRequest
from p2o_jax.p2o.reflection import build_reflection_prompt
from p2o_jax.config import ConfigError, base_config, validate
from p2o_jax.p2o import teacher_ref
from p2o_jax.p2o.teacher_ref import TeacherRefConfig, TeacherReflector, TeacherStats, backoff_delay, teacher_config

KEY_ENV = "P2O_TEST_TEACHER_KEY"
SECRET = "sk-test-5ecret-key-0123456789"


def _request(question: str = "What is 4821+9377+1205?") -> ReflectionRequest:
  record = FeedbackRecord(question=question, output="The answer is 1", feedback="Incorrect; it is 15403.", score=0.0)
  return ReflectionRequest(template="Be careful.", records=(record,))


@dataclasses.dataclass
class _EndpointState:
  mode: str = "good"
  expected: int = 0  # how many requests the concurrency test will send
  url: str = ""
  requests: list = dataclasses.field(default_factory=list)  # (headers, json body) per request received
  in_flight: int = 0
  max_in_flight: int = 0
  lock: threading.Condition = dataclasses.field(default_factory=threading.Condition)
  release: threading.Event = dataclasses.field(default_factory=threading.Event)
  failures: int = 0  # "fail_then_good": how many attempts fail before one succeeds


def _chat_reply(content, **fields) -> bytes:
  return json.dumps({"choices": [{"message": {"role": "assistant", "content": content, **fields}}]}).encode()


class _FakeTeacher(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):  # keep pytest output clean
    pass

  def do_POST(self):
    state: _EndpointState = self.server.state
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    with state.lock:
      state.requests.append((dict(self.headers), body))
      attempt = len(state.requests)
      state.in_flight += 1
      state.max_in_flight = max(state.max_in_flight, state.in_flight)
      state.lock.notify_all()
    try:
      self._answer(state, attempt, body)
    except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
      pass
    finally:
      with state.lock:
        state.in_flight -= 1

  def _send(self, status: int, payload: bytes):
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(payload)))
    self.end_headers()
    self.wfile.write(payload)

  def _answer(self, state: _EndpointState, attempt: int, body: dict):
    question = re.search(r"(?:Problem:|## Inputs)\n(.*)\n", body["messages"][0]["content"]).group(1)
    fenced = f"Try this:\n```\nImproved for {question}\n```\nGood luck."
    good = _chat_reply(fenced)
    if state.mode == "good":
      self._send(200, good)
    elif state.mode == "not_json":
      self._send(200, b"<html>502 upstream hiccup</html>")
    elif state.mode == "no_choices":
      self._send(200, json.dumps({"object": "chat.completion"}).encode())
    elif state.mode == "null_content":
      self._send(200, _chat_reply(None))
    elif state.mode == "reasoning_only":  # vLLM's reasoning parser put the whole reply in reasoning_content
      self._send(200, _chat_reply(None, reasoning_content=f"Let me think about the format.\n</think>\n\n{fenced}"))
    elif state.mode == "empty_content_reasoning_without_close":
      self._send(200, _chat_reply("", reasoning_content=fenced))
    elif state.mode == "fail_then_good":
      self._send(503, b"overloaded") if attempt <= state.failures else self._send(200, good)
    elif state.mode == "always_500":
      self._send(500, b"down")
    elif state.mode == "slow":
      state.release.wait(timeout=5)
    elif state.mode == "trickle":  # headers at once, then one byte at a time: no single socket read ever times out
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(good)))
      self.end_headers()
      for byte in good:
        if state.release.wait(timeout=0.05):
          return
        self.wfile.write(bytes([byte]))
        self.wfile.flush()
    elif state.mode in ("500_twice", "429_twice"):
      self._send(int(state.mode[:3]), b"busy") if attempt <= 2 else self._send(200, good)
    elif state.mode == "400_echo_key":  # some APIs echo what they got; the client must scrub it from its logs
      self._send(400, f"bad request, you sent {self.headers['Authorization']}".encode())
    elif state.mode == "concurrency":
      # Hold each request until a second one is in flight (or none can come), so overlap is observed, not timed.
      with state.lock:
        state.lock.wait_for(lambda: state.in_flight >= 2 or len(state.requests) == state.expected, timeout=5)
      self._send(200, good)


@pytest.fixture
def endpoint(monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeTeacher)
  server.state = _EndpointState(url=f"http://127.0.0.1:{server.server_address[1]}/v1")
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
  thread.start()
  yield server.state
  server.state.release.set()
  server.shutdown()
  server.server_close()
  thread.join()


def _reflector(url: str, **overrides) -> TeacherReflector:
  settings = dict(
      base_url=url, model="teacher-test", api_key_env=KEY_ENV, timeout_s=0.5, max_retries=2,
      backoff_s=0.01, max_backoff_s=0.02, max_concurrency=4,
  )
  return TeacherReflector(TeacherRefConfig(**(settings | overrides)))


def test_good_reply_is_extracted_and_request_is_well_formed(endpoint):
  reflector = _reflector(endpoint.url)
  request = _request()
  assert reflector.propose([request]) == ["Improved for What is 4821+9377+1205?"]
  (headers, body), = endpoint.requests
  assert body == {
      "model": "teacher-test",
      "messages": [{"role": "user", "content": build_reflection_prompt(request)}],
      "temperature": 0.6,
      "max_tokens": 2048,
  }
  assert headers["Authorization"] == f"Bearer {SECRET}"
  assert reflector.stats == TeacherStats(requests=1, accepted=1)


def test_key_is_read_at_call_time_and_can_be_absent(endpoint, monkeypatch):
  reflector = _reflector(endpoint.url)
  monkeypatch.setenv(KEY_ENV, "sk-rotated")
  reflector.propose([_request()])
  assert endpoint.requests[-1][0]["Authorization"] == "Bearer sk-rotated"
  _reflector(endpoint.url, api_key_env=None).propose([_request()])
  assert "Authorization" not in endpoint.requests[-1][0]


@pytest.mark.parametrize("mode", ["not_json", "no_choices"])
def test_garbage_is_retried_then_dropped(endpoint, mode):
  endpoint.mode = mode
  reflector = _reflector(endpoint.url, max_retries=2)
  assert reflector.propose([_request()]) == [None]
  assert len(endpoint.requests) == 3
  assert reflector.stats == TeacherStats(requests=1, failed_calls=1, retries=2, malformed_responses=3)


def test_null_content_without_reasoning_is_an_empty_reply_not_retried(endpoint):
  """The authors' handler returns "" for a message with neither content nor reasoning_content; so do we."""
  endpoint.mode = "null_content"
  reflector = _reflector(endpoint.url, max_retries=2)
  assert reflector.propose([_request()]) == [None]
  assert len(endpoint.requests) == 1
  assert reflector.stats == TeacherStats(requests=1, rejected_empty=1)


@pytest.mark.parametrize("mode", ["reasoning_only", "empty_content_reasoning_without_close"])
def test_reply_only_in_reasoning_content_is_used(endpoint, mode):
  """content null (or empty): the text after </think> of reasoning_content, or all of it without a </think>."""
  endpoint.mode = mode
  reflector = _reflector(endpoint.url)
  assert reflector.propose([_request()]) == ["Improved for What is 4821+9377+1205?"]
  assert len(endpoint.requests) == 1
  assert reflector.stats == TeacherStats(requests=1, accepted=1, reasoning_fallbacks=1)


def test_reasoning_text_before_the_close_tag_is_dropped():
  body = _chat_reply(None, reasoning_content="```\nnot this\n```</think>```\nthis\n```")
  assert teacher_ref._reply_text(body) == ("```\nthis\n```", True)
  assert teacher_ref._reply_text(_chat_reply("answer", reasoning_content="ignored")) == ("answer", False)
  assert teacher_ref._reply_text(_chat_reply(None, reasoning="vLLM's newer field")) == ("vLLM's newer field", True)


def test_endpoint_failing_n_times_then_succeeding_backs_off_exponentially(endpoint, monkeypatch):
  endpoint.mode, endpoint.failures = "fail_then_good", 3
  sleeps = []
  monkeypatch.setattr(teacher_ref.time, "sleep", sleeps.append)
  reflector = _reflector(endpoint.url, max_retries=4, backoff_s=1.0, max_backoff_s=3.0)
  monkeypatch.setattr(reflector._rng, "random", lambda: 1.0)  # no jitter: the schedule itself
  assert reflector.propose([_request()]) == ["Improved for What is 4821+9377+1205?"]
  assert sleeps == [1.0, 2.0, 3.0]  # 1 s doubling, capped at max_backoff_s
  assert reflector.stats == TeacherStats(requests=1, accepted=1, retries=3, http_errors=3)


def test_endpoint_that_always_fails_gives_an_empty_reflection_after_bounded_retries(endpoint, monkeypatch, caplog):
  endpoint.mode = "always_500"
  sleeps = []
  monkeypatch.setattr(teacher_ref.time, "sleep", sleeps.append)
  reflector = _reflector(endpoint.url, max_retries=3, backoff_s=1.0, max_backoff_s=30.0)
  monkeypatch.setattr(reflector._rng, "random", lambda: 0.0)  # the jitter's lower end: half of each delay
  with caplog.at_level(logging.WARNING):
    assert reflector.propose([_request(), _request("q2")]) == [None, None]
  assert len(endpoint.requests) == 8 and sorted(sleeps) == [0.5, 0.5, 1.0, 1.0, 2.0, 2.0]  # two proposals' schedules
  assert reflector.stats == TeacherStats(requests=2, failed_calls=2, retries=6, http_errors=8)
  assert "2 of 2 proposals got no reply" in caplog.text and "the search goes on" in caplog.text


def test_extra_body_fields_are_merged_into_every_request(endpoint):
  extra = '{"chat_template_kwargs": {"enable_thinking": false}, "top_p": 0.95}'
  _reflector(endpoint.url, extra_body=extra).propose([_request()])
  (_, body), = endpoint.requests
  assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["top_p"] == 0.95
  assert body["model"] == "teacher-test" and body["max_tokens"] == 2048


@pytest.mark.parametrize("extra, message", [
    ("{not json", "not valid JSON"), ('["a list"]', "must be a JSON object"), ('{"model": "x"}', "must not set"),
])
def test_extra_body_is_validated_at_config_time_in_one_line(extra, message):
  c = base_config()
  c.data.train_path, c.p2o.enabled, c.p2o.teacher.extra_body = "train.jsonl", True, extra
  with pytest.raises(ConfigError, match=f"^config.p2o.teacher.extra_body: {message}") as raised:
    validate(c)
  assert "\n" not in str(raised.value)
  with pytest.raises(ValueError, match="teacher_ref.extra_body"):
    TeacherRefConfig(base_url="http://h/v1", model="m", extra_body=extra)


def test_teacher_config_reads_the_run_config():
  c = base_config()
  c.p2o.teacher.update(base_url="http://h:1/v1", model="kimi", max_retries=7, backoff_s=0.5, max_backoff_s=4.0,
                       extra_body='{"enable_thinking": false}')
  cfg = teacher_config(c)
  assert (cfg.max_retries, cfg.backoff_s, cfg.max_backoff_s) == (7, 0.5, 4.0)
  assert cfg.extra_fields() == {"enable_thinking": False}
  assert cfg.temperature == c.p2o.reflection_temperature and cfg.max_tokens == c.p2o.reflection_max_new_tokens


def test_slow_endpoint_times_out(endpoint):
  endpoint.mode = "slow"
  reflector = _reflector(endpoint.url, timeout_s=0.2, max_retries=1)
  start = time.monotonic()
  assert reflector.propose([_request()]) == [None]
  assert time.monotonic() - start < 2.0  # two attempts of 0.2 s and a short backoff, not the server's 5 s
  assert reflector.stats == TeacherStats(requests=1, failed_calls=1, retries=1, timeouts=2)


def test_endpoint_trickling_its_reply_past_the_deadline_times_out(endpoint):
  """Each byte arrives well within the socket timeout, so only the per-attempt deadline (2 x timeout_s) stops it."""
  endpoint.mode = "trickle"
  reflector = _reflector(endpoint.url, timeout_s=0.2, max_retries=1)
  start = time.monotonic()
  assert reflector.propose([_request()]) == [None]
  assert time.monotonic() - start < 2.5
  assert reflector.stats == TeacherStats(requests=1, failed_calls=1, retries=1, timeouts=2)


@pytest.mark.parametrize("mode", ["500_twice", "429_twice"])
def test_server_errors_are_retried_until_success(endpoint, mode):
  endpoint.mode = mode
  reflector = _reflector(endpoint.url, max_retries=2)
  assert reflector.propose([_request()]) == ["Improved for What is 4821+9377+1205?"]
  assert len(endpoint.requests) == 3
  assert reflector.stats == TeacherStats(requests=1, accepted=1, retries=2, http_errors=2)


def test_server_errors_beyond_the_retries_give_none(endpoint):
  endpoint.mode = "500_twice"
  reflector = _reflector(endpoint.url, max_retries=1)
  assert reflector.propose([_request()]) == [None]
  assert len(endpoint.requests) == 2


def test_client_error_is_not_retried_and_key_never_logged(endpoint, caplog):
  endpoint.mode = "400_echo_key"
  reflector = _reflector(endpoint.url, max_retries=3)
  with caplog.at_level(logging.DEBUG):
    assert reflector.propose([_request()]) == [None]
  assert len(endpoint.requests) == 1
  assert reflector.stats == TeacherStats(requests=1, failed_calls=1, http_errors=1)
  assert "HTTP 400" in caplog.text and "not retried" in caplog.text
  assert "[redacted]" in caplog.text  # the echoed header was scrubbed, not dropped silently
  assert len(caplog.records) == 2  # the attempt and the summary
  assert all("\n" not in r.getMessage() for r in caplog.records)
  for text in (caplog.text, repr(reflector), repr(reflector.cfg), repr(vars(reflector)), repr(reflector.stats)):
    assert SECRET not in text


def test_connection_refused_gives_none(monkeypatch, caplog):
  monkeypatch.setenv(KEY_ENV, SECRET)
  with socket.socket() as probe:  # a port that was free a moment ago and now has no listener
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  reflector = _reflector(f"http://127.0.0.1:{port}", max_retries=2)
  with caplog.at_level(logging.WARNING):
    assert reflector.propose([_request(), _request("q2")]) == [None, None]
  assert reflector.stats == TeacherStats(requests=2, failed_calls=2, retries=4, connection_errors=6)
  assert len(caplog.records) == 7 and SECRET not in caplog.text  # six attempts and the summary


def test_concurrency_is_bounded_and_order_kept(endpoint):
  questions = [f"question {i}" for i in range(6)]
  endpoint.mode, endpoint.expected = "concurrency", len(questions)
  reflector = _reflector(endpoint.url, max_concurrency=2, timeout_s=10.0)
  assert reflector.propose([_request(q) for q in questions]) == [f"Improved for {q}" for q in questions]
  assert endpoint.max_in_flight == 2
  assert reflector.stats == TeacherStats(requests=6, accepted=6)


def test_rejected_reply_counts_as_rejection_not_failure(endpoint):
  reflector = _reflector(endpoint.url, max_template_chars=10)
  assert reflector.propose([_request()]) == [None]
  assert reflector.stats == TeacherStats(requests=1, rejected_too_long=1)


def test_missing_key_variable_fails_at_construction(monkeypatch):
  monkeypatch.delenv(KEY_ENV, raising=False)
  with pytest.raises(ValueError, match=KEY_ENV):
    _reflector("http://127.0.0.1:9")


@pytest.mark.parametrize(
    "field, value",
    [
        ("base_url", "ftp://x"), ("model", " "), ("api_key_env", "sk-abc key"), ("timeout_s", 0.0),
        ("max_retries", -1), ("backoff_s", -0.1), ("max_concurrency", 0), ("max_tokens", 0), ("temperature", -1.0),
        ("max_template_chars", -1), ("extra_body", "{"),
    ],
)
def test_config_rejects_bad_values(field, value):
  settings = dict(base_url="http://localhost:8000/v1", model="m") | {field: value}
  with pytest.raises(ValueError, match=field):
    TeacherRefConfig(**settings)


def test_endpoint_and_backoff_hand_cases():
  assert TeacherRefConfig(base_url="http://h:1/v1/", model="m").endpoint == "http://h:1/v1/chat/completions"
  assert backoff_delay(0, 1.0, 30.0, 0.0) == 0.5
  assert backoff_delay(3, 1.0, 30.0, 1.0) == 8.0
  assert backoff_delay(10, 1.0, 30.0, 1.0) == 30.0
  assert backoff_delay(10, 1.0, 30.0, 0.0) == 15.0
