"""The sparse MoE layer (vbatch/engine/layers/moe.py) against an independent dense computation.

Proves: the router (softmax in float32, top-k, renormalised or not) and the weighted sum of
gated SiLU experts equal a dense reference that runs every expert on every token and masks by
the top-k choice (float32, and bfloat16 against Hugging Face's own MoE blocks, whose casts the
layer follows); per-expert and fused checkpoint layouts load the same parameters; a missing
expert or a wrongly shaped tensor is refused; only experts that received tokens run, each on
just its tokens; CPU bf16 weight packing changes nothing; tp=2 (each rank a slice of every
expert, one all-reduce) equals tp=1; a fused (transformers-5 in-memory) checkpoint runs
end to end with the same logits as the per-expert one; Qwen3-MoE's dense / sparse layer rule
is HF's; unimplemented config fields are refused.
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import without_native_kernels

from vbatch.engine.layers.moe import (
    ExpertWeight,
    FusedExperts,
    SparseMoeBlock,
    check_experts_loaded,
    expert_checkpoint_tensors,
)
from vbatch.parallel.state import ParallelState

HIDDEN, INTER, EXPERTS, TOP_K, TOKENS = 16, 12, 6, 2, 40


def _weights(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {"router": torch.randn(EXPERTS, HIDDEN, generator=gen),
            "gate": torch.randn(EXPERTS, INTER, HIDDEN, generator=gen) * 0.3,
            "up": torch.randn(EXPERTS, INTER, HIDDEN, generator=gen) * 0.3,
            "down": torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * 0.3,
            "x": torch.randn(TOKENS, HIDDEN, generator=gen)}


def _dense_reference(w, x, renormalize: bool) -> torch.Tensor:
    """Every expert on every token (float64), masked by the top-k choice: no shared code."""
    x, router = x.double(), w["router"].double()
    probs = torch.softmax(x @ router.T, dim=-1)
    top = torch.topk(probs, TOP_K, dim=-1)
    mask = torch.zeros_like(probs).scatter(1, top.indices, top.values)
    if renormalize:
        mask = mask / mask.sum(dim=-1, keepdim=True)
    outs = torch.stack([(F.silu(x @ w["gate"][e].double().T) * (x @ w["up"][e].double().T))
                        @ w["down"][e].double().T for e in range(EXPERTS)], dim=1)
    return (outs * mask[..., None]).sum(dim=1)


def _per_expert(w, parts=("gate_proj", "up_proj", "down_proj"), prefix="mlp"):
    names = dict(zip(("gate", "up", "down"), parts))
    tensors = [(f"{prefix}.experts.{e}.{names[p]}.weight", w[p][e].clone())
               for e in range(EXPERTS) for p in ("gate", "up", "down")]
    return [(f"{prefix}.gate.weight", w["router"].clone()), *tensors]


def _fused(w, prefix="mlp"):
    return [(f"{prefix}.gate.weight", w["router"].clone()),
            (f"{prefix}.experts.gate_up_proj", torch.cat([w["gate"], w["up"]], dim=1)),
            (f"{prefix}.experts.down_proj", w["down"].clone())]


def _load(block: SparseMoeBlock, tensors, parts) -> None:
    params = dict(block.named_parameters())
    for name, tensor in expert_checkpoint_tensors(tensors, parts):
        name = name.removeprefix("mlp.")
        param = params[name]
        getattr(param, "weight_loader", lambda p, t: p.data.copy_(t))(param, tensor)
    check_experts_loaded(block)


def _block(ps, dtype=torch.float32, renormalize=True, in_hidden_dtype=False, inter=INTER):
    return SparseMoeBlock(HIDDEN, inter, EXPERTS, TOP_K, "silu", ps, dtype,
                          renormalize=renormalize, weights_in_hidden_dtype=in_hidden_dtype)


QWEN_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
MIXTRAL_PARTS = {"w1": "gate", "w3": "up", "w2": "down"}


@pytest.mark.parametrize("mode", ["native-kernels", "torch-ops"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_block_matches_dense_reference(renormalize, mode, monkeypatch):
    if mode == "torch-ops":
        without_native_kernels(monkeypatch)
    w = _weights()
    block = _block(ParallelState.single(), renormalize=renormalize)
    _load(block, _per_expert(w), QWEN_PARTS)
    expected = _dense_reference(w, w["x"], renormalize).float()
    torch.testing.assert_close(block(w["x"]), expected, atol=1e-5, rtol=1e-5)
    # The test is not vacuous: the tokens pick every expert, and renormalising matters.
    ids = block.gate(w["x"])[1]
    assert len(torch.unique(ids)) == EXPERTS
    other = _dense_reference(w, w["x"], not renormalize).float()
    assert (other - expected).abs().max() > 1e-2


def test_fused_and_per_expert_layouts_load_the_same_parameters():
    w = _weights()
    blocks = [_block(ParallelState.single()) for _ in range(3)]
    _load(blocks[0], _per_expert(w), QWEN_PARTS)
    _load(blocks[1], _per_expert(w, ("w1", "w3", "w2")), MIXTRAL_PARTS)
    _load(blocks[2], _fused(w), QWEN_PARTS)
    for other in blocks[1:]:
        for (name, a), (_, b) in zip(blocks[0].state_dict().items(),
                                     other.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(blocks[0].experts.gate_up_proj[2, :INTER], w["gate"][2])
    torch.testing.assert_close(blocks[0].experts.gate_up_proj[2, INTER:], w["up"][2])


def test_missing_expert_and_bad_shapes_are_refused():
    w = _weights()
    block = _block(ParallelState.single())
    tensors = [t for t in _per_expert(w) if t[0] != "mlp.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match="expert 3 up"):
        _load(block, tensors, QWEN_PARTS)
    experts = _block(ParallelState.single()).experts
    with pytest.raises(ValueError, match="shape"):
        experts.weight_loader(experts.down_proj, ExpertWeight(torch.zeros(HIDDEN + 1, INTER), 0,
                                                              "down"))
    with pytest.raises(ValueError, match="expert 9"):
        experts.weight_loader(experts.down_proj, ExpertWeight(torch.zeros(HIDDEN, INTER), 9,
                                                              "down"))
    with pytest.raises(ValueError, match="gate_up_proj"):
        experts.weight_loader(experts.gate_up_proj, torch.zeros(EXPERTS, INTER, HIDDEN))


def test_only_chosen_experts_run_on_their_tokens(monkeypatch):
    w = _weights()
    block = _block(ParallelState.single())
    _load(block, _per_expert(w), QWEN_PARTS)
    x = w["x"][:3]                                    # 3 tokens x top-2: at most 6 of 6 experts
    ids = block.gate(x)[1]
    calls = []
    run = FusedExperts._expert

    def spy(self, e, rows):
        calls.append((e, rows.shape[0]))
        return run(self, e, rows)
    monkeypatch.setattr(FusedExperts, "_expert", spy)
    block(x)
    chosen = torch.bincount(ids.reshape(-1), minlength=EXPERTS)
    assert calls == [(e, int(n)) for e, n in enumerate(chosen) if n > 0]
    assert sum(n for _, n in calls) == 3 * TOP_K      # no dense compute over all tokens


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_bf16_matches_hf_block(arch):
    """bfloat16: the router weight cast (Qwen3-MoE) or float32 weighting (Mixtral) as HF."""
    import transformers as tf
    w = _weights()
    if arch == "mixtral":
        config = tf.MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER,
                                  num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
        hf = tf.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config)
    else:
        config = tf.Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER,
                                   num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                   norm_topk_prob=False)
        hf = tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        hf.gate.weight.copy_(w["router"])
        hf.experts.gate_up_proj.copy_(torch.cat([w["gate"], w["up"]], dim=1))
        hf.experts.down_proj.copy_(w["down"])
    hf = hf.to(torch.bfloat16)
    x = w["x"].bfloat16()
    with torch.no_grad():
        expected = hf(x[None])[0]
    blocks = {}
    for in_hidden_dtype in (True, False):
        blocks[in_hidden_dtype] = block = _block(
            ParallelState.single(), torch.bfloat16, renormalize=arch == "mixtral",
            in_hidden_dtype=in_hidden_dtype)
        _load(block, _fused(w), QWEN_PARTS)
    block = blocks[arch == "qwen3_moe"]
    # The same ops in the same order as HF: bit-identical; the other cast is not.
    torch.testing.assert_close(block(x), expected, atol=0, rtol=0)
    assert not torch.equal(blocks[arch != "qwen3_moe"](x), expected)
    block.experts.pack_weight()                      # a no-op where oneDNN packing is absent
    torch.testing.assert_close(block(x), expected, atol=0, rtol=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_tp(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    from vbatch.parallel.state import init_parallel_state
    torch.set_num_threads(1)
    ps = init_parallel_state(world_rank=rank, tp_size=world, pp_size=1,
                             init_method=f"tcp://127.0.0.1:{port}", device=torch.device("cpu"),
                             timeout_s=60)
    try:
        w = _weights()
        for tensors in (_per_expert(w), _fused(w)):
            block = _block(ps)
            _load(block, tensors, QWEN_PARTS)
            assert block.experts.gate_up_proj.shape == (EXPERTS, 2 * INTER // world, HIDDEN)
            reference = _block(ParallelState.single())
            _load(reference, _per_expert(w), QWEN_PARTS)
            torch.testing.assert_close(block(w["x"]), reference(w["x"]), atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_tp2_equals_tp1():
    mp.spawn(_check_tp, args=(2, _free_port()), nprocs=2, join=True)


def test_fused_checkpoint_runs_end_to_end(tmp_path):
    """transformers 5's in-memory names (mlp.experts.gate_up_proj, not block_sparse_moe.*)
    load and give the logits of the per-expert checkpoint HF saved."""
    from arch_checkpoints import build_arch_model, save_arch_checkpoint
    from conftest import build_tokenizer, last_stage_logits
    from safetensors.torch import save_file

    from vbatch import LLM
    per_expert = save_arch_checkpoint(tmp_path / "per-expert", "mixtral")
    fused = save_arch_checkpoint(tmp_path / "fused", "mixtral")
    state = build_arch_model("mixtral", build_tokenizer()).state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(fused / "model.safetensors"))
    ids = list(range(3, 40))
    logits = []
    for path in (per_expert, fused):
        llm = LLM(str(path), dtype="float32", kv_cache_memory_gb=0.01)
        try:
            logits.append(last_stage_logits(llm, ids))
        finally:
            llm.llm_engine.shutdown()
    torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)


def test_qwen3_moe_dense_and_sparse_layers_follow_hf():
    import transformers as tf

    from vbatch.engine.layers.mlp import GatedMLP
    from vbatch.engine.models.qwen3_moe import Qwen3MoeForCausalLM
    config = tf.Qwen3MoeConfig(vocab_size=50, hidden_size=HIDDEN, intermediate_size=24,
                               moe_intermediate_size=INTER, num_hidden_layers=6,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                               num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                               decoder_sparse_step=2, mlp_only_layers=[3])
    hf = tf.Qwen3MoeForCausalLM(config)
    ours = Qwen3MoeForCausalLM(config, ParallelState.single(), torch.float32, 64)
    hf_sparse = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in
                 hf.model.layers]
    assert hf_sparse == [False, True, False, False, False, True]
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.layers] == hf_sparse
    assert all(isinstance(layer.mlp, GatedMLP) for layer, s in zip(ours.layers, hf_sparse)
               if not s)


def test_unimplemented_config_fields_are_refused():
    import transformers as tf

    from vbatch.engine.models.registry import check_supported
    mixtral = tf.MixtralConfig(hidden_act="gelu", num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ValueError, match="hidden_act"):
        check_supported(mixtral, 128)
    qwen = tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2)
    check_supported(qwen, 128)                       # the plain config is accepted
    qwen.shared_expert_intermediate_size = 64
    with pytest.raises(ValueError, match="shared_expert_intermediate_size"):
        check_supported(qwen, 128)
    qwen = tf.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2)
    qwen.num_experts_per_tok = 5
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        check_supported(qwen, 128)
