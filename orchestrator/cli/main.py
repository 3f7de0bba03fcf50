"""Entry point of the `islands` command."""

from __future__ import annotations

import typer

from orchestrator.cli import (
    cancel,
    distill,
    evaluate,
    generate,
    island,
    islands,
    logs,
    mesh,
    resume,
    run,
    sample,
    serve,
    status,
    submit,
    validate,
)
from orchestrator.cli.common import settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train one model as many experts on isolated islands; serve them "
                       "behind a router.")


@app.callback()
def options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    settings["debug"] = debug


app.command("run")(run.run)
app.command("resume")(resume.resume)
app.command("partition")(run.partition)
app.command("validate")(validate.validate)
app.command("sample")(sample.sample)
app.command("generate")(generate.generate)
app.command("serve")(serve.serve)
app.command("eval")(evaluate.evaluate)
app.command("distill")(distill.distill)
app.command("status")(status.status)
app.command("islands")(islands.islands)
app.command("cancel")(cancel.cancel)
app.command("submit")(submit.submit)
app.command("logs")(logs.logs)
app.add_typer(mesh.mesh_app, name="mesh")
app.add_typer(island.island_app, name="island")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
