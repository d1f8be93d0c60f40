"""One rank's model step: scheduled sequences -> input tensors -> forward -> sampled tokens."""
from __future__ import annotations

import time
from collections import deque

import torch

from vbatch.engine.layers.attention import AttentionMetadata, allocate_kv_cache
from vbatch.engine.logprobs import SampledLogprobs, prompt_logprobs
from vbatch.engine.penalties import apply_penalties
from vbatch.engine.sampler import SamplingMetadata, sample, to_device
from vbatch.engine.sequence import PromptLogprobs, ScheduledSequence, StepInput, StepOutput
from vbatch.parallel.comm import GroupCoordinator
from vbatch.parallel.pipeline import StageLink

# Sequences whose keys/values are gathered and attended together, so the gathered copy is
# still in cache when attention reads it. On the 2-core CPU, whole 256-row jobs ran about as
# fast with 128 as with no chunking and ~10% slower with 64 (runs vary by ~10%).
ROWS_PER_CHUNK = 128


class ModelRunner:
    """Owns this rank's model and KV cache, and runs one step at a time.

    `execute_model` returns a `StepOutput` (each sequence's sampled token ids, in order, and
    the logprobs asked for) on the sampling rank and None elsewhere. Under pipeline
    parallelism every stage builds the same step metadata from the same sequences (each
    stage's KV cache holds its own layers, under the same block ids); a stage after the
    first receives its input hidden states from the previous stage, and a stage before the
    last sends its output on and returns None.
    """

    def __init__(self, model: torch.nn.Module, *, block_size: int, device: torch.device,
                 dtype: torch.dtype, is_driver: bool = True,
                 pp_group: GroupCoordinator | None = None):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.is_driver = is_driver
        self.stage = StageLink(pp_group or GroupCoordinator.single())
        self.num_blocks = 0
        # (start, end) of recent steps on time.monotonic(), one clock for every process of the
        # node: shows whether pipeline stages overlap (benchmarks/pipeline_overlap.py).
        self.step_times: deque[tuple[float, float]] = deque(maxlen=4096)
        self._compute_start = 0.0

    def kv_cache_bytes_per_block(self) -> int:
        """Bytes one block costs over all of this rank's attention layers (keys + values)."""
        layers = self.model.attention_layers()
        per_token = sum(2 * layer.num_kv_heads * layer.head_dim for layer in layers)
        return per_token * self.block_size * torch.finfo(self.dtype).bits // 8

    def init_kv_cache(self, num_blocks: int) -> None:
        """Allocate every layer's [2, num_kv_heads, num_blocks, block_size, head_dim] cache."""
        self.num_blocks = num_blocks
        for layer in self.model.attention_layers():
            layer.bind_cache(allocate_kv_cache(num_blocks, self.block_size, layer.num_kv_heads,
                                               layer.head_dim, self.dtype, self.device))

    def profile_run(self, num_tokens: int, num_seqs: int, max_len: int) -> int:
        """One step at the engine's limits (`num_tokens` new tokens over `num_seqs` dummy
        prompts of at most `max_len` tokens (more prompts when needed), sampled) on a
        throwaway cache just large enough for it, so the device's peak
        memory includes the activations of the largest step; the cache is unbound and freed
        after. Every rank of the engine must run it together (its collectives run). Returns the
        bytes of the throwaway cache (to leave out of the measured peak)."""
        num_seqs = max(1, min(max(num_seqs, -(-num_tokens // max_len)), num_tokens))
        lengths = [num_tokens // num_seqs + (index < num_tokens % num_seqs)
                   for index in range(num_seqs)]
        block_tables, next_block = [], 1                      # block 0: the null block
        for length in lengths:
            count = -(-length // self.block_size)
            block_tables.append(list(range(next_block, next_block + count)))
            next_block += count
        layers = self.model.attention_layers()
        caches = [allocate_kv_cache(next_block, self.block_size, layer.num_kv_heads,
                                    layer.head_dim, self.dtype, self.device) for layer in layers]
        for layer, cache in zip(layers, caches):
            layer.bind_cache(cache)
        seqs = [ScheduledSequence(seq_id=index, token_ids=[0] * length, start_position=0,
                                  block_table=table, temperature=0.0, top_p=1.0, top_k=0,
                                  min_p=0.0, seed=0, row_key="profile", output_index=0)
                for index, (length, table) in enumerate(zip(lengths, block_tables))]
        try:
            self.execute_model(StepInput(seqs, [], None))
        finally:
            for layer in layers:
                layer.kv_cache = None
        return sum(cache.numel() * cache.element_size() for cache in caches)

    @torch.inference_mode()
    def execute_model(self, step: StepInput) -> StepOutput | None:
        """Run the step's new tokens through the model; sample each sequence's token(s).

        Every rank first does the step's copy-on-write block copies in its own KV cache.
        Sequences run sorted by context length, so each attention chunk pads its keys only to
        its own longest context; results come back in the caller's order.
        """
        if step.blocks_to_copy:
            self._copy_blocks(step.blocks_to_copy)
        seqs = step.seqs
        # decodes first, then prefills, each by context length (attention chunks, PyTorch path)
        order = sorted(range(len(seqs)), key=lambda i: (
            len(seqs[i].token_ids) > 1, seqs[i].start_position + len(seqs[i].token_ids)))
        seqs = [seqs[i] for i in order]
        input_ids, positions, meta, logits_index = self._prepare(seqs)
        # the sampling settings go to the device before the forward is queued behind them
        sampling = (SamplingMetadata.build(seqs, self.device)
                    if self.is_driver and self.stage.is_last else None)
        hidden = self._run_stage(input_ids, positions, meta)
        output = None
        if hidden is not None:
            prompt_results = self._prompt_logprobs(seqs, hidden, input_ids, logits_index)
            logits = self.model.compute_logits(hidden[logits_index])
            if self.is_driver:
                output = self._sample(seqs, logits, step.grammar_bitmask, sampling)
                output = _unsort(output, order, prompt_results)
        self.step_times.append((self._compute_start, time.monotonic()))
        return output

    def _sample(self, seqs: list[ScheduledSequence], logits: torch.Tensor,
                grammar_bitmask, meta: SamplingMetadata) -> StepOutput:
        """Token ids (and their logprobs) for each sequence, in `seqs` order."""
        if meta.logits_rows is not None:
            logits = logits.index_select(0, meta.logits_rows)
            rows = [s for s in seqs for _ in range(s.num_samples)]
        else:
            rows = seqs
        want_logprobs = [r for r, s in enumerate(rows) if s.num_logprobs >= 0]
        penalised = [r for r, s in enumerate(rows) if s.history is not None]
        constrained = [r for r, s in enumerate(rows) if s.grammar_row >= 0]
        raw = None
        if want_logprobs:      # from the raw logits, before penalties and masks change them
            max_top = max(rows[r].num_logprobs for r in want_logprobs)
            if len(want_logprobs) == len(rows):
                raw = SampledLogprobs(logits, max_top, bool(penalised or constrained))
            else:
                raw = SampledLogprobs(logits[want_logprobs], max_top)   # a copy already
        if penalised:
            logits = logits.float()
            apply_penalties(logits, penalised, [rows[r] for r in penalised])
        if constrained:
            from vbatch.engine.structured_output import apply_bitmask  # noqa: PLC0415 - only constrained steps load xgrammar
            bitmask = grammar_bitmask.index_select(0, torch.tensor(
                [rows[r].grammar_row for r in constrained]))
            apply_bitmask(logits, bitmask, constrained)
        tokens = sample(logits, meta)
        sample_logprobs = None
        if raw is not None:
            entries = raw.entries(tokens[want_logprobs],
                                  [rows[r].num_logprobs for r in want_logprobs])
            sample_logprobs = [None] * len(rows)
            for r, entry in zip(want_logprobs, entries):
                sample_logprobs[r] = entry
        flat = tokens.tolist()
        token_ids, logprobs, row = [], [] if sample_logprobs is not None else None, 0
        for seq in seqs:
            token_ids.append(flat[row:row + seq.num_samples])
            if logprobs is not None:
                picked = sample_logprobs[row:row + seq.num_samples]
                logprobs.append(None if picked[0] is None else picked)
            row += seq.num_samples
        return StepOutput(token_ids=token_ids, logprobs=logprobs)

    def _prompt_logprobs(self, seqs: list[ScheduledSequence], hidden: torch.Tensor,
                         input_ids: torch.Tensor, logits_index: torch.Tensor
                         ) -> dict[int, PromptLogprobs]:
        """Prompt logprobs of the sequences that ask for them this step (index in `seqs` ->
        result; filled on the driver only). Such a sequence computes its whole prompt."""
        results = {}
        for index, seq in enumerate(seqs):
            if seq.num_prompt_logprobs < 0:
                continue
            end = int(logits_index[index]) + 1
            start = end - len(seq.token_ids)
            result = prompt_logprobs(self.model.compute_logits, hidden[start:end],
                                     input_ids[start:end], seq.num_prompt_logprobs,
                                     self.is_driver)
            if result is not None:
                results[index] = result
        return results

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """cache[:, :, destination] = cache[:, :, source] in every layer, in order."""
        for layer in self.model.attention_layers():
            cache = layer.kv_cache
            for source, destination in copies:
                cache[:, :, destination].copy_(cache[:, :, source])

    @torch.inference_mode()
    def compute_logits(self, seqs: list[ScheduledSequence]) -> torch.Tensor | None:
        """Logits of every new token of the step ([T, V]) on the last stage (None on the
        others); used by tests against Hugging Face."""
        input_ids, positions, meta, _ = self._prepare(seqs)
        hidden = self._run_stage(input_ids, positions, meta)
        return None if hidden is None else self.model.compute_logits(hidden)

    def _run_stage(self, input_ids, positions, meta) -> torch.Tensor | None:
        """This stage's layers: the final hidden states on the last stage, else None (the
        output went to the next stage)."""
        hidden_in = None
        if not self.stage.is_first:
            hidden_in = self.stage.recv_from_previous(len(input_ids), self.model.hidden_size,
                                                      self.dtype, self.device)
        self._compute_start = time.monotonic()
        hidden = self.model(input_ids, positions, meta, hidden_in)
        if self.stage.is_last:
            return hidden
        self.stage.send_to_next(hidden)
        return None

    def _prepare(self, seqs: list[ScheduledSequence]):
        device, bs = self.device, self.block_size
        query_lens = [len(s.token_ids) for s in seqs]
        starts = [s.start_position for s in seqs]
        context_lens = [st + q for st, q in zip(starts, query_lens)]
        max_blocks = -(-max(context_lens) // bs)
        block_tables = torch.tensor([s.block_table[:max_blocks] + [0] * (max_blocks - len(
            s.block_table[:max_blocks])) for s in seqs], dtype=torch.int64)
        input_ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.int64)
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        seq_index = torch.repeat_interleave(torch.arange(len(seqs)), q_lens)
        cu_q = torch.cumsum(q_lens, 0) - q_lens          # first new token of each sequence
        offset_in_seq = torch.arange(len(input_ids)) - cu_q[seq_index]
        positions = torch.tensor(starts, dtype=torch.int64)[seq_index] + offset_in_seq
        slot_mapping = block_tables[seq_index, positions // bs] * bs + positions % bs
        # every int64 input of the step in one host buffer: one copy (pinned, asynchronous on
        # a GPU) instead of one synchronous copy per tensor
        host_seq_index, host_context_lens = seq_index, positions + 1
        parts = [input_ids, positions, slot_mapping, seq_index, positions + 1, cu_q + q_lens - 1,
                 q_lens, torch.tensor(context_lens, dtype=torch.int64), block_tables.view(-1)]
        on_device = to_device(torch.cat(parts), device).split([len(p) for p in parts])
        (input_ids, positions, slot_mapping, seq_index, token_context_lens, logits_index,
         q_lens, ctx_lens, flat_tables) = on_device
        meta = AttentionMetadata.build(
            slot_mapping=slot_mapping, block_tables=flat_tables.view(block_tables.shape),
            token_seq_index=seq_index, token_context_lens=token_context_lens,
            query_lens=query_lens, context_lens=context_lens, query_lens_tensor=q_lens,
            context_lens_tensor=ctx_lens, block_size=bs, rows_per_chunk=ROWS_PER_CHUNK,
            host_token_seq_index=host_seq_index, host_token_context_lens=host_context_lens)
        return input_ids, positions, meta, logits_index


def _unsort(output: StepOutput, order: list[int], prompt_results: dict[int, PromptLogprobs]
            ) -> StepOutput:
    """`output` of the sorted sequences, back in the caller's order (sorted i = order[i])."""
    token_ids: list = [None] * len(order)
    logprobs = None if output.logprobs is None else [None] * len(order)
    for position, index in enumerate(order):
        token_ids[index] = output.token_ids[position]
        if logprobs is not None:
            logprobs[index] = output.logprobs[position]
    prompt = {order[position]: result for position, result in prompt_results.items()}
    return StepOutput(token_ids=token_ids, logprobs=logprobs, prompt_logprobs=prompt or None)
