"""Tokenizers of HF checkpoint directories, and the prompt path every rollout takes: user text -> chat template -> ids."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import transformers


# tokenizer_config classes that mean "exactly what tokenizer.json says". AutoTokenizer would instead pick the class
# of config.json's model_type (Qwen2Tokenizer for the built-in policy), whose own pre-tokenizer drops the spaces a
# character tokenizer must keep.
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """The checkpoint's own tokenizer (with its chat template), read from local files only."""
  config_path = pathlib.Path(checkpoint_dir) / "tokenizer_config.json"
  generic = config_path.is_file() and json.loads(config_path.read_text()).get("tokenizer_class") in _GENERIC_CLASSES
  loader = transformers.PreTrainedTokenizerFast if generic else transformers.AutoTokenizer
  tokenizer = loader.from_pretrained(str(checkpoint_dir), local_files_only=True)
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token  # many chat models ship no pad token; padding is masked anyway
  return tokenizer


def supports_thinking_switch(tokenizer) -> bool:
  """Whether the chat template reads `enable_thinking` (Qwen3's switch). Templates that do not are rendered without
  the argument, exactly as they always were."""
  template = getattr(tokenizer, "chat_template", None)
  if isinstance(template, dict):  # named templates ("default", "tool_use", ...)
    template = " ".join(str(t) for t in template.values())
  return isinstance(template, str) and "enable_thinking" in template


def chat_prompt_ids(tokenizer, user_texts: Sequence[str], *, enable_thinking: bool = False) -> list[list[int]]:
  """Token ids of one user turn each, rendered with the chat template and the generation prompt (one batched render
  and one batched tokenizer call). A template with Qwen3's thinking switch gets `enable_thinking`; with False (the
  paper's setting) Qwen3 closes an empty think block in the prompt and answers without thinking."""
  if not user_texts:
    return []
  if tokenizer.chat_template is None:
    return [tokenizer.encode(text, add_special_tokens=True) for text in user_texts]
  switch = {"enable_thinking": enable_thinking} if supports_thinking_switch(tokenizer) else {}
  rendered = tokenizer.apply_chat_template([[{"role": "user", "content": text}] for text in user_texts],
                                           tokenize=False, add_generation_prompt=True, **switch)
  return [list(ids) for ids in tokenizer(list(rendered), add_special_tokens=False)["input_ids"]]


def decode_completions(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """Generated text of each row, without special tokens (EOS, padding)."""
  return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(tokens, lengths)]


def stop_token_ids(tokenizer) -> list[int]:
  """EOS ids to stop sampling on: the tokenizer's EOS plus a chat end-of-turn marker if it has one."""
  ids = {tokenizer.eos_token_id}
  for marker in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
    token_id = tokenizer.convert_tokens_to_ids(marker)
    if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
      ids.add(token_id)
  return sorted(i for i in ids if i is not None)
