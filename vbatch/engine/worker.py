"""A worker: one rank of an engine. Every executor (uni, mp, ray) drives the same class."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vbatch.engine.loader import resolve_model
from vbatch.engine.model_loader import load_model
from vbatch.engine.model_runner import ModelRunner
from vbatch.engine.sequence import ScheduledSequence, StepInput, StepOutput
from vbatch.parallel.state import ParallelState, init_parallel_state


@dataclass
class WorkerSpec:
    """What a worker needs to build its rank of the model (picklable, sent to every rank).

    `model_dir` is the checkpoint on the engine's node. A rank on another node (Ray) that does
    not see that directory resolves `model_source` (the `--model` given, with
    `storage_options` / `allow_pickle`) on its own node: an object-store model is fetched into
    that node's cache, a GGUF converted there; its fingerprint must equal `model_fingerprint`.
    """

    model_dir: str
    hf_config: object
    dtype: torch.dtype
    device: str
    block_size: int
    max_position: int
    seed: int
    num_threads: int | None = None
    model_source: str | None = None
    model_fingerprint: str | None = None
    storage_options: str | None = None
    allow_pickle: bool = False
    quantization: str | None = None


def local_model_dir(spec: WorkerSpec) -> Path:
    """This node's copy of the spec's checkpoint (see `WorkerSpec`). Raises ValueError when
    the model resolved here is not the one the engine resolved."""
    model_dir = Path(spec.model_dir)
    if model_dir.is_dir() or spec.model_source is None:
        return model_dir
    resolved = resolve_model(spec.model_source, allow_pickle=spec.allow_pickle,
                             storage_options=spec.storage_options)
    if spec.model_fingerprint is not None and resolved.fingerprint != spec.model_fingerprint:
        raise ValueError(f"model {spec.model_source} resolves to a different checkpoint on this "
                         f"node than on the engine's ({resolved.path}); make every node see the "
                         "same model")
    return Path(resolved.path)


class Worker:
    """Loads its shard of the model, owns its KV cache, and runs model steps on request."""

    def __init__(self, spec: WorkerSpec, parallel_state: ParallelState | None = None):
        self.spec = spec
        self.device = torch.device(spec.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        torch.manual_seed(spec.seed)
        self.parallel_state = parallel_state or ParallelState.single(self.device)
        model = load_model(local_model_dir(spec), spec.hf_config, self.parallel_state, spec.dtype,
                           spec.max_position, quantization=spec.quantization)
        self.model_runner = ModelRunner(model, block_size=spec.block_size, device=self.device,
                                        dtype=spec.dtype, is_driver=self.parallel_state.is_driver,
                                        pp_group=self.parallel_state.pp)

    def kv_cache_bytes_per_block(self) -> int:
        return self.model_runner.kv_cache_bytes_per_block()

    def available_kv_cache_bytes(self, memory_utilization: float, max_num_batched_tokens: int,
                                 max_num_seqs: int) -> int | None:
        """On CUDA: what this rank can give the KV cache; None on CPU (the budget is explicit).

        Measured, not guessed: one profile step at the engine's limits runs first (every rank
        together), so the peak of torch's allocations covers the weights and the activations
        of the largest step, and memory outside torch's allocator (the CUDA context, NCCL
        communicators, cuBLAS workspaces) is whatever the device reports in use beyond what
        torch reserved. budget = total * utilization - outside torch - peak."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        profile_cache = self.model_runner.profile_run(max_num_batched_tokens, max_num_seqs,
                                                      self.spec.max_position)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - profile_cache
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = total - free - torch.cuda.memory_reserved(self.device)
        return max(0, int(total * memory_utilization - outside_torch - peak))

    def init_kv_cache(self, num_blocks: int) -> None:
        self.model_runner.init_kv_cache(num_blocks)

    def execute_model(self, step: StepInput) -> StepOutput | None:
        return self.model_runner.execute_model(step)

    def parameter_bytes(self) -> int:
        """Bytes of model weights this rank holds (a tied tensor counted once, weights packed
        for oneDNN included)."""
        model = self.model_runner.model
        params = {id(p): p for p in model.parameters()}
        packed = [m.packed_weight.packed for m in model.modules()
                  if getattr(m, "packed_weight", None) is not None]
        return sum(t.numel() * t.element_size() for t in [*params.values(), *packed])

    def step_trace(self) -> list[tuple[float, float]]:
        """(start, end) time.monotonic() of this rank's recent steps, counted from when its
        input was ready (after the receive from the previous pipeline stage)."""
        return list(self.model_runner.step_times)

    def uses_native_kernels(self) -> bool:
        """Whether this rank's attention runs the native CPU kernels (else PyTorch ops)."""
        return all(layer.kernels is not None
                   for layer in self.model_runner.model.attention_layers())

    def compute_logits(self, seqs: list[ScheduledSequence]):
        """Logits of every new token of a step on the last pipeline stage (every TP rank of it
        holds them all), None on the other stages; for tests."""
        return self.model_runner.compute_logits(seqs)


def start_worker(spec: WorkerSpec, *, world_rank: int, tp_size: int, pp_size: int,
                 init_method: str, single_node: bool = False,
                 device_index: int | None = None) -> Worker:
    """Build rank `world_rank` of a tp_size x pp_size engine in this process: join the process
    groups at `init_method`, then load this rank's shard. Shared by the mp and ray executors.
    `single_node`: every rank runs on this node (their sockets stay on loopback).

    On CUDA the rank uses device `cuda:<device_index>` (the ray executor: its own GPU among
    those of the node's ranks), else `cuda:<world_rank mod visible devices>` (mp: the engine's
    GPUs are all visible).
    """
    device = torch.device(spec.device)
    if device.type == "cuda":
        index = (world_rank % max(1, torch.cuda.device_count()) if device_index is None
                 else device_index)
        device = torch.device("cuda", index)
        spec.device = str(device)
    ps = init_parallel_state(world_rank=world_rank, tp_size=tp_size, pp_size=pp_size,
                             init_method=init_method, device=device,
                             single_node=single_node)
    return Worker(spec, ps)
