"""The policy: the one place that owns the actor's parameters, the frozen reference parameters, the sampler, the
tokenizer and its chat template. Every text -> sampled text path (rollouts, evaluation, GEPA scoring, Self-Ref
reflection) is `Policy.generate`; nothing else tokenizes, samples and decodes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from p2o_jax.models.decoder import Decoder
from p2o_jax.models.tokenizer import chat_prompt_ids, decode_completions, stop_token_ids
from p2o_jax.p2o.templates import apply_template
from p2o_jax.sampling import Sampler, SamplingConfig, left_truncate

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Generation:
  """Rows are prompt-major: the n samples of user turn i are rows i*n .. i*n+n-1."""

  prompt_ids: list[list[int]]  # per row: the chat-templated prompt it continues (left-truncated if it was too long)
  tokens: np.ndarray  # (rows, max_new_tokens) int32
  mask: np.ndarray  # (rows, max_new_tokens) bool, True on generated tokens (the stopping EOS included)
  logprobs: np.ndarray  # (rows, max_new_tokens) float32: each token's log-prob under the distribution it was drawn from
  texts: list[str]  # per row: the decoded response, without special tokens
  prompts_truncated: int = 0  # rows whose prompt was over the sampler's max_prompt_len and lost its first tokens


class Policy:
  """`generate` samples from the actor (the params being trained) or, with reference=True, from the frozen initial
  params (the KL reference and the Self-Ref reflector), whose prompts may be up to `reference_max_prompt_len` long.

  enable_thinking: what every prompt passes to a chat template with Qwen3's thinking switch (False: the paper's
  "thinking off everywhere"); reflection_enable_thinking: the same for Self-Ref reflection prompts
  (p2o.thinking_in_reflection). Templates without the switch render the same either way.
  A prompt longer than its sampler's max_prompt_len is left-truncated (the authors' truncation='left' for templated
  prompts; dataset prompts over the limit are stopped at load, see preflight.check_prompt_lengths), counted in
  `prompts_truncated` and logged.
  """

  def __init__(self, model: Decoder, tokenizer, *, mesh: jax.sharding.Mesh | None, max_prompt_len: int,
               reference_max_prompt_len: int | None = None, cache_budget_bytes: int = 0, slots: int = 0,
               enable_thinking: bool = False, reflection_enable_thinking: bool = False):
    self.tokenizer, self.mesh = tokenizer, mesh
    self.enable_thinking, self.reflection_enable_thinking = enable_thinking, reflection_enable_thinking
    self.prompts_truncated = 0  # rows over all calls so far (this process's rows for process-local calls)
    self.graphdef, self.params = nnx.split(model)
    self.cache_budget_bytes = cache_budget_bytes  # per device, for every sampler call (0: no budget)
    self.slots = slots  # the most slots a sampler call runs in (0: as many as the budget holds)
    self.sampler = Sampler(model, eos_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                           max_prompt_len=max_prompt_len, mesh=mesh, cache_budget_bytes=cache_budget_bytes,
                           slots=slots)
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

  def prompt_ids(self, user_turns: Sequence[str], *, enable_thinking: bool | None = None) -> list[list[int]]:
    """Chat-templated token ids of each user turn (each distinct turn tokenized once: K rows share one turn), not
    truncated. enable_thinking None: the policy's setting."""
    thinking = self.enable_thinking if enable_thinking is None else enable_thinking
    unique = list(dict.fromkeys(user_turns))
    ids = dict(zip(unique, chat_prompt_ids(self.tokenizer, unique, enable_thinking=thinking)))
    return [ids[turn] for turn in user_turns]

  def generate(self, user_turns: Sequence[str], sampling: SamplingConfig, *, templates: Sequence[str] | None = None,
               n: int = 1, seed: int | jax.Array = 0, process_local: bool = False,
               reference: bool = False, enable_thinking: bool | None = None) -> Generation:
    """`n` responses to each user turn (with `templates[i]` in front of turn i when given) in one sampler call.

    process_local: each process passes its own turns and gets its own rows back (training rollouts); otherwise every
    process passes the same turns and gets every row (evaluation, GEPA); see Sampler.generate.
    enable_thinking None: the policy's setting.
    """
    if templates is not None:
      if len(templates) != len(user_turns):
        raise ValueError(f"{len(templates)} templates for {len(user_turns)} user turns")
      user_turns = [apply_template(t, turn) for t, turn in zip(templates, user_turns)]
    sampler = self._sampler(reference)
    full = self.prompt_ids(user_turns, enable_thinking=enable_thinking)
    prompts, truncated = left_truncate(full, sampler.max_prompt_len)
    if truncated:
      self._note_truncation(len(full), truncated, max(len(full[i]) for i in truncated), sampler.max_prompt_len, n)
    out = sampler.generate(prompts, sampling, n=n, seed=seed, process_local=process_local)
    return Generation(prompt_ids=[p for p in prompts for _ in range(n)], tokens=out.tokens, mask=out.mask,
                      logprobs=out.logprobs, texts=decode_completions(self.tokenizer, out.tokens, out.lengths),
                      prompts_truncated=len(truncated) * n)

  def _note_truncation(self, prompts: int, truncated: Sequence[int], longest: int, limit: int, n: int) -> None:
    self.prompts_truncated += len(truncated) * n
    log.warning("left-truncated %d of %d prompts (longest %d tokens) to their last max_prompt_len=%d tokens, as the "
                "authors' truncation='left' does: a long template loses its head; %d rows so far", len(truncated) * n,
                prompts * n, longest, limit, self.prompts_truncated)

  def _sampler(self, reference: bool) -> Sampler:
    if not reference:
      return self.sampler
    if self.ref_params is None:
      raise ValueError("this policy keeps no reference params (call freeze_reference first)")
    if self._reference_sampler is None:  # reflections are rare: no second copy of the weights
      self._reference_sampler = Sampler(nnx.merge(self.graphdef, self.ref_params), eos_ids=self.sampler.eos_ids,
                                        pad_id=self.pad_id, max_prompt_len=self.reference_max_prompt_len,
                                        mesh=self.mesh, cache_budget_bytes=self.cache_budget_bytes,
                                        slots=self.slots, copy_weights=False)
    return self._reference_sampler
