"""Shared fixtures: tiny random HF checkpoints (tests/hf_models.py), each built and saved once per test session; and
the `slow` marker for every test that uses a module's multi-process or subprocess run (the fast tier is
`pytest -m "not slow"`)."""

import os

import pytest

# Every test runs on the CPU. With libtpu installed (the test extra brings it, for compiling against TPU topologies)
# JAX would otherwise try to open a TPU first in every process, tests' subprocesses included.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Fixtures that run a whole multi-process training, a notebook, or an 8-device subprocess for a module's tests.
SLOW_FIXTURES = {"runs", "eight_devices", "smoke_run"}


def pytest_collection_modifyitems(items):
  for item in items:
    if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory):
  """variant name -> (checkpoint directory, the PyTorch reference model it was saved from); built on first use."""
  import hf_models  # pylint: disable=import-outside-toplevel  (torch: only for the tests that compare against it)

  built = {}

  def get(variant: str):
    if variant not in built:
      built[variant] = hf_models.save_tiny_model(variant, tmp_path_factory.mktemp("hf") / variant)
    return built[variant]

  return get



REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.py"
