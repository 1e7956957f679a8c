"""Teacher-Ref: a strong external model behind an OpenAI-compatible chat endpoint writes the new GEPA templates.

Standard library only (urllib + a bounded thread pool), so the trainer needs no HTTP client package. An endpoint that is
down, slow or talking nonsense costs at most (max_retries + 1) attempts per proposal and turns that proposal into None
(counted and logged); it never raises out of `propose`, because a GEPA iteration must survive a flaky teacher.
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
  timeout_s: float = 120.0  # per socket operation (connect, each read)
  max_retries: int = 3
  backoff_s: float = 1.0  # first retry waits ~backoff_s, doubling each time
  max_backoff_s: float = 30.0
  max_concurrency: int = 8
  temperature: float = 0.6
  max_tokens: int = 2048
  max_template_chars: int = 2000
  max_example_chars: int = 3000

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
    for name in ("max_concurrency", "max_tokens", "max_template_chars", "max_example_chars"):
      if getattr(self, name) < 1:
        raise ValueError(f"teacher_ref.{name} must be >= 1, got {getattr(self, name)}")

  @property
  def endpoint(self) -> str:
    return self.base_url.rstrip("/") + "/chat/completions"


@dataclasses.dataclass
class TeacherStats(ReflectionStats):
  """ReflectionStats plus what went wrong on the wire. Each failed attempt counts once in one of the four kinds."""

  failed_calls: int = 0  # proposals that got no reply at all after every attempt
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


def backoff_delay(retry_index: int, base_s: float, cap_s: float, unit_draw: float) -> float:
  """Seconds to wait before retry `retry_index` (0-based): base * 2**i, capped, scaled by a jitter in [0.5, 1]."""
  return min(cap_s, base_s * 2.0**retry_index) * (0.5 + 0.5 * unit_draw)


def _redact(text: str, secret: str | None) -> str:
  one_line = " ".join(text.split())
  return one_line.replace(secret, "[redacted]") if secret else one_line


def _reply_content(body: bytes) -> str:
  """The assistant message of a chat-completions response; anything else is a malformed response."""
  try:
    content = json.loads(body)["choices"][0]["message"]["content"]
  except (ValueError, KeyError, IndexError, TypeError) as exc:
    raise _AttemptFailed("malformed_responses", f"malformed response ({type(exc).__name__})", retryable=True) from None
  if not isinstance(content, str):
    raise _AttemptFailed("malformed_responses", "malformed response (content is not text)", retryable=True)
  return content


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
    return templates_from_replies([r.reply for r in results], self.stats, max_chars=self.cfg.max_template_chars)

  def _count(self, result: _CallResult) -> None:
    # Counting happens here on the caller's thread, so the workers never share mutable state.
    self.stats.retries += result.attempts - 1
    self.stats.failed_calls += result.reply is None
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
        return _CallResult(self._post_once(prompt, api_key), attempt + 1, tuple(failures))
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

  def _post_once(self, prompt: str, api_key: str | None) -> str:
    payload = {
        "model": self.cfg.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": self.cfg.temperature,
        "max_tokens": self.cfg.max_tokens,
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
      headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        self.cfg.endpoint, data=json.dumps(payload).encode(), headers=headers, method="POST"
    )
    try:
      with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
        body = response.read(_MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
      raise _http_failure(exc) from None
    except http.client.HTTPException as exc:  # not an HTTP reply at all (bad status line, cut-off body)
      raise _AttemptFailed("malformed_responses", f"broken HTTP reply ({type(exc).__name__})", retryable=True) from None
    except (urllib.error.URLError, OSError) as exc:
      if _is_timeout(exc):
        raise _AttemptFailed("timeouts", f"timed out after {self.cfg.timeout_s}s", retryable=True) from None
      reason = getattr(exc, "reason", exc)
      raise _AttemptFailed("connection_errors", f"connection error: {reason}", retryable=True) from None
    if len(body) > _MAX_RESPONSE_BYTES:
      raise _AttemptFailed("malformed_responses", "response larger than 8 MiB", retryable=True)
    return _reply_content(body)


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
