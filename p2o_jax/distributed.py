"""Multi-host helpers: process 0 decides, everyone receives the same JSON value (templates, reflector replies)."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def broadcast_json(value: Any) -> Any:
  """`value` as process 0 has it, on every process (a no-op with one process). Every process must call this."""
  if jax.process_count() == 1:
    return value
  payload = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.asarray(payload.size, np.int64)))
  buffer = np.zeros(size, np.uint8)
  buffer[:payload.size] = payload
  return json.loads(bytes(multihost_utils.broadcast_one_to_all(buffer)).decode())
