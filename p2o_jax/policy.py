"""The policy: the one place that owns the actor's parameters, the frozen reference parameters, the sampler, the
tokenizer and its chat template. Every text -> sampled text path (rollouts, evaluation, GEPA scoring, Self-Ref
reflection) is `Policy.generate`; nothing else tokenizes, samples and decodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from p2o_jax.models.decoder import Decoder
from p2o_jax.models.tokenizer import chat_prompt_ids, decode_completions, stop_token_ids
from p2o_jax.p2o.templates import apply_template
from p2o_jax.sampling import Sampler, SamplingConfig


@dataclasses.dataclass(frozen=True)
class Generation:
  """Rows are prompt-major: the n samples of user turn i are rows i*n .. i*n+n-1."""

  prompt_ids: list[list[int]]  # per row: the chat-templated prompt it continues
  tokens: np.ndarray  # (rows, max_new_tokens) int32
  mask: np.ndarray  # (rows, max_new_tokens) bool, True on generated tokens (the stopping EOS included)
  logprobs: np.ndarray  # (rows, max_new_tokens) float32: each token's log-prob under the distribution it was drawn from
  texts: list[str]  # per row: the decoded response, without special tokens


class Policy:
  """`generate` samples from the actor (the params being trained) or, with reference=True, from the frozen initial
  params (the KL reference and the Self-Ref reflector), whose prompts may be up to `reference_max_prompt_len` long."""

  def __init__(self, model: Decoder, tokenizer, *, mesh: jax.sharding.Mesh | None, max_prompt_len: int,
               reference_max_prompt_len: int | None = None, cache_budget_bytes: int = 0):
    self.tokenizer, self.mesh = tokenizer, mesh
    self.graphdef, self.params = nnx.split(model)
    self.cache_budget_bytes = cache_budget_bytes  # per device, for every sampler call (0: no budget)
    self.sampler = Sampler(model, eos_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                           max_prompt_len=max_prompt_len, mesh=mesh, cache_budget_bytes=cache_budget_bytes)
    self.ref_params: nnx.State | None = None  # see freeze_reference
    self.reference_max_prompt_len = reference_max_prompt_len or max_prompt_len
    self._reference_sampler: Sampler | None = None

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_token_id

  def freeze_reference(self) -> None:
    """Keep a frozen copy of the current params as the reference (call before training moves them); idempotent."""
    if self.ref_params is None:  # a copy, not an alias: the actor's buffers are donated to the train step
      self.ref_params = jax.tree.map(jnp.copy, self.params)

  def set_params(self, params: nnx.State) -> None:
    """The actor's new weights (same shapes and shardings): sampling uses them from now on, without recompiling."""
    self.params = params
    self.sampler.set_params(params)

  def model(self) -> Decoder:
    return nnx.merge(self.graphdef, self.params)

  def prompt_ids(self, user_turns: Sequence[str]) -> list[list[int]]:
    """Chat-templated token ids of each user turn (each distinct turn tokenized once: K rows share one turn)."""
    unique = list(dict.fromkeys(user_turns))
    ids = dict(zip(unique, chat_prompt_ids(self.tokenizer, unique)))
    return [ids[turn] for turn in user_turns]

  def generate(self, user_turns: Sequence[str], sampling: SamplingConfig, *, templates: Sequence[str] | None = None,
               n: int = 1, seed: int | jax.Array = 0, process_local: bool = False,
               reference: bool = False) -> Generation:
    """`n` responses to each user turn (with `templates[i]` in front of turn i when given) in one sampler call.

    process_local: each process passes its own turns and gets its own rows back (training rollouts); otherwise every
    process passes the same turns and gets every row (evaluation, GEPA); see Sampler.generate.
    """
    if templates is not None:
      if len(templates) != len(user_turns):
        raise ValueError(f"{len(templates)} templates for {len(user_turns)} user turns")
      user_turns = [apply_template(t, turn) for t, turn in zip(templates, user_turns)]
    prompts = self.prompt_ids(user_turns)
    out = self._sampler(reference).generate(prompts, sampling, n=n, seed=seed, process_local=process_local)
    return Generation(prompt_ids=[p for p in prompts for _ in range(n)], tokens=out.tokens, mask=out.mask,
                      logprobs=out.logprobs, texts=decode_completions(self.tokenizer, out.tokens, out.lengths))

  def _sampler(self, reference: bool) -> Sampler:
    if not reference:
      return self.sampler
    if self.ref_params is None:
      raise ValueError("this policy keeps no reference params (call freeze_reference first)")
    if self._reference_sampler is None:
      self._reference_sampler = Sampler(nnx.merge(self.graphdef, self.ref_params), eos_ids=self.sampler.eos_ids,
                                        pad_id=self.pad_id, max_prompt_len=self.reference_max_prompt_len,
                                        mesh=self.mesh, cache_budget_bytes=self.cache_budget_bytes,
                                        copy_weights=False)  # reflections are rare: no second copy of the weights
    return self._reference_sampler
