"""`lbdl rag index DOCS... --out INDEX` and `lbdl rag query INDEX QUESTION [--answer-with MODEL]`: retrieval over
your own files, and answers that cite them (`lbdl generate MODEL QUESTION --rag INDEX` answers the same way)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..errors import ConfigError
from ..prompting import ChainConfig, PromptConfig
from ..rag.assemble import RagConfig
from ..rag.index import IndexConfig
from ..sample.run import GenerateConfig
from .options import build, complete_model_dirs, config_options, group, optional, out_option
from .output import JSON_OPTION, console, emit, err_console, esc, note, progress_view

app = group("Retrieval-augmented generation: index your files (`lbdl rag index DOCS... --out INDEX`), then "
            "retrieve from them and answer with a model (`lbdl rag query INDEX QUESTION --answer-with MODEL`).")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="rag")


@app.command("index")
@config_options(IndexConfig)
def index(
    docs: list[str] = typer.Argument(..., metavar="DOCS", help="Text, markdown or source files, or directories "
                                     "(walked; hidden and junk folders left out).", show_default=False),
    out: str = out_option("The index directory (built, or updated when it holds an index)."),
    force: bool = typer.Option(False, "--force", help="Rebuild the index from scratch (needed to change the "
                               "chunking or the model); without it an existing index is updated."),
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Index files for retrieval: chunks, BM25, and with --model the chunks' embeddings; run again to add new and
    changed files (only their chunks are embedded)."""
    from ..rag.index import build_index

    cfg = build(IndexConfig, fields)
    with progress_view(quiet=as_json) as listen:
        result = build_index(list(docs), out, cfg, force=force, progress=listen)

    def render():
        for path, why in result["skipped"].items():
            note(f"[yellow]skipped[/yellow] {esc(path)}: {esc(why)}")
        parts = [f"{len(result['added'])} added", f"{len(result['changed'])} changed",
                 f"{result['unchanged']} unchanged"]
        if result["kept"]:
            parts.append(f"{result['kept']} kept from before")
        if result["removed"]:
            parts.append(f"{len(result['removed'])} removed")
        dense = (f", {result['embedded']} embedded now ({result['embedder']['pooling']} pooling of "
                 f"{esc(result['embedder']['model'])})" if result["dense"] else ", lexical only (no --model)")
        console.print(f"{esc(result['out'])}: {result['files']} files ({', '.join(parts)}), {result['chunks']} "
                      f"chunks{dense}, {len(result['skipped'])} skipped; {result['seconds']:.1f} s")

    emit(result, as_json, render)


@app.command("query")
@config_options(ChainConfig)
@config_options(PromptConfig, skip=("seed",))
@config_options(GenerateConfig)
@config_options(RagConfig)
def query(
    index: str = typer.Argument(..., metavar="INDEX", help="An index directory (`lbdl rag index`).",
                                show_default=False),
    question: str = typer.Argument(..., metavar="QUESTION", help="What to retrieve sources for (- reads stdin).",
                                   show_default=False),
    model: Optional[str] = typer.Option(None, "--model", metavar="MODEL", autocompletion=complete_model_dirs,
                                        help=optional("The embedding model of a dense query (default: the one the "
                                                      "index was built with); it must be that model.")),
    answer_with: Optional[str] = typer.Option(None, "--answer-with", metavar="MODEL",
                                              autocompletion=complete_model_dirs,
                                              help=optional("Answer the question with this model (default for "
                                                            "the bundled one) from the retrieved sources.")),
    as_json: bool = JSON_OPTION,
    **fields,
):
    """Retrieve the chunks of an index that best match a question (with rank, score and lines), or answer it with
    a model citing them (--answer-with)."""
    rag = build(RagConfig, fields)
    gen = build(GenerateConfig, fields)
    text = sys.stdin.read() if question == "-" else question
    if answer_with is not None:
        prompt = build(PromptConfig, fields, base={"seed": gen.seed or 0})
        chains = build(ChainConfig, fields)
        answer(None if answer_with == "default" else answer_with, text, index, rag, prompt, chains, gen, as_json,
               embed_model=model)
        return
    from ..rag.index import Index
    from ..rag.retrieve import default_mode, index_embedder, search

    with progress_view(quiet=as_json) as listen:
        idx = Index(index)
        mode = rag.mode or default_mode(idx)
        embedder = None if mode == "bm25" else index_embedder(idx, model, gen.compute_dtype, gen.device, listen)
        hits = search(idx, text, rag.k, mode, embedder, rag.weights, rag.rrf_k)
    result = {"index": index, "question": text, "mode": mode, "k": rag.k, "hits": hits}

    def render():
        if not hits:
            console.print(f"no chunk matches ({mode}); try other words or --mode dense")
        for h in hits:
            preview = " ".join(h["text"].split())
            preview = preview[:100] + ("..." if len(preview) > 100 else "")
            console.print(f"[bold][{h['rank']}][/bold] {h['score']:.4f}  {esc(h['path'])}:{h['first_line']}-"
                          f"{h['last_line']}{_ranks(h, mode)}\n    {esc(preview)}")

    emit(result, as_json, render)


def _ranks(hit: dict, mode: str) -> str:
    if mode != "hybrid":
        return ""
    parts = [f"{name} #{hit[name]['rank']}" if hit[name] else f"{name} -" for name in ("bm25", "dense")]
    return f"  ({', '.join(parts)})"


def answer(model_arg, question: str, index: str, rag: RagConfig, prompt: PromptConfig, chains: ChainConfig,
           gen: GenerateConfig, as_json: bool, embed_model: str | None = None) -> None:
    """The answer from retrieved sources, streamed, then its sources (`rag query --answer-with`, `generate
    --rag`)."""
    from ..rag.assemble import rag_generation

    if gen.each_line or gen.num_samples != 1:
        raise ConfigError("--each-line and --num-samples do not combine with --rag; use --self-consistency K for K "
                          "chains of one question")
    out = sys.stdout
    state = {"first": True}

    def on_text(new_text: str):
        if state["first"]:
            state["first"] = False
            if not chains.show_prompt:
                return
            err_console.print("[dim]--- prompt ---[/dim]")
        out.write(new_text)
        out.flush()

    with progress_view(quiet=as_json) as listen:
        stream = None if as_json or chains.self_consistency > 1 else on_text
        result = rag_generation(model_arg, question, index, rag, prompt, chains, gen, embed_model=embed_model,
                                on_text=stream, progress=listen)

    def render():
        if result["chains"] == 1:
            out.write("\n")
        else:
            if chains.show_prompt:
                out.write(result["prompt"] + "\n")
            for i, (g, a) in enumerate(zip(result["results"], result["answers"])):
                out.write(f"--- chain {i + 1} ({g['finish_reason']}), answer {a} ---\n{g['text'].strip()}\n")
        out.flush()
        if result["answers"]:
            votes = ", ".join(f"{a}: {n}" for a, n in result["votes"].items()) or "no answer found"
            console.print(f"answer: {esc(result['answer'])} (votes {esc(votes)})")
        dropped = f" ({result['sources_dropped']} dropped to fit the context)" if result["sources_dropped"] else ""
        console.print(f"sources ({result['mode']}){dropped}:")
        for line in result["sources"] or ["none"]:
            console.print(f"  {esc(line)}")

    emit(result, as_json, render)
