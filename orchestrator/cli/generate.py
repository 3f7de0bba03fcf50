"""`islands generate RUN --prompt TEXT`: continue a prompt with the c-BTM ensemble."""

from __future__ import annotations

import typer

from orchestrator.cli.common import MODEL_HELP, console, handles_errors, load_model, open_for_verb
from runstore.errors import InputError


@handles_errors
def generate(run: str = typer.Argument(..., help="Run directory (path or fsspec URL)."),
             prompt: str = typer.Option(..., help="Text to continue."),
             strategy: str = typer.Option("top1", help="top1, topk or full."),
             top_k: int = typer.Option(2, min=1, help="Experts kept by topk."),
             max_new_tokens: int | None = typer.Option(None, min=1,
                                                       help="Bytes to add (default: config)."),
             temperature: float | None = typer.Option(None, min=0.0,
                                                      help="Sampling temperature; 0 is greedy."),
             refresh_every: int | None = typer.Option(None, min=0, help="Re-route every N "
                                                      "new bytes (default: config)."),
             seed: int = typer.Option(0, help="Sampling seed."),
             model: str = typer.Option("ensemble", help=MODEL_HELP)) -> None:
    """Generate text: route the prompt to experts by cluster distance, mix their
    next-byte distributions; or continue it with the distilled student (--model distill)."""
    from orchestrator.ensemble import Routing, check_strategy
    from orchestrator.modalities.text.generation import GenerateRequest
    from orchestrator.modalities.text.generation import generate as continue_text

    check_strategy(strategy, "--strategy")
    config, manifest = open_for_verb(run, "generate", strategy, top_k)
    if not prompt:
        raise InputError("--prompt", "expected a non-empty prompt")
    ensemble, metas = load_model(config, manifest, model, run)
    text, history = continue_text(ensemble, metas[0]["context"], GenerateRequest(
        prompt, Routing(strategy, top_k), max_new_tokens or config.inference.max_new_tokens,
        config.inference.temperature if temperature is None else temperature, seed,
        config.router.refresh_every if refresh_every is None else refresh_every))
    weights = ", ".join(f"{w:.2f}" for w in history[0].tolist())
    if model == "ensemble":
        console.print(f"[dim]routing ({strategy}): [{weights}][/]", highlight=False)
    console.print(prompt + text, highlight=False, markup=False)
