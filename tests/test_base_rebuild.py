"""Rebuilding the demo's base from scratch gives a base as good as the shipped one (opt-in: ~15 minutes of SFT).

    P2O_REBUILD_BASE_TEST=1 python -m pytest tests/test_base_rebuild.py

A rebuild on the CPU that built the shipped base is bit-identical; on another CPU float rounding makes a different
base, which must still measure within TOLERANCE of the shipped one on every figure below.
"""

import os

import pytest

from base_measure import base_measurer
from conftest import DEMO_CONFIG
from p2o_jax.config import load_config_file
from p2o_jax.data.corpus import TRIGGER_INSTRUCTION
from p2o_jax.builders import base_policy_spec
from p2o_jax.models.builtin import SHIPPED_BASE_DIR, build_base_policy

TOLERANCE = 0.10  # absolute accuracy, on 128 held-out problems per split

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("P2O_REBUILD_BASE_TEST") != "1",
                                 reason="rebuilds the demo's base (~15 min of SFT); set P2O_REBUILD_BASE_TEST=1")]


def test_a_rebuilt_base_measures_like_the_shipped_one(tmp_path):
  rebuilt = build_base_policy(tmp_path / "base", base_policy_spec(load_config_file(DEMO_CONFIG)))
  figures = {}
  for name, path in (("shipped", SHIPPED_BASE_DIR), ("rebuilt", rebuilt)):
    with base_measurer(path) as measure:
      plain, triggered = measure(""), measure(TRIGGER_INSTRUCTION)
      figures[name] = {"plain easy": plain["builtin_easy"], "plain hard": plain["builtin_hard"],
                       "trigger hard": triggered["builtin_hard"]}
  print(figures)
  for key, shipped in figures["shipped"].items():
    assert abs(figures["rebuilt"][key] - shipped) <= TOLERANCE, (key, figures)
