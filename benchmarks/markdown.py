"""BENCHMARKS.md from results.json: a pure function of the raw numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.report.markdown import figure

ROOT = Path(__file__).resolve().parents[1]


def record(key: str, entry: dict[str, Any]) -> None:
    """Store ``entry`` as ``key`` of benchmarks/results.json and re-render BENCHMARKS.md."""
    path = ROOT / "benchmarks" / "results.json"
    stored = json.loads(path.read_text())
    stored[key] = entry
    path.write_text(json.dumps(stored, indent=1) + "\n")
    (ROOT / "BENCHMARKS.md").write_text(render(stored))


EAGER = "PyTorch eager fp32"
PEERS = ("Optimum", "Olive", "ONNX Runtime", "OpenVINO")


def _shape(t: dict[str, Any]) -> str:
    return f"b{t['batch']}s{t['sequence']}"


def _is_int8(name: str) -> bool:
    return "int8" in name.lower()


def fusion_section(fusion: dict[str, Any]) -> list[str]:
    """The per-fusion ablation: latency of each combination, and its ratio to the plain export."""
    cells = fusion["timings"]
    shapes = [_shape(c) for c in cells]
    base = fusion["graphs"][0]["name"]
    lines = [
        f"## Fusion, one by one (all-MiniLM-L6-v2, {fusion['threads']} threads)",
        "",
        "The exported graph through tforge's passes, one combination per row, timed side by side "
        "(`@level`: ONNX Runtime's own graph optimisation level for the session).",
        "",
        "| graph | nodes | fused ops | "
        + " | ".join(f"{s} ms" for s in shapes)
        + " | "
        + " | ".join(f"{s} vs export" for s in shapes)
        + " |",
        "|---|---|---|" + "---|" * (2 * len(shapes)),
    ]
    for graph in fusion["graphs"]:
        name = graph["name"]
        p50 = [c["contenders"][name]["p50_ms"] for c in cells]
        ratios = [c["contenders"][base]["p50_ms"] / v for c, v in zip(cells, p50, strict=True)]
        fused = ", ".join(f"{op} {n}" for op, n in graph["fused"].items()) or "–"
        lines.append(
            f"| {name} | {graph['nodes']} | {fused} | "
            + " | ".join(f"{v:.1f}" for v in p50)
            + " | "
            + " | ".join(f"{r:.2f}x" for r in ratios)
            + " |"
        )
    lines += [
        "",
        "Reading it: the fused Attention is the whole gain, and it grows with sequence length (the "
        "decomposed attention's per-head MatMul, Softmax, Reshape and Transpose chain is what a fused "
        "kernel removes, and at s512 attention is a large part of the work). ONNX Runtime's own session "
        "optimiser does not fuse attention in a `torch.onnx.export(dynamo=True)` graph, which is why the "
        "plain export, even at `all`, is no faster than PyTorch at b8s128 and slower at b1s512. "
        "BiasGelu is neutral. SkipLayerNormalization makes it slower at every shape: ONNX Runtime's CPU "
        "kernel for it is slower than the `Add` and `LayerNormalization` it replaces, and the session "
        "levels `extended` and `all` fuse it back in on their own (`attention + ffn @all` equals `all three`). "
        "Hence tforge's `ort-cpu` default: `[attention, ffn]` at `basic`. The `standard` profile (folding "
        "only) equals the export: the session does the same folding.",
        "",
    ]
    return lines


def int8_section(results: dict[str, Any]) -> list[str]:
    """Every INT8 (and FP16) contender on MiniLM at 2 threads: speed beside its accuracy."""
    accuracy = results.get("accuracy", {}).get("minilm", {}).get("contenders", {})
    cells = [t for t in results["timings"] if t["model"] == "minilm" and t["threads"] == 2]
    cells = [c for c in cells if c["sequence"] == 128 and c["batch"] in (1, 8)]
    if not cells or not accuracy:
        return []
    names = [n for n in cells[0]["contenders"] if _is_int8(n) or "fp16" in n.lower()]
    peer_int8 = [n for n in names if not n.startswith("tforge")]
    shapes = [_shape(c) for c in cells]
    lines = [
        "## INT8 and FP16 on all-MiniLM-L6-v2 (2 threads)",
        "",
        "Speed-up over PyTorch eager and over the fastest peer INT8 at the same shape, beside the "
        "accuracy each keeps (evaluation texts, against PyTorch FP32).",
        "",
        "| contender | "
        + " | ".join(f"{s} vs eager" for s in shapes)
        + " | "
        + " | ".join(f"{s} vs best peer INT8" for s in shapes)
        + " | mean cosine | min cosine | agreement |",
        "|---|" + "---|" * (2 * len(shapes) + 3),
    ]
    for name in names:
        row = [name]
        for c in cells:
            row.append(f"{c['contenders'][EAGER]['p50_ms'] / c['contenders'][name]['p50_ms']:.2f}x")
        for c in cells:
            peers = [c["contenders"][p]["p50_ms"] for p in peer_int8]
            row.append(f"{min(peers) / c['contenders'][name]['p50_ms']:.2f}x" if peers else "–")
        figures = accuracy.get(name, {})
        row += [
            figure(figures.get("mean_cosine"), ".6f"),
            figure(figures.get("min_cosine"), ".6f"),
            figure(figures.get("agreement"), ".3f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Reading it: dynamic INT8 (weights per channel, activations per batch) is the fastest "
        "INT8 form on ONNX Runtime's CPU provider and keeps the most accuracy. tforge's runs level "
        "with or ahead of Optimum's: its INT8 graphs need the session's `all` level for their "
        "integer kernels, and the residual-sum pass keeps that level from fusing ONNX Runtime's "
        "slower SkipLayerNormalization (a fifth of the INT8 model's time at b8s128). Static QDQ is neither faster (ONNX Runtime fuses the Q/DQ pairs "
        "into integer kernels, no gain over dynamic) nor as accurate: one activation scale per "
        "tensor for all inputs loses on BERT-style activations whatever the calibration method. "
        "The budget variant keeps the most output-sensitive MatMuls in float (mostly the FFN "
        "projections, two thirds of the FLOPs) until its limits hold on the build's evaluation "
        "batches (8 texts, both padding sides). The outlier variant keeps every MatMul in INT8 but "
        "multiplies each input's few channels that run many times larger than the rest in float "
        "beside the INT8 product (LLM.int8()-style, chosen on calibration text), so the per-batch "
        "activation scale no longer spans them. The smooth variant divides each MatMul input per "
        "channel by scales its weight rows take (SmoothQuant-style, alpha 0.75; one Mul per "
        "input) and splits only the inputs smoothing cannot flatten (the GELU outputs into four "
        "FFN down-projections): the outlier variant's accuracy or better at about the best "
        "peer's speed. The budget variant starts from it, so it needs 8 of 36 nodes in float "
        "instead of 22. Dynamic INT8's error depends on the batch: the "
        "activation range is taken over every token of the batch, so the same model measured here "
        "in batches of 32 keeps less agreement than in the build's batches of 8. FP16 on this CPU: "
        "exact to 1e-3 and half the size, barely faster than FP32 (the target is the GPU). "
        "On OpenVINO (tforge's `ort-openvino` variants; OpenVINO's runtime and NNCF as peers): "
        "NNCF's static INT8 keeps far more than static QDQ does on ONNX Runtime (SmoothQuant, a "
        "range and a symmetry per activation, bias correction), and OpenVINO's kernels run it, and "
        "bf16 on CPUs that have it, several times faster than ONNX Runtime's CPU provider runs any "
        "variant. With AMX, INT8 and bf16 run at nearly the same speed on this small model (the "
        "matrix units are not what limits it), and the INT8 model is a quarter of the size. "
        "tforge's ov-int8 is NNCF's quantization run through ONNX Runtime's OpenVINO provider, so "
        "it should match NNCF on OpenVINO's own runtime; its budget variant keeps nodes in float "
        "(bf16) in NNCF's graph until the retrieval limits hold. The OpenVINO variants are "
        "compiled for the shape they run (`static_shapes`: the recipe's b1s128 and b8s128; here, "
        "each timed shape): OpenVINO then plans the program once and fuses the elementwise chains, "
        "which is worth 15-25% over dynamic axes (ov-int8 against ov-int8-dynamic; NNCF's model "
        "reshaped the same way with OpenVINO's own API is the fastest peer). ONNX Runtime's "
        "provider costs a few tenths of a millisecond per call over OpenVINO's own runtime, which "
        "shows at b1s128.",
        "",
    ]
    return lines


def calibration_section(calibration: dict[str, Any]) -> list[str]:
    lines = [
        f"## Calibration: {calibration['samples']} samples at s{calibration['max_length']}",
        "",
        f"Produced by `{calibration['command']}`: each method in a fresh process on MiniLM's INT8 "
        f"float graph, texts long enough to fill {calibration['max_length']} tokens (batches of "
        "8 x 128), run twice; peak RSS of the whole process (model, tokenizer and ONNX Runtime "
        "included).",
        "",
        "| method | seconds | peak RSS MB | tensors | tokens | same table twice |",
        "|---|---|---|---|---|---|",
    ]
    for run in calibration["runs"]:
        lines.append(
            f"| {run['method']} | {run['seconds']} | {run['peak_rss_mb']} | {run['tensors']} "
            f"| {run['tokens']} | {'yes (byte-identical)' if run['identical'] else 'NO'} |"
        )
    lines.append("")
    return lines


def compare_noise_section(noise: dict[str, Any]) -> list[str]:
    lines = [
        f"## `tforge compare` on unchanged builds: {noise['runs']} latency measurements",
        "",
        f"Produced by `{noise['command']}`: the default recipe built once and its latency "
        f"re-measured {noise['runs'] - 1} times (variants {', '.join(noise['variants'])}; shapes "
        f"{', '.join(noise['shapes'])}). Every ordered pair is an A/A comparison, so every latency "
        "regression reported is a false alarm. Noise band 0 = threshold only.",
        "",
        "| basis | threshold | noise band (sigmas) | pairs | latency figures | false regressions | median abs change | max abs change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in noise["rows"]:
        lines.append(
            f"| {r['basis']} | {r['threshold']:.0%} | {r['noise_sigmas']:g} | {r['pairs']} "
            f"| {r['figures']} | {r['false_regressions']} | {r['median_abs_change']:.1%} "
            f"| {r['max_abs_change']:.1%} |"
        )
    lines.append("")
    return lines


def decoders_section(d: dict[str, Any]) -> list[str]:
    lines = [
        f"## Decoders: {d['model']}",
        "",
        f"Produced by `{d['command']}`: greedy generation, a {d['prompt']}-token prompt and "
        f"{d['new_tokens']} new tokens, {d['threads']} threads, {d['reps']} interleaved repetitions. "
        "TTFT is the prefill; per-token figures are decode steps; speed-up is decode tokens/s "
        "over PyTorch eager's."
        + (
            " Random weights: the latency is the model's, the agreement is indicative only."
            if "random" in d["model"]
            else " Prompts are evaluation texts, left-padded."
        ),
        "",
        "| batch | contender | TTFT ms | token p50 ms | token p99 ms | decode tokens/s | speed-up | size MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch, contenders in d["latency"].items():
        base = contenders["pytorch"]["decode_tokens_per_s"]
        for name, r in contenders.items():
            lines.append(
                f"| {batch} | {name} | {r['ttft_ms']:.1f} | {r['token_p50_ms']:.2f} "
                f"| {r['token_p99_ms']:.2f} | {r['decode_tokens_per_s']:.1f} "
                f"| {r['decode_tokens_per_s'] / base:.2f}x | {d['size_mb'].get(name, '–')} |"
            )
    lines += [
        "",
        "Greedy agreement with PyTorch: "
        + ", ".join(
            f"{name} token match {a['token_match']:.3f} (whole continuations {a['sequence_match']:.3f})"
            for name, a in d["agreement"].items()
        )
        + f". Export {d['seconds']['export']} s; quantization "
        + ", ".join(
            f"{k.removeprefix('quantize-')} {v} s" for k, v in d["seconds"].items() if k != "export"
        )
        + ".",
        "",
    ]
    if d.get("perplexity"):
        lines += [
            "Perplexity on 64 evaluation texts (up to 64 tokens each): "
            + ", ".join(f"{k} {v:.3f}" for k, v in d["perplexity"].items())
            + ".",
            "",
        ]
    return lines


def decoder_static_section(d: dict[str, Any]) -> list[str]:
    """tforge's decoder graphs beside PyTorch with a static cache, eager and torch.compile'd."""
    labels = {
        "pytorch": "PyTorch eager, dynamic cache (the build's baseline)",
        "pytorch-static": "PyTorch eager, StaticCache",
        "pytorch-compiled": "PyTorch StaticCache + torch.compile",
    }
    lines = [
        f"## Decoders beside PyTorch's static cache and torch.compile (SmolLM2-135M, {d['threads']} threads)",
        "",
        f"Produced by `{d['command']}` (run {d['run_id']}; torch {d['torch']}, transformers "
        f"{d['transformers']}). Prompts of 32 real tokens (no padding), 32 greedy tokens, "
        f"{d['runs']} interleaved runs; p50 per call; speed-up of the decode step over PyTorch "
        "eager; token match against eager PyTorch's greedy tokens. `first generation s` is the "
        "untimed warm-up generation, torch.compile's compilation included.",
        "",
        "| contender | prefill-b1 ms | decode-b1 ms (x eager) | prefill-b8 ms | decode-b8 ms (x eager) "
        "| token match b1 / b8 | first generation s b1 / b8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in d["results"].items():
        b1, b8 = r["b1"], r["b8"]
        lines.append(
            f"| {labels.get(name, 'tforge ' + name)} | {b1['prefill_ms']:.1f} "
            f"| {b1['decode_ms']:.2f} ({b1['speedup']:.2f}x) | {b8['prefill_ms']:.1f} "
            f"| {b8['decode_ms']:.2f} ({b8['speedup']:.2f}x) "
            f"| {b1['token_match']:.3f} / {b8['token_match']:.3f} "
            f"| {b1['first_call_s']:.1f} / {b8['first_call_s']:.1f} |"
        )
    return [*lines, ""]


FAMILY_TITLES = {
    "gpt2": "GPT-2 small architecture",
    "qwen3": "Qwen3-0.6B architecture",
    "gpt_neox": "Pythia-160M architecture (GPT-NeoX)",
}


def family_fusions_section(d: dict[str, Any]) -> list[str]:
    """A decoder family at a real size (random weights): decode steps, fused against as
    exported."""
    made = ", ".join(f"{op} {n}" for op, n in d["fused_ops"].items())
    family = d.get("architecture", "gpt2")
    size = f", {d['parameters'] / 1e6:.0f}M parameters" if "parameters" in d else ""
    lines = [
        f"## Decoder fusions: {FAMILY_TITLES.get(family, family)}, random weights "
        f"({d['threads']} threads)",
        "",
        f"Produced by `{d['command']}`. The decoder variants' default fusions"
        f"{size} (decode graph: {made}; dropped: {d['fallback'] or 'none'}); decode step p50, "
        "interleaved; logits compared with the unfused graphs' teacher-forced, on 32 steps of a "
        "batch whose last row is left-padded by 5 tokens.",
        "",
        "| graphs | decode-b1 ms | decode-b8 ms | max logit difference b1 / b8 | agreement b1 / b8 |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "unfused": "as exported (optimize: none)",
        "tforge": "tforge fusions",
        "no-attention": "tforge fusions but attention",
    }
    if d.get("fallback_no_attention"):
        lines[2] += f" Dropped without attention: {d['fallback_no_attention']}."
    return [*lines, *_fused_rows(d["results"], labels), ""]


def _fused_rows(results: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Rows of fused graphs against the unfused ones: decode p50 and logit agreement."""
    rows = []
    for name, r in results.items():
        b1, b8 = r["b1"], r["b8"]
        rows.append(
            f"| {labels.get(name, name)} | {b1['decode_ms']:.2f} | {b8['decode_ms']:.2f} "
            f"| {b1['max_logit_difference']:.2g} / {b8['max_logit_difference']:.2g} "
            f"| {b1['agreement']:.3f} / {b8['agreement']:.3f} |"
        )
    return rows


def decoder_fusion_peer_section(d: dict[str, Any]) -> list[str]:
    """tforge's decoder fusions beside transformers' ort_fusions="cpu", on the same graphs."""
    labels = {
        "unfused": "as exported (optimize: none)",
        "tforge": "tforge fusions",
        "transformers": f"transformers {d['transformers']} ort_fusions=cpu",
    }
    lines = [
        f"## Decoder fusions beside transformers' (SmolLM2-135M FP32, {d['threads']} threads)",
        "",
        f"Produced by `{d['command']}` (run {d['run_id']}). The same exported graphs, fused by each; "
        "decode step p50, interleaved; logits compared with the unfused graphs' teacher-forced, on "
        "32 steps of a batch whose last row is left-padded by 5 tokens.",
        "",
        "| graphs | decode-b1 ms | decode-b8 ms | max logit difference b1 / b8 | agreement b1 / b8 |",
        "|---|---|---|---|---|",
    ]
    return [*lines, *_fused_rows(d["results"], labels), ""]


def decoder_rounding_section(d: dict[str, Any]) -> list[str]:
    """PyTorch rounded on purpose: what each kind of rounding costs the greedy tokens."""
    lines = [
        f"## Decoder rounding: {d['model']} in PyTorch, rounded on purpose ({d['threads']} threads)",
        "",
        f"Produced by `{d['command']}`. Every `nn.Linear` computes with rounded weights and/or inputs "
        "(simulated: rounded to the grid, products in float32), one kind at a time; "
        f"{d['prompts']} evaluation prompts, {d['new_tokens']} greedy tokens, against the float32 "
        "model. `int8-block` is symmetric 8-bit per block of 16 input channels, the arithmetic of "
        "the `int8-block` variant. Kept-float groups (one layer's attention, one layer's MLP, "
        "the LM head) are the most sensitive first: the teacher-forced logit error with only "
        "that group rounded.",
        "",
        "| rounding | token match | whole continuations | agreement (teacher-forced) |",
        "|---|---|---|---|",
    ]
    for row in d["rows"]:
        lines.append(
            f"| {row['rounding']} | {row['token_match']:.3f} | {row['sequence_match']:.3f} "
            f"| {row['agreement']:.4f} |"
        )
    lines += [
        "",
        "Most sensitive groups (logit error with only that group rounded): "
        + ", ".join(f"{g['group']} {g['logit_error']:.3f}" for g in d["most_sensitive"])
        + ".",
        "",
        "The simulated `int8-block weights and inputs` row is the compiled `int8-block` variant's "
        'arithmetic: compare it with that variant in "Decoder build". Rounding only the '
        "weights to bf16 (8-bit significand) already costs more tokens than fp16 PyTorch does, "
        "and the error is spread over the layers: keeping the most sensitive groups float buys "
        "little per group.",
        "",
    ]
    return lines


def decoder_build_section(d: dict[str, Any]) -> list[str]:
    """A text-generation build's own measurement: accuracy against PyTorch and decode speed."""
    model = d["model"]
    lines = [
        f"## {d.get('title', 'Decoder build')}: {model['source']} ({model.get('model_type')}, {model.get('layers')} layers, "
        f"{model.get('parameters', 0) / 1e6:.0f}M parameters), {d['threads']} threads",
        "",
        f"Produced by `{d['command']}` (run {d['run_id']}). {d['prompts']} evaluation prompts, "
        f"{d['new_tokens']} new tokens, greedy, against PyTorch FP32 (perplexity "
        f"{d['reference_perplexity']:.2f} on the evaluation texts). Latency: each contender generates "
        f"{d['new_tokens']} tokens per run, round-robin; `prefill` is the prompt (time to first token), "
        "`decode` one step; tokens/s = batch / median step; speed-up over PyTorch eager with its cache.",
        "",
        "| contender | token match | whole continuations | agreement (teacher-forced) | perplexity (change) "
        + "".join(f"| {s} p50 ms (x eager) " for s in d["shapes"])
        + "| size MB | peak RSS MB |",
        "|---|---|---|---|---|" + "---|" * len(d["shapes"]) + "---|---|",
    ]
    for name, c in d["contenders"].items():
        a = c["accuracy"] or {}
        change = a.get("perplexity_increase")
        row = [
            name + (f" ({c['precision']})" if c["precision"] != "fp32" else ""),
            figure(a.get("token_match"), ".3f") if a else "reference",
            figure(a.get("sequence_match"), ".3f") if a else "–",
            figure(a.get("agreement"), ".4f") if a else "–",
            (
                f"{d['reference_perplexity']:.2f}"
                if not a
                else (
                    f"{a['perplexity']:.2f} ({100 * change:+.2f}%)" if change is not None else "–"
                )
            ),
        ]
        for shape in d["shapes"]:
            lat = c["latency"].get(shape)
            row.append(
                "–"
                if lat is None
                else f"{lat['p50_ms']:.1f}"
                + (f" ({lat['speedup']:.2f}x)" if lat["speedup"] else "")
            )
        row += [figure(c["size_mb"], ".1f"), figure(c["peak_rss_mb"], ".0f")]
        lines.append("| " + " | ".join(row) + " |")
    for precision, a in d.get("floor", {}).items():
        change = a.get("perplexity_increase")
        row = [
            f"*PyTorch {precision} (floor)*",
            figure(a.get("token_match"), ".3f"),
            figure(a.get("sequence_match"), ".3f"),
            figure(a.get("agreement"), ".4f"),
            f"{a['perplexity']:.2f} ({100 * change:+.2f}%)" if change is not None else "–",
            *["–"] * (len(d["shapes"]) + 2),
        ]
        lines.append("| " + " | ".join(row) + " |")
    decode = [s for s in d["shapes"] if s.startswith("decode-")]
    if d.get("note"):
        lines += ["", d["note"]]
    lines += [
        "",
        "Decode tokens/s: "
        + "; ".join(
            f"{name} "
            + ", ".join(
                f"{c['latency'][s]['throughput']:.1f} @{s}" for s in decode if s in c["latency"]
            )
            for name, c in d["contenders"].items()
        )
        + ".",
        "",
    ]
    return lines


def render(results: dict[str, Any]) -> str:
    machine = results["machine"]
    hw, versions, peaks = machine["hardware"], machine["versions"], machine["peaks"]
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{results['command']}` on {results['date']} in {results['seconds'] / 60:.1f} minutes.",
        "",
        f"- CPU: {hw['cpu']} ({peaks['uarch']}), {hw['physical_cores']} cores, flags {', '.join(hw['cpu_flags'])}; "
        f"clock {peaks['clock_ghz']} GHz ({peaks['clock_source']})",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Timing: per model, shape and thread count a fresh process loads every contender; {results['plan']['warmup']} warm-up rounds, "
        f"then {results['plan']['rounds']} rounds of one call each, round-robin, repeated {results['plan']['passes']}x; "
        "the table shows the median of the passes' medians. ONNX Runtime: identical session options (intra-op threads as stated, "
        "spinning off, which otherwise steals the core from the next contender; ORT_ENABLE_ALL, except tforge variants, which run at "
        "the level their recipe chose, noted under Build cost); PyTorch: its defaults "
        "(OMP_WAIT_POLICY=PASSIVE would slow it 5-15%), with a 10 ms untimed pause after each PyTorch call, because its OpenMP "
        "threads spin after a call and the next contender would lose a core to them. Inputs: real text tokens, full attention mask.",
        "",
    ]
    builds = {
        key: {b["name"]: b for b in model["builds"]} for key, model in results["models"].items()
    }
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for t in results["timings"]:
        groups.setdefault((t["model"], t["threads"]), []).append(t)
    for (model, threads), cells in groups.items():
        name = results["models"][model]["name"]
        shapes = [_shape(c) for c in cells]
        lines += [
            f"## {name}, {threads} thread(s): median latency, speed-up over PyTorch eager",
            "",
        ]
        lines.append(
            "| contender | "
            + " | ".join(f"{s} ms" for s in shapes)
            + " | "
            + " | ".join(f"{s} vs eager" for s in shapes)
            + " | "
            + " | ".join(f"{s} vs best peer" for s in shapes)
            + " |"
        )
        lines.append("|---|" + "---|" * (3 * len(shapes)))
        names = list(cells[0]["contenders"])
        best_peer = []
        for c in cells:
            peer_p50 = [
                v["p50_ms"]
                for n, v in c["contenders"].items()
                if builds[model].get(n, {}).get("group") in PEERS
            ]
            best_peer.append(min(peer_p50) if peer_p50 else None)
        for contender in names:
            p50 = [c["contenders"][contender]["p50_ms"] for c in cells]
            eager = [c["contenders"][EAGER]["p50_ms"] for c in cells]
            row = [contender] + [f"{v:.1f}" for v in p50]
            row += [f"{e / v:.2f}x" for e, v in zip(eager, p50, strict=True)]
            row += [f"{b / v:.2f}x" if b else "–" for b, v in zip(best_peer, p50, strict=True)]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append("<details><summary>p90 and pass-to-pass spread</summary>")
        lines.append("")
        lines.append(
            "| contender | " + " | ".join(f"{s} p50 / p90 (spread)" for s in shapes) + " |"
        )
        lines.append("|---|" + "---|" * len(shapes))
        for contender in names:
            cells_text = [
                f"{c['contenders'][contender]['p50_ms']:.1f} / {c['contenders'][contender]['p90_ms']:.1f} ({c['contenders'][contender]['spread_pct']:.1f}%)"
                for c in cells
            ]
            lines.append(f"| {contender} | " + " | ".join(cells_text) + " |")
        lines += ["", "</details>", ""]

    for model, acc in results["accuracy"].items():
        lines += [
            f"## Accuracy on {results['models'][model]['name']} against PyTorch FP32 ({acc['samples']} evaluation texts)",
            "",
        ]
        lines.append(
            "| contender | mean cosine | min cosine | nearest-neighbour agreement | max abs error |"
        )
        lines.append("|---|---|---|---|---|")
        for name, figures in acc["contenders"].items():
            lines.append(
                f"| {name} | {figures['mean_cosine']:.6f} | {figures['min_cosine']:.6f} | {figures['agreement']:.3f} | {figures['max_abs_error']:.2e} |"
            )
        lines.append("")

    lines += [
        "## Build cost",
        "",
        "| model | contender | build s | peak RSS MB | size MB | note |",
        "|---|---|---|---|---|---|",
    ]
    for model in results["models"].values():
        for b in model["builds"]:
            if b["error"]:
                lines.append(f"| {model['name']} | {b['name']} | – | – | – | {b['error']} |")
            else:
                fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
                lines.append(
                    f"| {model['name']} | {b['name']} | {fmt(b['seconds'])} | {fmt(b['peak_rss_mb'])} | {fmt(b['size_mb'])} | {b['note']} |"
                )
    lines.append("")

    if results.get("fusion"):
        lines += fusion_section(results["fusion"])
    lines += int8_section(results)
    # The optional sections, in the order they appear: results key -> its renderer.
    for key, section in (
        ("calibration", calibration_section),
        ("compare_noise", compare_noise_section),
        ("decoders", decoders_section),
        ("decoders_real", decoders_section),
        ("decoder_build", decoder_build_section),
        ("decoder_rounding", decoder_rounding_section),
        ("decoder_fusions", decoder_build_section),
        ("decoder_fusion_peer", decoder_fusion_peer_section),
        ("decoder_static", decoder_static_section),
        ("gpt2_fusions", family_fusions_section),
        ("qwen3_fusions", family_fusions_section),
        ("pythia_fusions", family_fusions_section),
    ):
        if results.get(key):
            lines += section(results[key])

    lines += [
        "## The floor",
        "",
        f"Matmul FLOPs of each shape over the peak rate ({peaks['uarch']}: {peaks['fp32']} FP32 FLOP and {peaks['int8']} INT8 op per cycle per core, "
        f"{peaks['note']}), at the measured clock. The fraction is what the fastest FP32 and INT8 contender reach.",
        "",
        "| model | threads | shape | GFLOP | FP32 floor ms | best FP32 | % of FP32 peak | INT8 floor ms | best INT8 | % of INT8 peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in results["timings"]:
        gflop = t["flops"] / 1e9
        row = [results["models"][t["model"]]["name"], str(t["threads"]), _shape(t), f"{gflop:.2f}"]
        for kind in ("fp32", "int8"):
            rate = peaks.get(f"{kind}_gops_per_core")
            # bf16 and fp16 have their own peaks; they are in neither column.
            candidates = {
                n: v["p50_ms"]
                for n, v in t["contenders"].items()
                if _is_int8(n) == (kind == "int8") and "bf16" not in n and "fp16" not in n
            }
            if not rate or not candidates:
                row += ["–", "–", "–"]
                continue
            floor_ms = t["flops"] / (rate * 1e9 * t["threads"]) * 1e3
            best = min(candidates, key=candidates.__getitem__)
            row += [f"{floor_ms:.2f}", best, f"{100 * floor_ms / candidates[best]:.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)
