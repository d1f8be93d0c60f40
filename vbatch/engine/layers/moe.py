"""The sparse mixture-of-experts block (Mixtral, Qwen3-MoE): a top-k router and E gated experts.

    p = softmax(x W_g^T) in float32 over the E experts; (w, ids) = top_k(p) (renormalised to
    sum 1 where the model does); y = sum_k w_k * down_e(act(gate_e(x)) * up_e(x)), e = ids_k.

Tensor parallelism: every rank holds its 1/tp slice of EVERY expert's intermediate dimension
(gate/up split by output rows, down by input columns, as GatedMLP), and the router weight whole.
Each rank routes all tokens identically, runs the experts its tokens chose on its slice, sums
the weighted partial outputs over experts, and one all-reduce per layer (not per expert)
completes them. Why not expert parallelism (whole experts per rank): work per rank stays
balanced whatever the routing, no all-to-all token exchange is needed, and it is vLLM's
default for TP MoE.

Experts run sparsely: the (token, choice) pairs are sorted by expert, each expert that received
tokens runs one matmul on just those rows, and the weighted outputs are scatter-added
(`index_add_`) back in expert order, as Hugging Face does. No expert runs on a token that did
not choose it.

Checkpoints: Hugging Face's fused layout (`experts.gate_up_proj` [E, 2I, H] = [gate; up],
`experts.down_proj` [E, H, I], what transformers 5 holds in memory) loads directly;
per-expert tensors (`experts.{e}.w1/w3/w2.weight` for Mixtral,
`experts.{e}.gate_proj/up_proj/down_proj.weight` for Qwen3-MoE, what Hub checkpoints and
`save_pretrained` write) are renamed onto the fused parameters by `expert_checkpoint_tensors`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vbatch.engine.layers.activation import gated_activation
from vbatch.parallel.cpu_packed import PackedWeight, can_pack
from vbatch.parallel.linear import divide
from vbatch.parallel.state import ParallelState

_EXPERT_TENSOR = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


class ExpertWeight:
    """One expert's checkpoint tensor (lazy view) addressed to the fused expert parameters:
    `part` is "gate", "up" or "down"."""

    def __init__(self, inner, expert: int, part: str):
        self.inner, self.expert, self.part = inner, expert, part
        self.shape = tuple(inner.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.inner.narrow(dim, start, length)


def expert_checkpoint_tensors(weights: Iterable[tuple[str, object]], parts: dict[str, str]
                              ) -> Iterator[tuple[str, object]]:
    """Rename per-expert checkpoint tensors `<prefix>.experts.{e}.<name>.weight` (`parts` maps
    <name> to "gate", "up" or "down") onto `<prefix>.experts.gate_up_proj` / `.down_proj`,
    wrapped as ExpertWeight; every other tensor passes through unchanged."""
    for name, tensor in weights:
        match = _EXPERT_TENSOR.match(name)
        if match is None or match.group(3) not in parts:
            yield name, tensor
            continue
        part = parts[match.group(3)]
        target = "down_proj" if part == "down" else "gate_up_proj"
        yield f"{match.group(1)}.{target}", ExpertWeight(tensor, int(match.group(2)), part)


class TopKRouter(nn.Module):
    """x [T, H] -> (weights [T, k], expert ids [T, k]); `weight` [E, H] is replicated.

    softmax in float32, top-k, renormalised if `renormalize`; with `weights_in_hidden_dtype`
    the weights are cast back to x's dtype (Qwen3-MoE), else kept in float32 (Mixtral)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, renormalize: bool,
                 weights_in_hidden_dtype: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in 1..{num_experts} "
                             "(the number of experts)")
        self.top_k, self.renormalize = top_k, renormalize
        self.weights_in_hidden_dtype = weights_in_hidden_dtype
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype,
                                               device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(F.linear(x, self.weight).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights.to(x.dtype) if self.weights_in_hidden_dtype else weights), ids


class FusedExperts(nn.Module):
    """E gated MLPs, this rank's slice of each: `gate_up_proj` [E, 2*I/tp, H] (this rank's gate
    rows, then its up rows) and `down_proj` [E, H, I/tp]. forward(x, weights, ids) -> the
    weighted sum of the chosen experts' outputs (partial under tp; the block all-reduces)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 activation: str, ps: ParallelState, dtype: torch.dtype):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.tp_rank, self.tp_size = ps.tp_rank, ps.tp_size
        self.shard = divide(intermediate_size, ps.tp_size, "moe intermediate size")
        self.gate_up_proj = nn.Parameter(torch.empty(
            num_experts, 2 * self.shard, hidden_size, dtype=dtype, device=ps.device),
            requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(
            num_experts, hidden_size, self.shard, dtype=dtype, device=ps.device),
            requires_grad=False)
        self.gate_up_proj.weight_loader = self.weight_loader
        self.down_proj.weight_loader = self.weight_loader
        self.act = gated_activation(activation, dtype, ps.device)
        self.loaded: set[tuple[int, str]] = set()
        self.packed: list[tuple[PackedWeight, PackedWeight]] | None = None

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        """This rank's slice of one expert's gate/up/down (an ExpertWeight) or of the fused
        [E, 2I, H] gate_up / [E, H, I] down tensor of all experts."""
        n, start, full = self.shard, self.tp_rank * self.shard, self.intermediate_size
        experts = range(self.num_experts)
        if isinstance(loaded, ExpertWeight):
            if not 0 <= loaded.expert < self.num_experts:
                raise ValueError(f"checkpoint has expert {loaded.expert}, config num_experts "
                                 f"is {self.num_experts}")
            e, part, experts = loaded.expert, loaded.part, [loaded.expert]
            hidden = param.shape[1] if part == "down" else param.shape[2]
            expected = (hidden, full) if part == "down" else (full, hidden)
            if loaded.shape != expected:
                raise ValueError(f"expert {e} {part} tensor has shape {loaded.shape}, expected "
                                 f"{expected}")
            if part == "down":
                pieces = [(param.data[e], loaded.narrow(1, start, n))]
            else:
                offset = 0 if part == "gate" else n
                pieces = [(param.data[e, offset:offset + n], loaded.narrow(0, start, n))]
            parts = [part]
        else:
            fused_down = param is self.down_proj
            expected = ((self.num_experts, param.shape[1], full) if fused_down
                        else (self.num_experts, 2 * full, param.shape[2]))
            if tuple(loaded.shape) != expected:
                raise ValueError(f"fused experts.{'down_proj' if fused_down else 'gate_up_proj'}"
                                 f" has shape {tuple(loaded.shape)}, expected {expected}")
            if fused_down:
                pieces, parts = [(param.data, loaded.narrow(2, start, n))], ["down"]
            else:
                pieces = [(param.data[:, :n], loaded.narrow(1, start, n)),
                          (param.data[:, n:], loaded.narrow(1, full + start, n))]
                parts = ["gate", "up"]
        for dst, src in pieces:
            if tuple(dst.shape) != tuple(src.shape):
                raise ValueError(f"expert checkpoint tensor slice has shape {tuple(src.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(src)
        self.loaded.update((e, part) for e in experts for part in parts)

    def missing(self) -> list[str]:
        """"expert e part" for every expert weight no checkpoint tensor has filled."""
        return [f"expert {e} {part}" for e in range(self.num_experts)
                for part in ("gate", "up", "down") if (e, part) not in self.loaded]

    def pack_weight(self) -> None:
        """After loading, on CPU bf16: each expert's matrices into oneDNN's layout (as
        LinearBase.pack_weight; bit-identical to F.linear)."""
        if self.packed is None and self.gate_up_proj is not None and can_pack(
                self.gate_up_proj[0]):
            self.packed = [(PackedWeight(self.gate_up_proj[e]), PackedWeight(self.down_proj[e]))
                           for e in range(self.num_experts)]
            self.gate_up_proj = self.down_proj = None

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            gate_up, down = self.packed[e]
            return down.linear(self.act(gate_up.linear(x)))
        return F.linear(self.act(F.linear(x, self.gate_up_proj[e])), self.down_proj[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        top_k = ids.shape[-1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)             # (token, choice) pairs by expert
        tokens, pair_weights = order // top_k, weights.reshape(-1)[order]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        end = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            begin, end = end, end + count
            rows = tokens[begin:end]
            y = self._expert(e, x[rows]) * pair_weights[begin:end, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out


class SparseMoeBlock(nn.Module):
    """x [T, H] -> [T, H]: `gate` (TopKRouter) then `experts` (FusedExperts), one all-reduce."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 activation: str, ps: ParallelState, dtype: torch.dtype, *, renormalize: bool,
                 weights_in_hidden_dtype: bool):
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize=renormalize,
                               weights_in_hidden_dtype=weights_in_hidden_dtype, dtype=dtype,
                               device=ps.device)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, activation, ps,
                                    dtype)
        self.tp_group = ps.tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        return self.tp_group.all_reduce(out) if self.tp_group.world_size > 1 else out


def check_experts_loaded(model: nn.Module) -> None:
    """ValueError naming expert weights the checkpoint did not provide (the generic loader
    sees a fused parameter as loaded once any expert's tensor reached it)."""
    for name, module in model.named_modules():
        if isinstance(module, FusedExperts) and module.missing():
            missing = module.missing()
            raise ValueError(f"checkpoint is missing weights for {name}: "
                             f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
