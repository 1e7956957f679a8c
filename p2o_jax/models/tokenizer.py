"""Tokenizers of HF checkpoint directories, and the prompt path every rollout takes: user text -> chat template -> ids."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import transformers


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """The checkpoint's own tokenizer (with its chat template), read from local files only."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token  # many chat models ship no pad token; padding is masked anyway
  return tokenizer


def chat_prompt_ids(tokenizer, user_texts: Sequence[str]) -> list[list[int]]:
  """Token ids of one user turn each, rendered with the chat template and the generation prompt."""
  if tokenizer.chat_template is None:
    return [tokenizer.encode(text, add_special_tokens=True) for text in user_texts]
  rendered = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True) for text in user_texts]
  return [tokenizer.encode(text, add_special_tokens=False) for text in rendered]


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
