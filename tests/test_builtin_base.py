"""The built-in base policy: cached per spec, a real HF checkpoint, and a world that stays honest.

The hardness test uses the demo's own base policy (configs/demo_cpu.py), built once into the repository's cache
directory and reused by the next session and by the reduced demo run in tests/test_demo_cli.py.
"""

import json

import torch
import transformers

from p2o_jax.data import arithmetic, corpus
from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.models.builtin import BUILD_INFO, BasePolicySpec, cached_base_policy
from p2o_jax.models.tokenizer import chat_prompt_ids, load_tokenizer
from p2o_jax.sft import SFTConfig


def test_cache_builds_once_per_spec_and_transformers_loads_the_result(tmp_path):
  spec = BasePolicySpec(sft=SFTConfig(steps=0), num_layers=1, hidden_size=32)
  path = cached_base_policy(tmp_path, spec)
  stamp = (path / "model.safetensors").stat().st_mtime_ns
  assert cached_base_policy(tmp_path, spec) == path
  assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
  other = cached_base_policy(tmp_path, BasePolicySpec(sft=SFTConfig(steps=0), num_layers=2, hidden_size=32))
  assert other != path and other.parent == path.parent
  assert json.loads((path / BUILD_INFO).read_text())["spec"]["num_layers"] == 1
  hf = transformers.AutoModelForCausalLM.from_pretrained(path)
  assert hf.config.model_type == "qwen2" and hf.config.num_hidden_layers == 1


def test_the_checkpoint_tokenizer_keeps_spaces_like_the_one_sft_used(tmp_path):
  """Beside a qwen2 config.json, AutoTokenizer picks Qwen2Tokenizer, which dropped every space: rollouts then fed the
  policy prompts unlike anything SFT showed it."""
  path = cached_base_policy(tmp_path, BasePolicySpec(sft=SFTConfig(steps=0), num_layers=1, hidden_size=32))
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
  path = cached_base_policy(tmp_path, spec)
  prompt, completion = corpus.corpus_examples(world, spec.corpus, 1, seed=spec.sft.seed)[0]
  tokenizer = load_tokenizer(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(path)
  ids = tokenizer.encode(prompt + completion, add_special_tokens=False)
  n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
  with torch.no_grad():
    logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
  target_logp = logp[torch.arange(n_prompt - 1, len(ids) - 1), torch.tensor(ids[n_prompt:])]
  assert float(target_logp.mean()) > -0.5  # random init: about -log(100) = -4.6 per character
