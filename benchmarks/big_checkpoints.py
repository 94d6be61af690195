"""Google's big Switch checkpoints on a small machine: load time, peak memory and greedy decoding of
models with the real architectures of switch-base-128, switch-base-256 and switch-large-128
(docs/models.md, "Google's checkpoints: sizes"), ours (memory-mapped, int8 or offloaded experts)
against transformers + accelerate (``device_map="auto"``, ``max_memory``, ``offload_folder``).

The weights are random (written once, in Hugging Face's format: bfloat16 ``.bin`` shards as
Google's come, or safetensors), so the speeds and memory are the real ones and the tokens are
noise; outputs are compared between runs that should agree. Each measurement runs in a fresh
process inside a memory cgroup whose limit is the budget (page cache included, as the kernel counts
it; root is needed, ``--no-cgroup`` measures without), so a run that needs more is killed, not
flattered. Reported: load seconds, peak anonymous and file-backed resident memory (sampled from
/proc every 20 ms), the cgroup's peak, time to the first token, decoding tokens/s after it at
batch 1, tokens/s of ``--concurrent`` requests through the server's scheduler (the engine's step,
no HTTP), and the expert cache's hit rate and bytes read.

    python benchmarks/big_checkpoints.py write google/switch-base-256 /data/sb256 --format bin
    python benchmarks/big_checkpoints.py measure /data/sb256 --max-memory 20GiB --dtype bfloat16 --json a.json
    python benchmarks/big_checkpoints.py measure /data/sb256 --max-memory 20GiB --impl transformers --json b.json
    python benchmarks/big_checkpoints.py table a.json b.json          # the docs' table

Measure nothing else at the same time: the disk and both cores are the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint_sizes import CHECKPOINTS, switch  # noqa: E402

SHARD_BYTES = 2 * 2**30


# ----------------------------------------------------------------------------- writing


# the smoke test's (tests/test_benchmarks.py): the base layout, tiny
TINY = switch(8, vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, num_decoder_layers=2,
              num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)  # fmt: skip


def hf_config(name: str) -> dict:
    if name == "tiny":
        return dict(TINY, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, router_jitter_noise=0.0)
    if name not in CHECKPOINTS:
        raise SystemExit(f"unknown checkpoint {name!r}; one of {', '.join(CHECKPOINTS)}")
    values, _ = CHECKPOINTS[name]
    if values.get("model_type") != "switch_transformers":
        raise SystemExit(f"{name}: not a Switch checkpoint")
    return dict(values, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, router_jitter_noise=0.0)


def write(name: str, out: Path, fmt: str, seed: int) -> None:
    """Random bfloat16 weights for ``name``'s architecture, shard by shard (never the whole model in
    memory): Linear weights N(0, 1/fan_in), routers N(0, 1) so tokens spread over the experts."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.SwitchTransformersConfig(**hf_config(name))
    with torch.device("meta"):
        meta = transformers.SwitchTransformersForConditionalGeneration(config)
        shapes = {k: v.shape for k, v in meta.state_dict().items()}
    out.mkdir(parents=True, exist_ok=False)
    config.save_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    count = -(-total // SHARD_BYTES)
    ext = "bin" if fmt == "bin" else "safetensors"
    stem = "pytorch_model" if fmt == "bin" else "model"
    weight_map, shard, size, index, start = {}, {}, 0, 1, time.perf_counter()

    def flush():
        nonlocal shard, size, index
        file = f"{stem}-{index:05d}-of-{count:05d}.{ext}"
        if fmt == "bin":
            torch.save(shard, out / file)
        else:
            save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        print(f"  {file}: {size / 2**30:.2f} GiB ({time.perf_counter() - start:.0f} s)", flush=True)
        shard, size, index = {}, 0, index + 1

    embedding = None  # shared.weight comes first in transformers' order
    tied = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
    for key, shape in shapes.items():
        if key in tied[1:]:  # tied to shared.weight (tie_word_embeddings), as in Google's files
            if fmt == "bin":  # .bin files repeat the matrix under each name; safetensors stores it once
                shard[key] = embedding
                size += embedding.numel() * 2
            continue
        if "layer_norm" in key:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            wide = "router" in key or "embed" in key or key == "shared.weight" or "relative" in key
            std = 1.0 if wide else shape[-1] ** -0.5
            t = (torch.randn(shape, generator=g) * std).to(torch.bfloat16)
        shard[key] = t
        size += t.numel() * 2
        if key == "shared.weight":
            embedding = t
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    index_name = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (out / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    print(f"{out}: {total / 2**30:.1f} GiB in {index - 1} shards, {time.perf_counter() - start:.0f} s")


def write_int8_run(name: str, out: Path, seed: int) -> None:
    """Random weights for ``name``'s architecture as the switchformer run that ``convert --dtype
    int8`` makes of a bfloat16 checkpoint (int8 experts with float32 scales, routers float32, the
    rest bfloat16), written directly: converting a written checkpoint needs both on the disk at once
    (49 + 27 GiB for switch-large-128). ``tests/test_benchmarks.py`` checks the layout against a real
    conversion's."""
    from switchformer.interop.hf_config import config_from_hf
    from switchformer.lifecycle.convert import train_settings_of
    from switchformer.models.placement import keeps_float32
    from switchformer.models.t5 import SwitchT5
    from switchformer.runs.directory import write_run
    from switchformer.runs.safetensors_stream import StreamedTensor, streamed_safetensors

    config = config_from_hf(hf_config(name))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in SwitchT5(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    uniform_std = 127 / 3**0.5  # of integers uniform on [-127, 127]

    def experts(count, d_out, d_in):
        for _ in range(count):
            yield torch.randint(-127, 128, (d_out, d_in), generator=g, dtype=torch.int8)

    def dense(key, shape):
        if key.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        if keeps_float32(key):
            return torch.randn(shape, generator=g)  # routers N(0, 1): tokens spread over the experts
        wide = key == "shared.weight" or "relative" in key
        fan_in = shape[0] if key.endswith((".w_in", ".w_out")) else shape[-1]  # the FFN's are [in, out]
        return (torch.randn(shape, generator=g) * (1.0 if wide else fan_in**-0.5)).to(torch.bfloat16)

    entries = []
    for key, shape in shapes.items():
        if ".experts." in key:
            count, d_in, d_out = shape
            entries.append(StreamedTensor(f"{key}.qweight", torch.int8, (count, d_out, d_in),
                                          lambda c=count, o=d_out, i=d_in: experts(c, o, i)))  # fmt: skip
            scale = torch.full((count, d_out), d_in**-0.5 / uniform_std)
            entries.append(StreamedTensor(f"{key}.scale", torch.float32, (count, d_out), lambda t=scale: [t]))
        else:
            entries.append(StreamedTensor(key, torch.float32 if keeps_float32(key) else torch.bfloat16, shape,
                                          lambda k=key, s=shape: [dense(k, s)]))  # fmt: skip
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=False)
    weights = streamed_safetensors(entries, {"format": "pt", "experts": "int8"})
    write_run(out, train_settings_of(config).run_section(), config.to_dict(), weights=weights)
    size = (out / "model.safetensors").stat().st_size
    print(f"{out}: an int8 run of {size / 2**30:.1f} GiB, {time.perf_counter() - start:.0f} s")


# ----------------------------------------------------------------------------- measuring (the child)


class MemorySampler:
    """Peak RssAnon and RssFile of this process (kB from /proc/self/status), sampled in a thread."""

    def __init__(self, every: float = 0.02):
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every):
        while not self._stop.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)
            time.sleep(every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return dict(self.peak)


class Timestamps:
    """A streamer for both libraries: the time of each token (transformers calls ``put`` with the
    prompt first, then each token; ours calls it with each token)."""

    def __init__(self, skip_first: bool):
        self.times, self._skip = [], skip_first

    def put(self, _):
        if self._skip:
            self._skip = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass

    __call__ = put


def prompt_ids(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def measure_child(args) -> dict:
    torch.set_num_threads(args.threads)
    sampler = MemorySampler()
    config = json.loads((Path(args.dir) / "config.json").read_text())
    run = "model_type" not in config  # a switchformer run (convert --dtype int8 writes one), not an HF directory
    if run:
        config = config["model"]
    ids = prompt_ids(1, args.prompt_tokens, config["vocab_size"])
    result = {"dir": str(args.dir), "impl": args.impl, "dtype": args.dtype, "max_memory": args.max_memory,
              "threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens,
              "no_repeat_ngram_size": args.no_repeat}  # fmt: skip
    if args.impl == "ours":  # imports before the clock starts: load_s is the loading alone
        from switchformer.interop.hf import from_hf
        from switchformer.models.placement import parse_size
        from switchformer.runtime import return_freed_memory
        from switchformer.train.run import load_run

        return_freed_memory()  # as the commands do under --max-memory and --dtype int8
    else:
        import transformers
    start = time.perf_counter()
    if args.impl == "ours":
        budget = parse_size(args.max_memory) if args.max_memory else None
        if run:
            model = load_run(args.dir, False, dtype=args.dtype, max_memory=budget)[0].eval()
        else:
            model = from_hf(args.dir, dtype=args.dtype, max_memory=budget).eval()
        def generate(ids, n, streamer=None):
            return model.generate(ids, max_new_tokens=n, streamer=streamer, no_repeat_ngram_size=args.no_repeat)
    else:
        offload = tempfile.mkdtemp(prefix="hf-offload-", dir=args.offload_dir)
        model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
            args.dir, device_map="auto", max_memory={"cpu": args.max_memory},
            offload_folder=offload, dtype=getattr(torch, args.dtype),
        ).eval()  # fmt: skip

        def generate(ids, n, streamer=None):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                                  no_repeat_ngram_size=args.no_repeat, streamer=streamer)  # fmt: skip

    result["load_s"] = time.perf_counter() - start
    with torch.inference_mode():
        stamps = Timestamps(skip_first=args.impl != "ours")
        start = time.perf_counter()
        tokens = generate(ids, args.new_tokens, stamps)
        times = stamps.times
        result["first_token_s"] = times[0] - start if times else None
        if len(times) > 1:
            result["decode_tokens_per_s"] = (len(times) - 1) / (times[-1] - times[0])
        result["tokens"] = tokens[0].tolist()
        if args.impl == "ours" and args.concurrent:
            result.update(concurrent(model, args.concurrent, args.prompt_tokens, args.new_tokens, config["vocab_size"]))
    cache = getattr(model, "expert_cache", None)
    if cache is not None:
        result["expert_cache"] = cache.stats()
    result["memory"] = sampler.stop()
    if args.impl != "ours":
        import shutil

        shutil.rmtree(offload, ignore_errors=True)  # accelerate's copy of the offloaded weights
    return result


def concurrent(model, n: int, prompt_tokens: int, new_tokens: int, vocab: int) -> dict:
    """``n`` greedy requests through the server's scheduler at once (its step, no HTTP)."""
    from switchformer.inference.scope import DecodingScope
    from switchformer.serve.engine import Engine, Request
    from switchformer.serve.sampling import SamplingParams

    class _Bytes:  # the engine decodes text for its answers; these random ids have none
        def decode(self, ids, skip_special_tokens=True):
            return ""

    engine = Engine(
        model, _Bytes(), max_batch_size=n, max_request_tokens=new_tokens + 1, max_source_tokens=prompt_tokens
    )
    for row in prompt_ids(n, prompt_tokens, vocab).tolist():
        # greedy, each token at most once per answer (as --no-repeat 1): random weights repeat one token otherwise
        params = SamplingParams(max_tokens=new_tokens, temperature=0, presence_penalty=100.0)
        engine._waiting.append(Request(row, params, lambda *a: None))
    before = model.expert_cache.stats() if getattr(model, "expert_cache", None) else None
    with DecodingScope().active():
        start = time.perf_counter()
        engine._admit()
        steps = 0
        while len(engine.batch):
            engine._step()
            steps += 1
        seconds = time.perf_counter() - start
    out = {"concurrent": n, "concurrent_tokens_per_s": n * new_tokens / seconds, "concurrent_steps": steps}
    if before is not None:
        after = model.expert_cache.stats()
        fetches = after["hits"] + after["misses"] - before["hits"] - before["misses"]
        out["concurrent_hit_rate"] = (after["hits"] - before["hits"]) / fetches if fetches else 0.0
    return out


# ----------------------------------------------------------------------------- measuring (the parent)


def _call(command: list[str], timeout: float | None, **kwargs) -> int:
    """The exit code; 124 when ``timeout`` seconds passed first (the process is killed)."""
    try:
        return subprocess.run(command, timeout=timeout, **kwargs).returncode
    except subprocess.TimeoutExpired:
        return 124


def cgroup_run(command: list[str], limit: int | None, timeout: float | None = None) -> tuple[int, int | None]:
    """``command`` in a fresh memory cgroup (v1 or v2) limited to ``limit`` bytes; (exit code, peak)."""
    if limit is None:
        return _call(command, timeout), None
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    root = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/memory")
    group = root / f"switchformer-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
        if not v2 and (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no escape into swap
        procs = group / "cgroup.procs"
        code = _call(command, timeout, preexec_fn=lambda: procs.write_text(str(os.getpid())))
        peak_file = group / ("memory.peak" if v2 else "memory.max_usage_in_bytes")
        peak = int(peak_file.read_text()) if peak_file.exists() else None
        return code, peak
    finally:
        group.rmdir()


def measure(args) -> None:
    if args.child:
        Path(args.json).write_text(json.dumps(measure_child(args), indent=1))
        return
    from switchformer.models.placement import parse_size

    limit = parse_size(args.max_memory) if (args.max_memory and not args.no_cgroup) else None
    subprocess.call(["sync"])
    Path("/proc/sys/vm/drop_caches").write_text("3\n") if os.access("/proc/sys/vm/drop_caches", os.W_OK) else None
    command = [sys.executable, __file__, *sys.argv[1:], "--child"]
    start = time.perf_counter()
    code, peak = cgroup_run(command, limit, args.timeout)
    result = json.loads(Path(args.json).read_text()) if code == 0 and Path(args.json).exists() else {}
    result.update({"exit_code": code, "cgroup_peak_bytes": peak, "cgroup_limit_bytes": limit,
                   "wall_s": time.perf_counter() - start, "dir": str(args.dir), "impl": args.impl})  # fmt: skip
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "tokens"}, indent=1))


def table(files: list[str]) -> None:
    print("| checkpoint | implementation | dtype | budget | exit | load s | peak anon GiB | peak file GiB "
          "| cgroup peak GiB | first token s | tokens/s (batch 1) | tokens/s (16 at once) | cache hit rate |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for f in files:
        r = json.loads(Path(f).read_text())
        m = r.get("memory", {})
        gib = lambda b: f"{b / 2**30:.2f}" if b else "-"  # noqa: E731
        num = lambda v, p=2: f"{v:.{p}f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
        hit = r.get("expert_cache", {}).get("hit_rate")
        print(f"| {Path(r['dir']).name} | {r['impl']} | {r.get('dtype', '-')} | {r.get('max_memory') or '-'} | "
              f"{r['exit_code']} | {num(r.get('load_s'), 1)} | {gib(m.get('RssAnon'))} | {gib(m.get('RssFile'))} | "
              f"{gib(r.get('cgroup_peak_bytes'))} | {num(r.get('first_token_s'))} | "
              f"{num(r.get('decode_tokens_per_s'))} | "
              f"{num(r.get('concurrent_tokens_per_s'))} | {num(hit, 3) if hit is not None else '-'} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    w = sub.add_parser("write", help="random weights of a checkpoint's architecture, in Hugging Face's format")
    w.add_argument("name", help="google/switch-base-128, google/switch-base-256, google/switch-large-128, ...")
    w.add_argument("out", type=Path)
    w.add_argument("--format", choices=["bin", "safetensors", "int8-run"], default="bin",
                   help="int8-run: the switchformer run that convert --dtype int8 makes of it")
    w.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure", help="load and decode in a fresh process under a memory cgroup")
    m.add_argument("dir", type=Path)
    m.add_argument("--impl", choices=["ours", "transformers"], default="ours")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "int8"], default="bfloat16")
    m.add_argument("--max-memory", help="the budget (20GiB); also the cgroup's limit")
    m.add_argument("--no-cgroup", action="store_true")
    m.add_argument("--prompt-tokens", type=int, default=16)
    m.add_argument("--new-tokens", type=int, default=16)
    m.add_argument("--concurrent", type=int, default=0, help="ours: this many requests through the scheduler too")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument(
        "--no-repeat", type=int, default=1,
        help="no_repeat_ngram_size of both libraries' greedy decoding (default 1: no token twice). Random weights "
        "otherwise repeat one token, so every step would route alike and the expert cache would look better than "
        "it is; 0: plain greedy",
    )  # fmt: skip
    m.add_argument("--offload-dir", default=None, help="transformers: where accelerate's offload folder goes")
    m.add_argument("--timeout", type=float, help="seconds before the measurement is stopped (exit 124)")
    m.add_argument("--json", required=True)
    m.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    t = sub.add_parser("table", help="the docs' table from measure's JSON files")
    t.add_argument("files", nargs="+")
    args = parser.parse_args()
    if args.what == "write":
        if args.format == "int8-run":
            write_int8_run(args.name, args.out, args.seed)
        else:
            write(args.name, args.out, args.format, args.seed)
    elif args.what == "measure":
        if args.impl == "transformers" and (args.dtype == "int8" or not args.max_memory):
            raise SystemExit("--impl transformers: give --max-memory, and --dtype float32 or bfloat16")
        measure(args)
    else:
        table(args.files)


if __name__ == "__main__":
    main()
