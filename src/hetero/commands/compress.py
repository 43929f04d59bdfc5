"""`hetero compress`, `hetero eval` and `hetero sensitivity`: make a compressed artifact, measure
perplexity, and measure the per-unit quality table the planner reads."""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from hetero.commands.model import KV_HELP

MODEL_HELP = "A .gguf file, an HF dir (a compressed artifact too), `smollm2-135m` (default) or `synthetic:NAME`."


def eval_cmd(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    text: Optional[str] = typer.Option(None, "--text", help="A UTF-8 text file (default: the built-in pydoc corpus)."),
    context: int = typer.Option(512, "--context", help="Tokens per window."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Tokens between window ends (≤ context; default context/2)."),
    tokens: int = typer.Option(4096, "--tokens", help="Evaluate the first N tokens of the text (0 = all)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | int8 | int4 | native (runtime "
                                        "kernels; default: native for a quantised GGUF, which runs as stored, else fp32)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: torch's)."),
    act_int8: bool = typer.Option(False, "--act-int8", help="Quantise every Linear's input to int8 per token "
                                  "(symmetric, dynamic), as a W8A8 prefill does; int8 weights run int8 x int8."),
    act_group: int = typer.Option(0, "--act-group", help="With --act-int8: one scale per this many elements of a "
                                  "token (32 = llama.cpp's Q8 activation blocks) instead of one per token."),
    act_head: bool = typer.Option(False, "--act-head/--no-act-head", help="With --act-int8: the head's input "
                                  "too (a generation's prefill runs the head on one token only, so by default it is left out)."),
    kv_dtype: str = typer.Option("auto", "--kv-dtype", help=KV_HELP),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Apply this LoRA adapter dir (PEFT format) on the base."),
    decode: bool = typer.Option(False, "--decode", help="Score every token through the decode step, one token a "
                                "call (the kernels a generation runs, e.g. HETERO_DECODE_ACT=int8); slower."),
) -> None:
    """Token-level perplexity with a fixed context and stride (one evaluator for every variant)."""
    import hetero
    from hetero.compress.artifact import read_record
    from hetero.errors import HeteroError
    from hetero.eval.corpus import BUILTIN_NAME, eval_ids, read_text
    from hetero.eval.perplexity import check_settings, perplexity

    if tokens < 0:
        raise HeteroError(f"--tokens must be ≥ 0 (got {tokens})")
    if act_group < 0 or (act_group and not act_int8):
        raise HeteroError("--act-group takes a size ≥ 1 and goes with --act-int8")
    if act_head and not act_int8:
        raise HeteroError("--act-head goes with --act-int8")
    stride = stride if stride is not None else max(1, context // 2)
    body = read_text(text)  # a bad file fails before the model loads
    if dtype is None:
        from hetero.model.sources import resolve_spec

        dtype = "native" if resolve_spec(model).has_block_tensors else "fp32"
    if adapter:  # a wrong adapter fails before the model loads
        from hetero.finetune.adapter_io import apply_adapter, load_adapter
        from hetero.model.sources import resolve_spec

        load_adapter(adapter, resolve_spec(model))
    m = hetero.load(model, dtype=dtype, threads=threads, kv_dtype=kv_dtype)
    if adapter:
        apply_adapter(m.net, m.spec, adapter)
    ids = eval_ids(m.tokenizer, body, tokens or None)
    check_settings(len(ids), context, stride, m.spec.max_context)
    if act_int8:
        from hetero.ops.actquant import act_int8 as int8_acts

        with int8_acts(m.net, act_group, act_head):
            r = perplexity(m.net, ids, context, stride, progress=progress, decode=decode)
    else:
        r = perplexity(m.net, ids, context, stride, progress=progress, decode=decode)
    acts = (f"int8/{act_group}" if act_group else "int8/token") + ("+head" if act_head else "") if act_int8 else "default"
    from hetero.ops import kernels

    out = {"model": m.spec.name, "dtype": dtype, "kv_dtype": kv_dtype, "activations": acts,
           "path": "decode" if decode else "prefill", "decode_act": kernels.decode_act(),
           "text": text or BUILTIN_NAME, "adapter": adapter, **r.to_dict(),
           "tok_s": round(r.tokens / r.seconds, 1) if r.seconds else None, "compression": read_record(model)}
    if as_json:
        print(json.dumps(out))
        return
    print(f"perplexity {r.perplexity:.4f}  ({r.tokens} tokens of {out['text']}, KV {kv_dtype}, context {context}, "
          f"{acts + ' activations, ' if act_int8 else ''}"
          f"stride {stride}, {r.windows} windows, {'decode steps, ' if decode else ''}{r.seconds:.1f} s)")
    if out["compression"]:
        print(f"compression: {out['compression'].get('method')} "
              f"({out['compression'].get('format') or out['compression'].get('pattern') or ''})")


def compress(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="int8 | int4 (= rtn) | rtn | gptq | awq | magnitude | wanda | nm | kmeans | distill."),
    out: str = typer.Option(..., "-o", "--output", help="Output dir (HF format) or .gguf file (--format gguf)."),
    fmt: str = typer.Option("hf", "--format", help="hf (safetensors dir, dequantised) | gguf (rtn/gptq/awq: "
                            "their grid as Q4_1, or Q4_0 with --sym) | ct (compressed-tensors pack-quantized dir)."),
    gguf_type: str = typer.Option("Q8_0", "--type", help="GGUF block type of matrices without a method grid: Q8_0 | Q4_0 | Q4_1."),
    group: int = typer.Option(64, "--group", help="int4/gptq group size along the input dim."),
    sym: bool = typer.Option(False, "--sym/--asym", help="int4/gptq: symmetric grid (scale only)."),
    sparsity: float = typer.Option(0.5, "--sparsity", help="magnitude/wanda: share of weights removed."),
    nm: Optional[str] = typer.Option(None, "--nm", help="magnitude/wanda: N:M pattern such as 2:4."),
    values: int = typer.Option(16, "--values", help="kmeans: shared values per row."),
    calib_tokens: int = typer.Option(2048, "--calib-tokens", help="Calibration tokens (gptq, wanda)."),
    act_order: bool = typer.Option(True, "--act-order/--no-act-order", help="gptq: columns by input energy."),
    awq_grid: str = typer.Option("rtn", "--awq-grid", help="awq: the grid after scaling, rtn | gptq."),
    int4_head: bool = typer.Option(True, "--int4-head/--keep-head", help="rtn/gptq/awq: put the head (a tied "
                                   "head is the embedding) on the int4 grid too, or keep it (GGUF: at --type)."),
    eval_tokens: int = typer.Option(4096, "--eval-tokens", help="Measure the result's perplexity on the first N "
                                    "tokens of the built-in corpus (context 512, stride 256, as `hetero eval`); 0 skips."),
    layers: Optional[int] = typer.Option(None, "--layers", help="distill: student layers (default 2/3)."),
    steps: int = typer.Option(200, "--steps", help="distill: training steps."),
    store: str = typer.Option("fp32", "--store-dtype", help="hf: fp32 | bf16 for the stored (dequantised) weights."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the compression record as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: torch's)."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Merge this LoRA adapter dir (PEFT format) into the base first (alone: --format hf without --method writes the merged model)."),
) -> None:
    """Compress MODEL and write an artifact that run, eval and plan load (the record is in config.json)."""
    from hetero.compress import methods
    from hetero.errors import HeteroError

    methods._load_all()
    if fmt not in ("hf", "gguf", "ct"):
        raise HeteroError(f"unknown --format {fmt!r}; known: hf, gguf, ct")
    if fmt == "ct" and not sym:
        # compressed-tensors' asymmetric grid has integer zero points; transformers with
        # compressed-tensors 0.20.1 expects them unpacked where its compressor packs them, so the
        # checkpoint does not load there: write the symmetric grid, which loads exactly.
        raise HeteroError("--format ct writes symmetric int4: pass --sym")
    if eval_tokens < 0:
        raise HeteroError(f"--eval-tokens must be ≥ 0 (got {eval_tokens})")
    if method is None and fmt == "hf" and not adapter:
        raise HeteroError(f"--method is required; known: {methods.known()}")
    if method is not None and method not in methods.METHODS:
        raise HeteroError(f"unknown method {method!r}; known: {methods.known()}")
    if fmt == "gguf":
        from hetero.compress.gguf_export import check_type

        check_type(gguf_type)
    from pathlib import Path

    from hetero.compress.core import load_model

    if Path(out).expanduser().exists() and not force:  # fail before the slow part
        raise HeteroError(f"{out} already exists; choose another -o or pass --force")
    _threads(threads)
    from hetero.compress.artifact import check_exportable
    from hetero.model.sources import resolve_spec

    synthetic_gguf = fmt == "gguf" and method is None and (model or "").startswith("synthetic:")
    if not synthetic_gguf:  # a synthetic GGUF is checked by the GGUF writer (which writes MoE shapes too)
        check_exportable(resolve_spec(model))  # before the slow part
    if synthetic_gguf:
        # generated tensor by tensor into the file: neither the model nor its safetensors dir is made
        from hetero.compress.gguf_export import write_synthetic_gguf

        record = write_synthetic_gguf(out, model.split(":", 1)[1], gguf_type, force=force, progress=progress)
        _report(out, record, as_json)
        return
    if adapter:  # a wrong adapter fails before the model loads
        from hetero.finetune.adapter_io import load_adapter

        lora = load_adapter(adapter, resolve_spec(model))
    loaded = load_model(model)
    if adapter:
        from hetero.finetune.adapter_io import merge

        loaded.tensors = merge(loaded.tensors, *lora)
    opts = methods.Options(group=group, sym=sym, sparsity=sparsity, nm=nm, values=values,
                           calib_tokens=calib_tokens, act_order=act_order, layers=layers, steps=steps,
                           progress=progress, awq_grid=awq_grid, head=int4_head)
    if fmt == "ct":  # a tied head is the embedding, which pack-quantized does not hold: kept dense (bf16)
        opts.head = not loaded.spec.tie_embeddings
    target = Path(out).expanduser()
    if method == "distill":  # checkpoints beside the output; a rerun resumes, success removes them
        opts.checkpoint_dir = str(target.with_name(f".{target.name}.checkpoints"))
    spec, tensors, record, grids = loaded.spec, loaded.tensors, None, {}
    if method is not None:
        tensors, record = methods.apply(method, loaded, opts)
        spec = record.pop("_spec", spec)
        grids = record.pop("_grids", {})
        record["logical_bytes"] = record.pop("bytes", None)
    if adapter:
        record = {**(record or {"method": "lora-merge"}), "adapter": str(adapter)}
    if fmt == "ct" and not grids:
        raise HeteroError("--format ct stores a quantiser's grid: use --method rtn, gptq or awq")
    if eval_tokens and record is not None:
        measured = tensors
        if fmt == "gguf":  # matrices without a grid are stored at --type: measure what the file holds
            from hetero.compress.gguf_export import stored_values

            measured = stored_values(spec, tensors, gguf_type, grids)
        elif fmt == "ct":
            from hetero.compress import ct_export

            measured = ct_export.stored_values(spec, tensors, grids)
        record["perplexity"] = _measure(spec, measured, loaded.tokenizer, eval_tokens, progress)
    if fmt == "gguf":
        from hetero.compress.gguf_export import write_gguf

        record = write_gguf(out, loaded, spec, tensors, gguf_type, record, force=force, progress=progress,
                            grids=grids)
    elif fmt == "ct":
        from hetero.compress.ct_export import write_ct_dir

        record = write_ct_dir(out, spec, tensors, grids, record, loaded.tokenizer, force=force)
    else:
        from hetero.compress.artifact import write_hf_dir

        write_hf_dir(out, spec, tensors, record, loaded.tokenizer, dtype=store, force=force)
    if opts.checkpoint_dir:
        import shutil

        shutil.rmtree(opts.checkpoint_dir, ignore_errors=True)
    _report(out, record, as_json)


def _measure(spec, tensors, tokenizer, tokens: int, progress: bool) -> dict:
    """Perplexity of the compressed tensors as `hetero eval ARTIFACT` measures it by default."""
    from hetero.compress.core import build_net
    from hetero.eval.corpus import BUILTIN_NAME, eval_ids
    from hetero.eval.perplexity import check_settings, perplexity

    ids = eval_ids(tokenizer, None, tokens)
    context = min(512, spec.max_context)
    check_settings(len(ids), context, context // 2, spec.max_context)
    r = perplexity(build_net(spec, tensors), ids, context, context // 2, progress=progress)
    return {"value": round(r.perplexity, 6), "tokens": r.tokens, "text": BUILTIN_NAME,
            "context": context, "stride": context // 2}


def _report(out: str, record: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record))
        return
    print(f"wrote {out}  ({record.get('method', 'convert')}, {record.get('bytes', 0) / 1e6:.1f} MB on disk"
          f" vs {record.get('baseline_fp32_bytes', 0) / 1e6:.1f} MB fp32)", file=sys.stderr)
    ppl = record.get("perplexity")
    if ppl:
        print(f"perplexity {ppl['value']:.4f}  ({ppl['tokens']} tokens of {ppl['text']}, context "
              f"{ppl['context']}, stride {ppl['stride']})", file=sys.stderr)


def sensitivity(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    out: str = typer.Option(..., "-o", "--output", help="Where to write the table (JSON)."),
    precisions: str = typer.Option("int8,int4", "--precisions", help="Comma-separated: bf16, int8, int4."),
    tokens: int = typer.Option(512, "--tokens", help="Calibration tokens (second half of the built-in corpus)."),
    context: int = typer.Option(512, "--context", help="Tokens per window."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: torch's)."),
) -> None:
    """Measure each unit's quality cost at each precision (alone) and save the planner's table."""
    from pathlib import Path

    from hetero.compress.artifact import write_json_atomic
    from hetero.compress.core import load_model
    from hetero.compress.sensitivity import PRECISIONS, measure
    from hetero.errors import HeteroError
    from hetero.eval.corpus import calib_ids

    ps = [p.strip() for p in precisions.split(",") if p.strip()]
    bad = [p for p in ps if p not in PRECISIONS]
    if bad or not ps:
        raise HeteroError(f"unknown precision {bad[0] if bad else precisions!r}; known: {', '.join(PRECISIONS)}")
    if Path(out).exists() and not force:
        raise HeteroError(f"{out} already exists; choose another -o or pass --force")
    _threads(threads)
    loaded = load_model(model)
    table = measure(loaded, calib_ids(loaded.tokenizer, tokens), ps, context, progress=progress)
    write_json_atomic(Path(out).expanduser(), table)
    print(f"wrote {out}: {len(table['units'])} units × {len(ps)} precisions "
          f"(baseline perplexity {table['meta']['baseline_perplexity']:.3f} on {table['meta']['tokens']} tokens)",
          file=sys.stderr)


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command()(compress)
    app.command()(sensitivity)
