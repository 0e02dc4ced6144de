"""The ``dogkit`` command line: parses options and calls the library; all the work lives elsewhere."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .errors import DogkitError
from .progress import console

app = typer.Typer(
    help="Train ResNet50 dog-breed classifiers on Stanford Dogs, export to ONNX, predict with ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"dogkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")]
    = False,
) -> None:
    """dogkit: prepare Stanford Dogs, train ResNet50 three ways, export to ONNX, evaluate, benchmark."""


@app.command()
def prepare(
    source: Annotated[
        list[Path] | None,
        typer.Option("--source", "-s", help="Extracted folder (Stanford layout or class folders) or archive(s) "
                     "(.tar, .tar.gz, .zip). Repeat for several archives. Default: download the official archives."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder for manifest.csv, classes.json, rejects.csv, dataset.json.")]
    = Path("artifacts/data/stanford-dogs"),
    seed: Annotated[int, typer.Option(help="Seed of the split; the same inputs and seed give the same manifest.")] = 0,
    ratios: Annotated[str, typer.Option(help="train/val/test shares.")] = "70/15/15",
    split: Annotated[str, typer.Option(help="'random' (stratified) or 'official' (Stanford's train/test lists, "
                                       "val carved from train).")] = "random",
    crop: Annotated[str, typer.Option(help="'boxes': train and evaluate on the dog's bounding box; 'none': full "
                                      "image.")] = "none",
    cache: Annotated[int | None, typer.Option(help="Also cache every image shrunk to this shorter side (pixels) "
                                              "as raw uint8, so training never waits on JPEG decoding.")] = None,
    workers: Annotated[int | None, typer.Option(help="Decode threads (default: the CPUs this process may use).")]
    = None,
    download_dir: Annotated[Path | None, typer.Option(help="Where the official archives are downloaded "
                                                      "(default: <out>/downloads).")] = None,
    force: Annotated[bool, typer.Option(help="Rescan and rewrite even when the outputs are up to date.")] = False,
) -> None:
    """Get Stanford Dogs (or any class-folder dataset), check every image, and write a 70/15/15 manifest."""
    from .prepare import PrepareConfig
    from .prepare import prepare as run_prepare
    from .split import parse_ratios

    cfg = PrepareConfig(sources=list(source or []), out=out, seed=seed, ratios=parse_ratios(ratios), split=split,
                        crop=crop, cache_size=cache, workers=workers, download_dir=download_dir, force=force)
    result = run_prepare(cfg)

    if result.up_to_date:
        console.print(f"[green]Dataset in {out} is up to date[/] (same files and options); nothing rescanned.")
    elif result.scanned:
        console.print(f"Scanned {result.scanned} files in {result.scan_seconds:.1f} s "
                      f"({result.scan_images_per_s:.0f} images/s).")
    table = Table(title=f"Prepared dataset: {out}")
    table.add_column("")
    table.add_column("images", justify="right")
    for name in ("train", "val", "test", "total"):
        table.add_row(name, str(result.counts[name]))
    table.add_row("classes", str(result.classes))
    table.add_row("rejected files", str(sum(result.rejects.values())))
    table.add_row("duplicate groups", f"{result.duplicate_groups} ({result.duplicates_excluded} files excluded)")
    console.print(table)
    if result.rejects:
        console.print("Rejects by reason (details in rejects.csv):")
        for reason, n in result.rejects.items():
            console.print(f"  {n:5d}  {reason}")
    if result.cache:
        c = result.cache
        verb = f"built in {c.seconds:.1f} s ({c.images_per_s:.0f} images/s)" if c.built else "up to date"
        console.print(f"Image cache {c.path} ({c.bytes / 2**20:.0f} MiB): {verb}.")
    console.print(f"\nNext: [bold]dogkit train --exp 1 --data {out}[/]")


def main() -> None:
    try:
        app()
    except DogkitError as e:
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; finished work is kept and the next run picks up from it.")
        sys.exit(130)


if __name__ == "__main__":
    main()
