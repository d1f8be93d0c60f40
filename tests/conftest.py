"""Shared fixtures: tiny random checkpoints saved with transformers' own `save_pretrained`.

Each model directory also gets a small byte-level BPE tokenizer trained here (no hub access)
with ChatML special tokens and a chat template, so the whole engine path (tokenize, chat
template, generate, detokenize) runs on CPU in well under a second per test.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# the S3 test server's fixtures (`s3_server`, `s3_bucket`)
pytest_plugins = ["s3_server"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The CPU suite runs on CPU even on a GPU host (every engine, replica and worker a test starts
# inherits it); the `gpu` tests pass their device explicitly.
os.environ.setdefault("VBATCH_DEVICE", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that finish a parallel region sleep instead of spinning for the next one. The
# suite runs many torch processes on few cores at once (tp x pp ranks of one engine, each with
# torch's default of one thread per core; two or more pytest-xdist workers): spinning threads
# then take the cores the other processes need. Measured on 2 cores: SmolLM2 at tp=3 x pp=2 in
# 43 s instead of 280-420 s. Threads per process are left as they are, so the multi-threaded
# paths of the kernels stay tested. Read by libgomp when torch loads: set before any import of
# torch here (and inherited by every process a test starts).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The modules that take longest (measured: `--durations=0` on 2 cores, slowest first). CI runs
# `pytest -n 2 --dist loadfile`, which hands whole modules to workers in collection order:
# starting with these keeps the last minutes from being one worker alone on a long module.
SLOWEST_MODULES = [
    "test_ray_distributed_io", "test_pipeline_parallel", "test_architectures", "test_cli_e2e",
    "test_smollm2", "test_resume", "test_lm_eval", "test_replica_restarts",
    "test_commit_on_time", "test_object_store_output", "test_resume_counts",
    "test_bad_input_cli", "test_runners_cli", "test_ray_executor", "test_cpu_kernels",
    "test_output_dir_safety", "test_ray_exits", "test_loader", "test_runners",
    "test_tensor_parallel", "test_ray_samples", "test_server_lm_eval", "test_remote_model",
    "test_openai_batch", "test_ray_multinode", "test_smollm2_scoring", "test_ray_gpu_plan",
    "test_structured_engine", "test_job_samples", "test_server_parallel",
]


def pytest_collection_modifyitems(config, items):
    """Run the slowest modules first (each module's tests keep their order)."""
    rank = {name: index for index, name in enumerate(SLOWEST_MODULES)}
    position = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(Path(str(item.fspath)).stem, len(rank)),
                                 position[id(item)]))
# A suite started in the background of a non-interactive shell (`.ci/run &`, nohup) inherits
# SIGINT ignored, and so would every job a test starts: the Ctrl-C tests would then fail (the
# job never sees the signal) and leave their jobs running. Give the tests, and the processes
# they start, the default Ctrl-C of a foreground run.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Batch inference turns many prompts into many completions.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a small language model that liked numbers 0123456789.",
] * 20


def build_tokenizer(vocab_size: int = 500):
    """A byte-level BPE tokenizer (PreTrainedTokenizerFast) with <|im_start|>/<|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def save_tiny_model(path: Path, kind: str, *, seed: int = 0) -> Path:
    """Save a tiny random HF model of `kind` (llama-gqa-untied, llama-gqa-tied, gpt2) and its
    tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if kind.startswith("llama"):
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, rms_norm_eps=1e-5,
                             tie_word_embeddings=kind.endswith("-tied"),
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        if "rope-llama3" in kind:
            config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 128}
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=512,
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    # Random init is small; widen the weights so greedy decoding is not degenerate.
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2)
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tp3_llama(path: Path) -> Path:
    """A tiny random LLaMA whose 6 query / 3 KV heads split over tp=3 (and 4 layers over
    pp=2), with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192,
                         num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=3,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """kind -> directory, for every tiny architecture the engine supports."""
    root = tmp_path_factory.mktemp("tiny-models")
    kinds = ["llama-gqa-untied", "llama-gqa-tied", "gpt2", "llama-rope-llama3-untied"]
    return {kind: save_tiny_model(root / kind, kind) for kind in kinds}


@pytest.fixture(scope="session")
def portable_kernels(tmp_path_factory):
    """The native CPU kernels built without AVX-512 (x86 only), once per session."""
    from vbatch.engine.kernels import cpu_kernels as ck
    return ck.CpuKernels(ck.build_library(tmp_path_factory.mktemp("portable"), "cc",
                                          ("-mno-avx512f",)))


@pytest.fixture(scope="module", params=["native", "portable"])
def kernels(request):
    """The native CPU kernels as built for this CPU, and (on x86) built without AVX-512: the
    code CPUs without it run (bf16 rounding in integer arithmetic instead of vcvtneps2bf16,
    16-lane vectors split over AVX2 registers)."""
    import platform

    from vbatch.engine.kernels import cpu_kernels as ck
    built = ck.cpu_kernels()
    if built is None:
        pytest.skip("native CPU kernels unavailable (no C compiler, or VBATCH_CPU_KERNELS=0)")
    if request.param == "native":
        return built
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the portable variant is built by disabling AVX-512 (x86 only)")
    return request.getfixturevalue("portable_kernels")


@pytest.fixture(scope="session")
def hf_smollm2():
    """(model, tokenizer): the default model as transformers' own GGUF loader dequantizes it,
    float32, eval mode; the test oracle of several modules, loaded once (~20 s). Read-only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vbatch.engine.loader import default_model_file
    gguf = default_model_file()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def two_node_cluster():
    """(ray, cluster): a head and a worker raylet with one CPU each; this process connected."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
        cluster.wait_for_nodes()
        yield ray, cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def vbatch_command() -> list[str]:
    """The installed `vbatch` console script, else `python -m vbatch`."""
    import shutil
    import sys
    exe = shutil.which("vbatch")
    return [exe] if exe else [sys.executable, "-m", "vbatch"]


def small_job_command(source, model, output, *extra: str, max_tokens: int) -> list[str]:
    """`vbatch run` of a small, deterministic job: 4-row parts and batches, 2 sequences at a
    time, greedy float32, exactly `max_tokens` tokens a row (EOS ignored)."""
    return [*vbatch_command(), "run", str(source), "--model", str(model), "--output", str(output),
            "--rows-per-file", "4", "--batch-size", "4", "--max-num-seqs", "2",
            "--max-tokens", str(max_tokens), "--ignore-eos", "--temperature", "0",
            "--dtype", "float32", *extra]


def run_offline(args: list[str]):
    """Run `args` with the hub offline; the completed process (output captured as text)."""
    import os
    import subprocess
    return subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):", "Once upon a time"]


def write_prompt_jsonl(path, num_rows: int):
    """`num_rows` JSON lines `{"prompt": ...}` cycling through `PROMPTS` (each made unique)."""
    import json
    path.write_text("".join(json.dumps({"prompt": f"{PROMPTS[i % 4]} {i}"}) + "\n"
                            for i in range(num_rows)))
    return path


def last_stage_logits(llm, token_ids: list[int]):
    """Logits of a one-sequence prefill of `token_ids` through every rank of `llm`'s engine,
    as the last pipeline stage (TP rank 0) computed them."""
    from vbatch.engine.sequence import ScheduledSequence
    seq = ScheduledSequence(seq_id=0, token_ids=token_ids, start_position=0,
                            block_table=list(range(1, 1 + -(-len(token_ids) // 8))),
                            temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=0,
                            row_key="k", output_index=0)
    results = llm.llm_engine.executor.collective_rpc("compute_logits", [seq])
    return next(r for r in results if r is not None)



def without_native_kernels(patch) -> None:
    """Make models built under `patch` (a pytest MonkeyPatch) use PyTorch ops only, as on GPUs
    or machines without a C compiler."""
    import vbatch.engine.kernels.cpu_kernels
    patch.setattr(vbatch.engine.kernels.cpu_kernels, "cpu_kernels", lambda: None)
