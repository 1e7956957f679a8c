"""Tests for the character tokenizer (p2o_jax/data/char_tokenizer.py): ids, round trips, chat template, HF reload."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from p2o_jax.data import char_tokenizer
from p2o_jax.data.char_tokenizer import build_char_tokenizer

PRINTABLE = "\n" + "".join(chr(c) for c in range(32, 127))


@pytest.fixture(scope="module")
def tokenizer():
  return build_char_tokenizer()


def _random_texts(count: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return ["".join(rng.choice(list(PRINTABLE), size=int(rng.integers(1, 80)))) for _ in range(count)]


def _chat_ids(tok, user_text: str) -> list[int]:
  rendered = tok.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                     add_generation_prompt=True)
  return tok.encode(rendered, add_special_tokens=False)


def test_ids_are_fixed(tokenizer):
  assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
  assert tokenizer.convert_tokens_to_ids("<user>") == 3
  assert len(tokenizer) == 4 + 96
  # "\n" is id 4, then printable ASCII in code-point order: character c has id ord(c) - 32 + 5.
  assert tokenizer.encode("\n A~", add_special_tokens=False) == [4, 5, ord("A") - 27, 99]


def test_round_trip_is_one_token_per_character(tokenizer):
  for text in _random_texts(200, seed=0):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == [4 if c == "\n" else ord(c) - 27 for c in text]
    assert tokenizer.decode(ids) == text


def test_characters_outside_the_vocabulary_become_unk(tokenizer):
  ids = tokenizer.encode("a\tb\u00e9\u20ac", add_special_tokens=False)
  assert ids == [ord("a") - 27, 2, ord("b") - 27, 2, 2]
  assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"


def test_chat_template_renders_user_turn_and_generation_prompt(tokenizer):
  user_text = "Be careful.\n\nQ: 12+34="
  rendered = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                           add_generation_prompt=True)
  assert rendered == "<user>Be careful.\n\nQ: 12+34=\nA:" == char_tokenizer.render_user_prompt(user_text)
  ids = _chat_ids(tokenizer, user_text)
  assert ids[0] == 3 and len(ids) == 1 + len(user_text) + 3
  conversation = [{"role": "user", "content": "Q: 1+2="}, {"role": "assistant", "content": " The answer is 3"}]
  full = tokenizer.apply_chat_template(conversation, tokenize=False)
  assert full == "<user>Q: 1+2=\nA: The answer is 3<eos>"
  assert tokenizer.encode(full, add_special_tokens=False)[-1] == tokenizer.eos_token_id


def test_chat_template_rejects_other_roles(tokenizer):
  with pytest.raises(Exception, match="only user and assistant turns"):
    tokenizer.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_padding_uses_the_pad_id(tokenizer):
  a, b = ord("a") - 27, ord("b") - 27
  right = tokenizer(["ab", "abcd"], padding=True)
  assert right["input_ids"][0] == [a, b, 0, 0] and right["attention_mask"][0] == [1, 1, 0, 0]
  left = tokenizer(["ab", "abcd"], padding=True, padding_side="left")
  assert left["input_ids"][0] == [0, 0, a, b] and left["attention_mask"][0] == [0, 0, 1, 1]


@pytest.mark.slow
def test_saved_tokenizer_reloads_offline_and_behaves_identically(tokenizer, tmp_path):
  tokenizer.save_pretrained(tmp_path)
  texts = _random_texts(30, seed=1) + ["caf\u00e9\t<user>x"]
  # A fresh process with the hub switched off: the directory alone must be enough.
  script = (
      "import json, sys\n"
      "from transformers import AutoTokenizer\n"
      "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
      "texts = json.loads(sys.stdin.read())\n"
      "chat = [tok.apply_chat_template([{'role': 'user', 'content': t}], add_generation_prompt=True,\n"
      "                                tokenize=True)['input_ids'] for t in texts]\n"
      "encoded = [tok.encode(t, add_special_tokens=False) for t in texts]\n"
      "print(json.dumps({'encoded': encoded, 'decoded': [tok.decode(e) for e in encoded], 'chat': chat,\n"
      "                  'special': [tok.pad_token_id, tok.eos_token_id, tok.unk_token_id],\n"
      "                  'template': tok.chat_template}))\n")
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
  result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], input=json.dumps(texts), env=env,
                          capture_output=True, text=True, check=True, timeout=120)
  reloaded = json.loads(result.stdout.strip().splitlines()[-1])
  assert reloaded["encoded"] == [tokenizer.encode(t, add_special_tokens=False) for t in texts]
  assert reloaded["decoded"][:30] == texts[:30]
  assert reloaded["chat"] == [_chat_ids(tokenizer, t) for t in texts]
  assert reloaded["special"] == [0, 1, 2]
  assert reloaded["template"] == char_tokenizer.CHAT_TEMPLATE
