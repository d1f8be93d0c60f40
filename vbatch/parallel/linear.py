"""Megatron-LM tensor-parallel linear layers (inference only).

For Y = X A + b with A of shape [in, out] (stored, as in torch, as W = A^T of shape [out, in]):

* Column parallel: A = [A_1 ... A_p] split along the output dimension. Rank i computes
  Y_i = X A_i (+ b_i). `gather_output` concatenates the Y_i; usually the next layer consumes the
  shard directly.
* Row parallel: A = [A_1; ...; A_p] split along the input dimension and X = [X_1 ... X_p]. Rank i
  computes X_i A_i; one all-reduce sums them, and the bias is added once, after the reduction.

Each parameter carries a `weight_loader(param, loaded, shard_id=None)` that copies this rank's
slice out of a checkpoint tensor. `loaded` is anything with `.shape` and
`.narrow(dim, start, length) -> Tensor` (a torch.Tensor, or a lazy checkpoint view that reads just
that slice from disk), so a rank only ever reads its own 1/tp of each weight.

After loading, `quantize_weight("int8")` (with `--quantization int8`) replaces this rank's
shard by an `Int8Weight` (int8_linear.py), else `pack_weight()` pre-packs a bf16 one for
oneDNN (cpu_packed.py); either way `_linear` runs whichever the layer holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vbatch.parallel.comm import GroupCoordinator
from vbatch.parallel.cpu_packed import PackedWeight, can_pack
from vbatch.parallel.int8_linear import Int8Weight


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division, or a ValueError naming what could not be split."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size "
                         f"({denominator})")
    return numerator // denominator


def _new_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    # Uninitialised on purpose: every parameter is overwritten by the checkpoint.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _copy_into(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"checkpoint tensor for {what} has shape {tuple(src.shape)}, "
                         f"expected {tuple(dst.shape)}")
    dst.copy_(src)


class LinearBase(nn.Module):
    """Shared state of the parallel linear layers: the TP group and device."""

    def __init__(self, tp_group: GroupCoordinator, device: torch.device):
        super().__init__()
        self.tp_group = tp_group
        self.tp_rank = tp_group.rank_in_group
        self.tp_size = tp_group.world_size
        self.device = torch.device(device)
        self.packed_weight: PackedWeight | Int8Weight | None = None

    def quantize_weight(self, method: str, kernels=None) -> None:
        """After loading: replace this rank's (already sharded) weight by its `method`
        quantization; only "int8" exists (dynamic W8A8, see int8_linear.py), using the native
        CPU `kernels` when given. The float weight is released."""
        if method != "int8":
            raise ValueError(f"unknown quantization {method!r}; the only choice is int8")
        if self.packed_weight is None and self.weight is not None:
            self.packed_weight = Int8Weight(self.weight, kernels)
            self.weight = None

    def pack_weight(self) -> None:
        """After loading: move the weight into oneDNN's layout where that helps (CPU bf16, see
        cpu_packed.py); the strided weight is released."""
        if self.packed_weight is None and self.weight is not None and can_pack(self.weight):
            self.packed_weight = PackedWeight(self.weight)
            self.weight = None

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed_weight is not None:
            return self.packed_weight.linear(x, bias)
        return F.linear(x, self.weight, bias)


class ColumnParallelLinear(LinearBase):
    """Y_i = X A_i + b_i: this rank holds output rows [tp_rank*out/tp, (tp_rank+1)*out/tp)."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool, tp_group: GroupCoordinator,
                 dtype: torch.dtype, device: torch.device, gather_output: bool = False):
        super().__init__(tp_group, device)
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, self.tp_size, "output size")
        self.gather_output = gather_output
        self.weight = _new_param((self.output_size_per_partition, input_size), dtype, self.device)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = _new_param((self.output_size_per_partition,), dtype, self.device)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """Copy rows [tp_rank*n, (tp_rank+1)*n) of the full checkpoint tensor."""
        rows = param.shape[0]
        _copy_into(param.data, loaded.narrow(0, self.tp_rank * rows, rows), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._linear(x, self.bias)
        return self.tp_group.all_gather(y, dim=-1) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul.

    Used for LLaMA's gate_proj | up_proj: each rank holds [gate_i; up_i], so the activation can be
    applied locally without communication. `shard_id` is the index of the sub-projection.
    """

    def __init__(self, input_size: int, output_sizes: list[int], *, bias: bool,
                 tp_group: GroupCoordinator, dtype: torch.dtype, device: torch.device):
        for size in output_sizes:
            divide(size, tp_group.world_size, "merged projection size")
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias, tp_group=tp_group,
                         dtype=dtype, device=device)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if shard_id is None:
            raise ValueError("MergedColumnParallelLinear needs the index of the sub-projection")
        per_rank = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _copy_into(param.data.narrow(0, offset, per_rank),
                   loaded.narrow(0, self.tp_rank * per_rank, per_rank), f"shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q | k | v projection, sharded by attention head and aware of GQA.

    Each rank holds num_heads/tp query heads and max(1, num_kv_heads/tp) key/value heads. When
    tp > num_kv_heads, each KV head is replicated on tp/num_kv_heads consecutive ranks (the ranks
    whose query heads use it). Rank layout of the weight rows: [q heads | k heads | v heads].
    """

    def __init__(self, hidden_size: int, head_size: int, num_heads: int, num_kv_heads: int, *,
                 bias: bool, tp_group: GroupCoordinator, dtype: torch.dtype, device: torch.device):
        tp_size = tp_group.world_size
        self.head_size = head_size
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = divide(num_heads, tp_size, "number of attention heads")
        if tp_size >= num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, num_kv_heads,
                                               "tensor-parallel size over KV heads")
        else:
            self.num_kv_heads = divide(num_kv_heads, tp_size, "number of KV heads")
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        per_rank = self.q_size + 2 * self.kv_size
        super().__init__(hidden_size, per_rank * tp_size, bias=bias, tp_group=tp_group,
                         dtype=dtype, device=device)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """Load "q", "k" or "v" from separate tensors, or all three from a fused [q; k; v] tensor
        (shard_id None, as in GPT-2's c_attn)."""
        if shard_id is None:
            q_total = self.total_num_heads * self.head_size
            kv_total = self.total_num_kv_heads * self.head_size
            for sid, base in (("q", 0), ("k", q_total), ("v", q_total + kv_total)):
                self._load_shard(param, loaded, sid, base)
        else:
            self._load_shard(param, loaded, shard_id, 0)

    def _load_shard(self, param: nn.Parameter, loaded, shard_id: str, base: int) -> None:
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.tp_rank * self.q_size
        else:
            kv_head = self.tp_rank // self.num_kv_head_replicas
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, start = self.kv_size, kv_head * self.kv_size
        _copy_into(param.data.narrow(0, offset, size), loaded.narrow(0, base + start, size),
                   f"{shard_id}_proj")


class RowParallelLinear(LinearBase):
    """Y = sum_i X_i A_i + b: this rank holds input columns [tp_rank*in/tp, (tp_rank+1)*in/tp).

    `input_is_parallel`: X arrives already split (the output of a column-parallel layer);
    otherwise this rank takes its slice of the full X. `reduce_results`: all-reduce the partial
    products (one collective); the bias is added once, after it.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool, tp_group: GroupCoordinator,
                 dtype: torch.dtype, device: torch.device, input_is_parallel: bool = True,
                 reduce_results: bool = True):
        super().__init__(tp_group, device)
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = divide(input_size, self.tp_size, "input size")
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.weight = _new_param((output_size, self.input_size_per_partition), dtype, self.device)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = _new_param((output_size,), dtype, self.device)
            self.bias.weight_loader = self.bias_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """Copy columns [tp_rank*n, (tp_rank+1)*n) of the full checkpoint weight."""
        cols = param.shape[1]
        _copy_into(param.data, loaded.narrow(1, self.tp_rank * cols, cols), type(self).__name__)

    def bias_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """The bias is replicated: every rank holds all of it (only one adds it, see forward)."""
        _copy_into(param.data, loaded.narrow(0, 0, param.shape[0]), "row-parallel bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp_size > 1:
            x = x.narrow(-1, self.tp_rank * self.input_size_per_partition,
                         self.input_size_per_partition)
        if self.tp_size == 1:
            return self._linear(x, self.bias)
        y = self._linear(x, None)
        if self.reduce_results:
            y = self.tp_group.all_reduce(y)
            if self.bias is not None:
                y = y + self.bias
        elif self.bias is not None and self.tp_rank == 0:
            y = y + self.bias
        return y
