"""`islands sample RUN`: draw images from the ensemble into a PNG grid."""

from __future__ import annotations

import io
from pathlib import Path

import typer

from orchestrator.cli.common import MODEL_HELP, console, handles_errors, load_model, open_for_verb
from runstore.errors import InputError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def output_format(out: Path) -> str:
    """The image format `out`'s suffix names: never PNG bytes under a .jpg name."""
    image_format = FORMATS.get(out.suffix.lower())
    if image_format is None:
        raise InputError("--out", f"{str(out)!r}: expected a file name ending in "
                         f"{', '.join(FORMATS)}")
    return image_format


@handles_errors
def sample(run: str = typer.Argument(..., help="Run directory (path or fsspec URL)."),
           n: int = typer.Option(64, "--n", min=1, help="Number of samples."),
           strategy: str = typer.Option("top1", help="top1, topk or full."),
           top_k: int = typer.Option(2, min=1, help="Experts kept by topk."),
           steps: int | None = typer.Option(None, min=1, help="Euler steps (default: config)."),
           seed: int = typer.Option(0, help="Noise seed."),
           model: str = typer.Option("ensemble", help=MODEL_HELP),
           out: Path = typer.Option(Path("samples.png"), help="Output image: .png, .jpg "
                                    "or .webp, by its suffix.")) -> None:
    """Sample from the ensemble with a routing strategy (or from the distilled student) and
    save a grid."""
    import torch
    from PIL import Image

    from orchestrator.ensemble import Routing, check_strategy
    from orchestrator.evaluate.pictures import grid_png
    from orchestrator.modalities.image.sampling import sample as sample_images

    check_strategy(strategy, "--strategy")
    image_format = output_format(out)
    config, manifest = open_for_verb(run, "sample", strategy, top_k)
    ensemble, metas = load_model(config, manifest, model, run)
    noise = torch.randn((n, *metas[0]["image_shape"]),
                        generator=torch.Generator().manual_seed(seed))
    images = sample_images(ensemble, noise, steps or config.inference.sample_steps,
                           Routing(strategy, top_k))
    grid = grid_png(images)
    if image_format != "PNG":
        converted = io.BytesIO()
        Image.open(io.BytesIO(grid)).convert("RGB").save(converted, format=image_format)
        grid = converted.getvalue()
    out.write_bytes(grid)
    what = strategy if model == "ensemble" else "distilled student"
    console.print(f"wrote {n} samples ({what}, {ensemble.expert_rows / n:.1f} expert "
                  f"calls per sample) to {out}")
