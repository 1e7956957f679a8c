"""The built-in base policy: shipped for the demo's spec, cached per other spec, a real HF checkpoint.

The demo's base ships in the package (p2o_jax/models/builtin_base); tests/test_builtin_hardness.py measures it and
tests/test_base_rebuild.py rebuilds it from scratch (opt-in: ~15 minutes).
"""

import dataclasses
import json

import numpy as np
import torch
import transformers

from conftest import DEMO_CONFIG
from p2o_jax.config import load_config_file
from p2o_jax.data import arithmetic, corpus
from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.builders import base_policy_spec, build_builtin_base
from p2o_jax.models import builtin
from p2o_jax.models.builtin import (BUILD_INFO, SHIPPED_BASE_DIR, BasePolicySpec, build_cached_base_policy,
                                    build_info, find_base_policy)
from p2o_jax.models.hf_checkpoint import load_hf_model
from p2o_jax.models.tokenizer import chat_prompt_ids, load_tokenizer
from p2o_jax.sft import SFTConfig


def test_the_shipped_base_is_the_demo_configs_and_its_weights_are_the_recorded_ones():
  info = build_info(SHIPPED_BASE_DIR)
  spec = base_policy_spec(load_config_file(DEMO_CONFIG))
  assert info["fingerprint"] == spec.fingerprint(), "configs/demo_cpu.py's builtin section no longer makes the " \
      "shipped base: rebuild it (python -m p2o_jax.main --config configs/demo_cpu.py --rebuild_base) and ship it"
  assert info["spec"] == json.loads(json.dumps(dataclasses.asdict(spec)))
  assert builtin.file_sha256(SHIPPED_BASE_DIR / builtin.WEIGHTS_FILE) == info["weights_sha256"]
  assert find_base_policy("/nonexistent-cache", spec) == SHIPPED_BASE_DIR  # found without building anything


def test_the_shipped_base_loads_in_ours_and_in_transformers_with_equal_logits():
  model = load_hf_model(SHIPPED_BASE_DIR)
  tokenizer = load_tokenizer(SHIPPED_BASE_DIR)
  ids = chat_prompt_ids(tokenizer, ["Q: 73+5="])[0]
  ours, _ = model(np.asarray([ids]), np.arange(len(ids))[None], np.ones((1, len(ids)), bool))
  hf = transformers.AutoModelForCausalLM.from_pretrained(SHIPPED_BASE_DIR)
  with torch.no_grad():
    theirs = hf(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_other_specs_are_found_once_built_into_the_cache_and_transformers_loads_them(tmp_path):
  spec = BasePolicySpec(sft=SFTConfig(steps=0), num_layers=1, hidden_size=32)
  assert find_base_policy(tmp_path, spec) is None  # finding never builds
  path = build_cached_base_policy(tmp_path, spec, why="a test")
  assert find_base_policy(tmp_path, spec) == path
  other = build_cached_base_policy(tmp_path, BasePolicySpec(sft=SFTConfig(steps=0), num_layers=2, hidden_size=32),
                                   why="a test")
  assert other != path and other.parent == path.parent
  info = json.loads((path / BUILD_INFO).read_text())
  assert info["spec"]["num_layers"] == 1 and info["fingerprint"] == spec.fingerprint()
  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  assert hf.config.model_type == "qwen2" and hf.config.num_hidden_layers == 1


def test_rebuild_builds_into_the_cache_even_when_the_shipped_base_matches(tmp_path, monkeypatch, caplog):
  built = []
  monkeypatch.setattr(builtin, "build_base_policy", lambda path, spec: built.append(path) or path)
  c = load_config_file(DEMO_CONFIG)
  c.model.builtin_cache_dir = str(tmp_path)
  spec = base_policy_spec(c)
  assert build_builtin_base(c, rebuilding=True) == tmp_path / f"base-{spec.fingerprint()}"
  assert built == [tmp_path / f"base-{spec.fingerprint()}"]
  assert "--rebuild_base; the shipped base is left as it is" in caplog.text and "about 1" in caplog.text


def test_the_checkpoint_tokenizer_keeps_spaces_like_the_one_sft_used(tmp_path):
  """Beside a qwen2 config.json, AutoTokenizer picks Qwen2Tokenizer, which dropped every space: rollouts then fed the
  policy prompts unlike anything SFT showed it."""
  spec = BasePolicySpec(sft=SFTConfig(steps=0), num_layers=1, hidden_size=32)
  path = build_cached_base_policy(tmp_path, spec, why="a test")
  text = "<user>Add the numbers one at a time.\n\nQ: 12+34=\nA: The answer is 46"
  built, loaded = build_char_tokenizer(), load_tokenizer(path)
  assert loaded.encode(text, add_special_tokens=False) == built.encode(text, add_special_tokens=False)
  assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
  assert chat_prompt_ids(loaded, ["Q: 1 + 2="]) == chat_prompt_ids(built, ["Q: 1 + 2="])


def test_sft_teaches_the_corpus_completion(tmp_path):
  """A few SFT steps on ONE example drive its completion's likelihood up: the SFT path really trains what it saves."""
  world = arithmetic.WorldConfig(lsb_first=True)
  spec = BasePolicySpec(world=world, sft=SFTConfig(steps=60, warmup_steps=5, lr=1e-2, rows=4, row_len=128),
                        num_examples=1, num_layers=1, hidden_size=32)
  path = build_cached_base_policy(tmp_path, spec, why="a test")
  prompt, completion = corpus.corpus_examples(world, spec.corpus, 1, seed=spec.sft.seed)[0]
  tokenizer = load_tokenizer(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(path)
  ids = tokenizer.encode(prompt + completion, add_special_tokens=False)
  n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
  with torch.no_grad():
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
  target_logp = logp[torch.arange(n_prompt - 1, len(ids) - 1), torch.tensor(ids[n_prompt:])]
  assert float(target_logp.mean()) > -0.5  # random init: about -log(100) = -4.6 per character
