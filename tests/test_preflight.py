"""Preflight: what would crash a run after minutes of work is found in seconds, as one line, before the wait."""

import logging

import numpy as np
import pytest

from p2o_jax import experiment
from p2o_jax.config import base_config
from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.data.records import Query
from p2o_jax.models import builtin
from p2o_jax.preflight import PreflightError, check_chat_template, check_verifier, check_writable_dir
from p2o_jax.rewards.pool import VerifierPool

QUERIES = [Query("q0", "Q: 1+2=", "3"), Query("q1", "Q: 2+2=", "4")]


def test_a_writable_directory_passes_and_leaves_nothing_behind(tmp_path):
  check_writable_dir(tmp_path / "new" / "run", "config.workdir")
  assert list((tmp_path / "new" / "run").iterdir()) == []


def test_an_unwritable_directory_is_one_line_naming_the_key(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(PreflightError, match=r"^config.workdir .*file/run is not writable"):
    check_writable_dir(tmp_path / "file" / "run", "config.workdir")


def test_gcs_paths_are_left_to_orbax():
  check_writable_dir("gs://bucket/ckpt", "the checkpoint directory")  # no network touched, no error


class _NoJinja:
  chat_template = "{{ messages }}"

  def apply_chat_template(self, *args, **kwargs):
    raise ImportError("apply_chat_template requires jinja2 to be installed")


def test_a_chat_template_that_cannot_render_is_a_preflight_error():
  with pytest.raises(PreflightError, match="the chat template cannot be rendered: .*jinja2"):
    check_chat_template(_NoJinja(), ["Q: 1+2="])
  check_chat_template(build_char_tokenizer(), ["Q: 1+2="])  # the built-in one renders


def test_the_verifier_pool_scores_each_reference_against_itself():
  with VerifierPool(num_workers=1) as pool:
    check_verifier(pool.scorer("{question}"), QUERIES)


def test_a_reward_function_of_the_wrong_shape_fails_the_preflight_in_one_line():
  with VerifierPool(num_workers=1, functions="equivalence, reward_fns:two_values") as pool:
    with pytest.raises(PreflightError, match="RewardFunctionError: reward function 'reward_fns:two_values' returned "
                                             r"list \[1.0, 0.0\] for 1 completion"):
      check_verifier(pool.scorer("{question}"), QUERIES)


def test_a_verifier_that_cannot_score_is_an_error_and_one_that_rejects_references_a_warning(caplog):
  def broken(responses, references):
    raise OSError("worker could not start")

  with pytest.raises(PreflightError, match="the reward pool cannot score: OSError: worker could not start"):
    check_verifier(broken, QUERIES)
  with caplog.at_level(logging.WARNING):
    check_verifier(lambda r, refs: np.asarray([1.0, 0.0]), QUERIES)
  assert "1 of 2 checked queries (ids ['q1'])" in caplog.text


def test_run_training_checks_the_chat_template_before_building_a_base(tmp_path, monkeypatch):
  """The crash a new user met after a 19-minute base build (jinja2 missing) now happens before the build starts."""
  c = base_config()
  c.workdir = str(tmp_path / "run")
  c.data.source = "builtin"
  c.data.builtin_train_size = 8
  c.builtin.sft_steps = 3  # not the shipped base: a build would be needed
  c.model.builtin_cache_dir = str(tmp_path / "cache")
  monkeypatch.setattr(builtin, "build_base_policy", lambda *a, **k: pytest.fail("the base build started"))
  monkeypatch.setattr("p2o_jax.preflight.chat_prompt_ids", _NoJinja().apply_chat_template)
  with pytest.raises(PreflightError, match="jinja2"):
    experiment.run_training(c)
