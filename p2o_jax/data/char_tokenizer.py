"""The built-in policy's tokenizer: one token per printable ASCII character and newline, in Hugging Face format.

It is built with the `tokenizers` library and wrapped as a `PreTrainedTokenizerFast`, so the tiny policy travels as an
ordinary HF checkpoint directory (save_pretrained / AutoTokenizer.from_pretrained, offline) and every consumer goes
through the same chat-template path a real model would use.

Chat format (one user turn, then the assistant's answer):  "<user>" + user text + "\\nA:" + completion + "<eos>".
"""

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK, USER = "<pad>", "<eos>", "<unk>", "<user>"
SPECIAL_TOKENS = (PAD, EOS, UNK, USER)  # ids 0..3, fixed
CHARACTERS = ("\n",) + tuple(chr(code) for code in range(32, 127))  # ids 4.., fixed
ANSWER_PREFIX = "\nA:"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '" + USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\\nA:' + message['content'] + '" + EOS + "' }}"
    "{%- else -%}{{ raise_exception('the character chat template has only user and assistant turns') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\nA:' }}{%- endif -%}")


def render_user_prompt(user_text: str) -> str:
  """What CHAT_TEMPLATE renders for one user turn with add_generation_prompt=True (the SFT corpus uses this)."""
  return USER + user_text + ANSWER_PREFIX


def _character_tokenizer() -> Tokenizer:
  vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
  tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  # Every character is its own pre-token; "[\s\S]" rather than "." so newlines are split off too.
  tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tokenizer.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
  tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
  return tokenizer


def build_char_tokenizer() -> PreTrainedTokenizerFast:
  """The character tokenizer with pad/eos/unk ids 0/1/2, the "<user>" marker id 3, and CHAT_TEMPLATE."""
  return PreTrainedTokenizerFast(
      tokenizer_object=_character_tokenizer(), pad_token=PAD, eos_token=EOS, unk_token=UNK,
      extra_special_tokens=[USER], chat_template=CHAT_TEMPLATE)
