"""`cmcr connector import` and `cmcr connector info`: the authors' released connectors, and what a connector is.

Thin: parse, call :mod:`cmcr.trainer.release`, report. ``--side-a/--side-b`` given as an encoder
spec load that encoder once (CPU) to read the identity it records; everything else loads no model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from cmcr.errors import ConnectorError

console = Console()

connector_app = typer.Typer(help="Connectors: import the authors' released ones, show what a connector is.",
                            no_args_is_help=True)

SIDE_HELP = ("Bind side {side} ({what}) to other weights than the preset's: an encoder spec (loaded once on CPU to "
             "read its identity, e.g. {example}), an identity as JSON ('{{\"family\": ...}}', a list of them, or a "
             ".json file). A checkpoint file is identified by its sha256: naming it here is how you vouch that it "
             "is the official file.")


def side_identities(value: str, *, side: str, modalities: list[str], clap_tokenizer: str | None) \
        -> tuple[Any, str]:
    """Parse one ``--side-a/--side-b`` value into identity pattern(s) and how it was given.

    Returns:
        ``(identity dict or list of dicts, "JSON" | "encoder spec")``.

    Raises:
        ConnectorError: unreadable JSON, or an encoder that cannot embed the side's modalities.
    """
    text = value.strip()
    path = Path(text)
    if text.startswith(("{", "[")) or (text.endswith(".json") and path.is_file()):
        try:
            return json.loads(path.read_text() if not text.startswith(("{", "[")) else text), "JSON"
        except (OSError, ValueError) as e:
            raise ConnectorError(f"--side-{side.lower()} {value}: not a readable JSON identity ({e})") from e
    from cmcr.pipeline.encoders import load_encoder

    enc = load_encoder(text, device="cpu", clap_tokenizer=clap_tokenizer)
    missing = [m for m in modalities if m not in enc.modalities]
    if missing:
        raise ConnectorError(f"--side-{side.lower()} {value}: that encoder embeds {list(enc.modalities)}, but side "
                             f"{side} takes {modalities} (missing {missing})")
    return enc.identity(), "encoder spec"


@connector_app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="The released file: clap_clip.pt or ulip_clip.pt (MCR-PEFT/C-MCR)."),
    preset: str = typer.Option(..., "--preset", "-p", help="clap_clip or ulip_clip (which heads the file holds)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output connector folder."),
    side_a: str | None = typer.Option(None, "--side-a", help=SIDE_HELP.format(
        side="A", what="CLIP", example="open_clip:ViT-B-32@/ckpt/ViT-B-32.pt")),
    side_b: str | None = typer.Option(None, "--side-b", help=SIDE_HELP.format(
        side="B", what="CLAP or ULIP", example="ulip:PointBERT@/ckpt/pointbert_ULIP-2.pt")),
    clap_tokenizer: str | None = typer.Option(None, "--clap-tokenizer", envvar="CMCR_CLAP_TOKENIZER",
                                              help="RoBERTa tokenizer folder, for a CLAP spec in --side-b."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over: replace the connector in --out, whatever "
                                   "it is (without it the same import is a no-op; another connector is refused)."),
    as_json: bool = typer.Option(False, "--json", help="Print `connector info` of the result as JSON."),
) -> None:
    """Import a connector released by the C-MCR authors as an ordinary cmcr connector.

    Side A is always CLIP; side B is CLAP (clap_clip) or ULIP (ulip_clip), whichever released head holds it
    (Head_A is CLAP in clap_clip.pt but CLIP in ulip_clip.pt). Each side is bound to the encoder identity
    the head was trained on (OpenAI CLIP ViT-B/32; LAION-CLAP HTSAT-tiny fusion 630k; ULIP-2 PointBERT):
    `project`, `search` and `eval` refuse stores of any other encoder.

    Example: cmcr connector import cmcr/data/release/ulip_clip.pt --preset ulip_clip --out runs/ulip_clip
    --side-b ulip:PointBERT@/ckpt/pointbert_ULIP-2.pt
    """
    from cmcr.trainer.release import PRESETS, import_release

    if preset not in PRESETS:
        raise ConnectorError(f"--preset {preset!r}: use one of {', '.join(sorted(PRESETS))}")
    overrides: dict[str, Any] = {}
    bound_by: dict[str, str] = {}
    for side, value in (("A", side_a), ("B", side_b)):
        if value:
            overrides[side], bound_by[side] = side_identities(
                value, side=side, modalities=list(PRESETS[preset].sides[side].modalities),
                clap_tokenizer=clap_tokenizer)
    conn = import_release(file, preset, out, sides=overrides, bound_by=bound_by, overwrite=overwrite)
    if as_json:
        typer.echo(json.dumps(conn.describe(), indent=2, default=str))
        return
    console.print(f"imported {file} ({preset}) as connector {conn.fingerprint} in {out}", highlight=False,
                  soft_wrap=True)
    _print_info(conn.describe())


@connector_app.command("info")
def info_cmd(
    folder: Path = typer.Argument(..., help="Connector folder (from `cmcr connect` or `cmcr connector import`)."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show a connector: fingerprint, sides (MCR, modalities, accepted encoder identities), architecture,
    provenance (training stores, or the imported file with its sha256 and preset). Verifies the files first.

    Example: cmcr connector info runs/ulip_clip --json
    """
    from cmcr.trainer.connector import Connector

    d = Connector.load(folder).describe()
    if as_json:
        typer.echo(json.dumps(d, indent=2, default=str))
        return
    _print_info(d)


def _pattern(p: dict[str, Any]) -> str:
    """``family:architecture @weights`` plus the other fields as ``k=v`` (one identity, one line)."""
    head = f"{p.get('family', '*')}:{p.get('architecture', '*')}"
    weights = p.get("weights")
    if isinstance(weights, str) and weights.startswith("sha256:") and len(weights) > 23:
        weights = weights[:23] + "…"
    rest = " ".join(f"{k}={v}" for k, v in p.items() if k not in ("family", "architecture", "weights"))
    return f"{head} @{weights if weights is not None else '*'} {rest}".strip()


def _print_info(d: dict[str, Any]) -> None:
    console.print(f"connector {d['fingerprint']} ({d['path']}), created {d['created_at']}, output dim {d['out_dim']}",
                  highlight=False, soft_wrap=True)
    table = Table(title="sides")
    for col in ("side", "mcr", "modalities", "accepts embeddings of", "architecture"):
        table.add_column(col, overflow="fold")
    for s, info in d["sides"].items():
        a = d["architecture"][s]
        arch = (f"{a['in_dim']}→" + (f"{a['hidden_dim']}→" * (a["depth"] - 1)) + f"{a['out_dim']}, depth {a['depth']}"
                f"{', BN' if a['batchnorm'] else ''}, {a['activation']}"
                f"{' (also last)' if a['final_activation'] else ''}; {a['parameters']:,} params")
        table.add_row(s, info["mcr"], ", ".join(info["modalities"]),
                      "\n".join(_pattern(p) for p in info["accepts"]), arch)
    console.print(table)
    if any(i["accepts"] != [i["encoder"]] or i["match"] != "exact identity" for i in d["sides"].values()):
        console.print("identity patterns: an encoder identity is accepted when it has every field shown with that "
                      "value (other fields are free); see docs/connector-format.md", style="dim")
    prov = d["provenance"]
    if prov.get("kind") == "import":
        console.print(f"imported from {prov['source_file']} (sha256 {prov['source_sha256']}), preset {prov['preset']}, "
                      f"{prov['origin']['repository']}@{prov['origin']['commit']} ({prov['origin']['licence']})",
                      highlight=False, soft_wrap=True)
        for s, p in prov["sides"].items():
            console.print(f"  side {s}: released {p['released_head']} — {p['model']}; bound by {p['bound_by']}",
                          highlight=False, soft_wrap=True)
    else:
        stores = prov.get("stores") or {}
        console.print("trained by `cmcr connect` on: " + ", ".join(
            f"{k} {v.get('path')} ({v.get('rows')} rows)" for k, v in stores.items()), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``cmcr connector`` to the root app."""
    app.add_typer(connector_app, name="connector")
