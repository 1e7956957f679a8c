"""Per-token log-probabilities of responses under a policy, on packed (prompt + response) rows.

A row is the prompt left-padded to P tokens followed by the response right-padded to R tokens. The logits that predict
response token j sit at position P - 1 + j, so only those R positions go through the LM head. Log-probs use
logits / temperature, the same distribution the sampler drew from, so an untouched policy has ratio exactly 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from p2o_jax.models.decoder import Decoder, positions_from_mask


def response_logits(model: Decoder, tokens_bt, valid_bt, response_len: int):
  """Logits (b, R, vocab) that predict each response token."""
  prompt_len = tokens_bt.shape[1] - response_len
  hidden, _ = model.hidden_states(tokens_bt, positions_from_mask(valid_bt), valid_bt)
  return model.logits(hidden[:, prompt_len - 1:-1])


def token_logprobs(logits_brv, targets_br, temperature: float):
  """(log-prob of each target under softmax(logits / T), the full log-softmax) in float32."""
  logp_brv = jax.nn.log_softmax(logits_brv.astype(jnp.float32) / temperature, axis=-1)
  return jnp.take_along_axis(logp_brv, targets_br[..., None], axis=-1)[..., 0], logp_brv

