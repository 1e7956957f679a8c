"""Teacher-Ref: a strong external model behind an OpenAI-compatible chat endpoint writes the new GEPA templates.

Standard library only (urllib + a bounded thread pool), so the trainer needs no HTTP client package. An endpoint that is
down, slow or talking nonsense costs at most (max_retries + 1) attempts per proposal, each at most ~2 x timeout_s, with
exponential backoff between them, and turns that proposal into None (counted and logged); it never raises out of
`propose`, because a GEPA iteration must survive a flaky teacher. (The authors' handler retries forever, 1 s apart.)
A reply whose `content` is null or empty falls back to `reasoning_content` (a reasoning parser put everything there):
its text after the first </think>, as in the authors' handler.
The API key is read from the environment at call time and lives only in the outgoing request; it is never stored on
the config or the reflector and is scrubbed from every log line.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from p2o_jax.p2o.records import ReflectionRequest
from p2o_jax.p2o.reflection import ReflectionStats, build_reflection_prompt, templates_from_replies

logger = logging.getLogger(__name__)

_MAX_RESPONSE_BYTES = 8 * 1024 * 1024  # a chat reply of 2048 tokens is far smaller; more is a broken endpoint
_ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class TeacherRefConfig:
  """Where the teacher lives and how hard to try. `api_key_env` is the NAME of the variable holding the key."""

  base_url: str  # e.g. "https://api.example.com/v1"; "/chat/completions" is appended
  model: str
  api_key_env: str | None = "OPENAI_API_KEY"  # None: send no Authorization header (a local server)
  timeout_s: float = 120.0  # per socket operation (connect, each read); an attempt also ends after 2 x timeout_s
  max_retries: int = 5
  backoff_s: float = 1.0  # first retry waits ~backoff_s, doubling each time
  max_backoff_s: float = 30.0
  max_concurrency: int = 8
  temperature: float = 0.6
  max_tokens: int = 2048
  max_template_chars: int = 0  # a longer reflected template is rejected; 0: no cap (the authors' code)
  max_example_chars: int = 0  # per-example character cap of the reflection prompt; 0: only its token budget
  extra_body: str = ""  # a JSON object merged into every request, e.g. '{"chat_template_kwargs": {...}}'

  def __post_init__(self):
    if not self.base_url.startswith(("http://", "https://")):
      raise ValueError(f"teacher_ref.base_url must start with http:// or https://, got {self.base_url!r}")
    if not self.model.strip():
      raise ValueError("teacher_ref.model must be a non-empty model name")
    if self.api_key_env is not None and not _ENV_VAR_NAME.fullmatch(self.api_key_env):
      raise ValueError(f"teacher_ref.api_key_env must be an environment variable NAME, got {self.api_key_env!r}")
    if not self.timeout_s > 0:
      raise ValueError(f"teacher_ref.timeout_s must be positive, got {self.timeout_s}")
    for name in ("max_retries", "backoff_s", "max_backoff_s", "temperature"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"teacher_ref.{name} must be >= 0, got {getattr(self, name)}")
    for name in ("max_concurrency", "max_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"teacher_ref.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("max_template_chars", "max_example_chars"):
      if getattr(self, name) < 0:
        raise ValueError(f"teacher_ref.{name} must be >= 0 (0: no cap), got {getattr(self, name)}")
    self.extra_fields()  # a malformed extra_body fails here, not at the first request

  def extra_fields(self) -> dict:
    """extra_body as a dict ({} when empty)."""
    if not self.extra_body.strip():
      return {}
    try:
      extra = json.loads(self.extra_body)
    except ValueError as e:
      raise ValueError(f"teacher_ref.extra_body is not valid JSON ({e}): {self.extra_body!r}") from None
    if not isinstance(extra, dict) or {"model", "messages"} & set(extra):
      raise ValueError(f"teacher_ref.extra_body must be a JSON object without 'model' or 'messages', got "
                       f"{self.extra_body!r}")
    return extra

  @property
  def endpoint(self) -> str:
    return self.base_url.rstrip("/") + "/chat/completions"


@dataclasses.dataclass
class TeacherStats(ReflectionStats):
  """ReflectionStats plus what went wrong on the wire. Each failed attempt counts once in one of the four kinds."""

  failed_calls: int = 0  # proposals that got no reply at all after every attempt (that parent's reflection is empty)
  reasoning_fallbacks: int = 0  # replies taken from reasoning_content because content was null or empty
  retries: int = 0
  http_errors: int = 0
  timeouts: int = 0
  connection_errors: int = 0
  malformed_responses: int = 0


class _AttemptFailed(Exception):
  """One attempt failed; `kind` is a TeacherStats field, `retryable` says whether another attempt may help."""

  def __init__(self, kind: str, detail: str, retryable: bool):
    super().__init__(detail)
    self.kind = kind
    self.detail = detail
    self.retryable = retryable


@dataclasses.dataclass(frozen=True)
class _CallResult:
  reply: str | None
  attempts: int
  failures: tuple[str, ...]  # one failure-kind TeacherStats field name per failed attempt
  from_reasoning: bool = False


def backoff_delay(retry_index: int, base_s: float, cap_s: float, unit_draw: float) -> float:
  """Seconds to wait before retry `retry_index` (0-based): base * 2**i, capped, scaled by a jitter in [0.5, 1]."""
  return min(cap_s, base_s * 2.0**retry_index) * (0.5 + 0.5 * unit_draw)


def _redact(text: str, secret: str | None) -> str:
  one_line = " ".join(text.split())
  return one_line.replace(secret, "[redacted]") if secret else one_line


def _reply_text(body: bytes) -> tuple[str, bool]:
  """(the assistant's text, whether it came from the reasoning field) of a chat-completions response; a response
  without a message, or with content that is neither text nor null, is malformed.

  Null or empty content: the text after the first </think> of `reasoning_content` (or the whole of it when it has no
  </think>), as the authors' handler does; vLLM's newer `reasoning` field is read the same way. Neither: an empty reply
  (no retry, as the authors'), which the template extraction rejects and counts.
  """
  try:
    message = json.loads(body)["choices"][0]["message"]
    content = message.get("content")
  except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
    raise _AttemptFailed("malformed_responses", f"malformed response ({type(exc).__name__})", retryable=True) from None
  if content is not None and not isinstance(content, str):
    raise _AttemptFailed("malformed_responses", "malformed response (content is not text)", retryable=True)
  if content and content.strip():
    return content, False
  for field in ("reasoning_content", "reasoning"):
    reasoning = message.get(field)
    if isinstance(reasoning, str) and reasoning.strip():
      return reasoning.split("</think>", 1)[-1].strip(), True
  return "", False


def _is_timeout(exc: BaseException) -> bool:
  return isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)


class TeacherReflector:
  """Reflector that asks an OpenAI-compatible chat endpoint, up to `max_concurrency` requests at a time."""

  def __init__(self, cfg: TeacherRefConfig):
    self.cfg = cfg
    self.stats = TeacherStats()
    self._rng = random.Random()  # only jitters the backoff; nothing downstream depends on it
    self._read_api_key()  # fail at construction, not hours into training, if the variable is missing

  def __repr__(self) -> str:
    cfg = self.cfg
    return f"TeacherReflector(endpoint={cfg.endpoint!r}, model={cfg.model!r}, api_key_env={cfg.api_key_env!r})"

  def _read_api_key(self) -> str | None:
    if self.cfg.api_key_env is None:
      return None
    key = os.environ.get(self.cfg.api_key_env, "").strip()
    if not key:
      raise ValueError(f"teacher_ref: environment variable {self.cfg.api_key_env} (the API key) is not set")
    if not key.isascii() or not key.isprintable():
      raise ValueError(f"teacher_ref: the API key in {self.cfg.api_key_env} has non-ASCII or control characters")
    return key

  def propose(self, requests: Sequence[ReflectionRequest]) -> list[str | None]:
    """One new template (or None) per request, in order; endpoint failures are counted, never raised."""
    self.stats.requests += len(requests)
    if not requests:
      return []
    api_key = self._read_api_key()
    prompts = [build_reflection_prompt(r, max_example_chars=self.cfg.max_example_chars) for r in requests]
    workers = min(self.cfg.max_concurrency, len(prompts))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teacher-ref") as pool:
      results = list(pool.map(lambda prompt: self._call_with_retries(prompt, api_key), prompts))
    for result in results:
      self._count(result)
    failed = sum(r.reply is None for r in results)
    if failed:
      logger.warning("teacher-ref: %d of %d proposals got no reply from %s after up to %d attempts each; their "
                     "reflections are empty and the search goes on", failed, len(results), self.cfg.endpoint,
                     self.cfg.max_retries + 1)
    return templates_from_replies([r.reply for r in results], self.stats, max_chars=self.cfg.max_template_chars)

  def _count(self, result: _CallResult) -> None:
    # Counting happens here on the caller's thread, so the workers never share mutable state.
    self.stats.retries += result.attempts - 1
    self.stats.failed_calls += result.reply is None
    self.stats.reasoning_fallbacks += result.from_reasoning
    for kind in result.failures:
      setattr(self.stats, kind, getattr(self.stats, kind) + 1)

  def _call_with_retries(self, prompt: str, api_key: str | None) -> _CallResult:
    failures: list[str] = []
    attempts = self.cfg.max_retries + 1
    for attempt in range(attempts):
      if attempt:
        delay = backoff_delay(attempt - 1, self.cfg.backoff_s, self.cfg.max_backoff_s, self._rng.random())
        time.sleep(delay)
      try:
        reply, from_reasoning = self._post_once(prompt, api_key)
        return _CallResult(reply, attempt + 1, tuple(failures), from_reasoning)
      except _AttemptFailed as exc:
        failures.append(exc.kind)
        logger.warning(
            "teacher-ref attempt %d/%d to %s failed: %s%s",
            attempt + 1, attempts, self.cfg.endpoint, _redact(exc.detail, api_key),
            "" if exc.retryable else " (not retried)",
        )
        if not exc.retryable:
          return _CallResult(None, attempt + 1, tuple(failures))
    return _CallResult(None, attempts, tuple(failures))

  def _post_once(self, prompt: str, api_key: str | None) -> tuple[str, bool]:
    payload = {
        "model": self.cfg.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": self.cfg.temperature,
        "max_tokens": self.cfg.max_tokens,
        **self.cfg.extra_fields(),
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
      headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        self.cfg.endpoint, data=json.dumps(payload).encode(), headers=headers, method="POST"
    )
    # The socket timeout bounds each blocking operation; the deadline bounds a server that trickles its reply.
    deadline = time.monotonic() + 2 * self.cfg.timeout_s
    try:
      with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
        body = _read_until(response, deadline, _MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
      raise _http_failure(exc) from None
    except http.client.HTTPException as exc:  # not an HTTP reply at all (bad status line, cut-off body)
      raise _AttemptFailed("malformed_responses", f"broken HTTP reply ({type(exc).__name__})", retryable=True) from None
    except (urllib.error.URLError, OSError) as exc:
      if _is_timeout(exc):
        raise _AttemptFailed("timeouts", f"timed out after {self.cfg.timeout_s}s", retryable=True) from None
      reason = getattr(exc, "reason", exc)
      raise _AttemptFailed("connection_errors", f"connection error: {reason}", retryable=True) from None
    if body is None:
      raise _AttemptFailed("timeouts", f"reply still incomplete after {2 * self.cfg.timeout_s}s", retryable=True)
    if len(body) > _MAX_RESPONSE_BYTES:
      raise _AttemptFailed("malformed_responses", "response larger than 8 MiB", retryable=True)
    return _reply_text(body)


def _read_until(response, deadline: float, limit: int) -> bytes | None:
  """The body, read one socket read at a time, up to `limit` bytes; None when `deadline` passes first."""
  chunks, size = [], 0
  while size < limit:
    if time.monotonic() > deadline:
      return None
    chunk = response.read1(min(65536, limit - size))
    if not chunk:
      break
    chunks.append(chunk)
    size += len(chunk)
  return b"".join(chunks)


def teacher_config(c) -> TeacherRefConfig:
  """The teacher settings of a run config (p2o.teacher.*, and the reflection sampling settings of p2o.*)."""
  p, t = c.p2o, c.p2o.teacher
  return TeacherRefConfig(base_url=t.base_url, model=t.model, api_key_env=t.api_key_env or None,
                          timeout_s=t.timeout_s, max_retries=t.max_retries, backoff_s=t.backoff_s,
                          max_backoff_s=t.max_backoff_s, max_concurrency=t.max_concurrency,
                          temperature=p.reflection_temperature, max_tokens=p.reflection_max_new_tokens,
                          max_template_chars=p.max_template_chars, extra_body=t.extra_body)


def _http_failure(exc: urllib.error.HTTPError) -> _AttemptFailed:
  """429 and 5xx are worth another try; any other status means the request itself is wrong."""
  try:
    snippet = exc.read(300).decode("utf-8", errors="replace")
  except (OSError, http.client.HTTPException):
    snippet = ""
  finally:
    exc.close()
  retryable = exc.code == 429 or exc.code >= 500
  return _AttemptFailed("http_errors", f"HTTP {exc.code} {exc.reason}: {snippet}", retryable=retryable)
