"""`clinragen-fhir keys`: SMART Backend Services key pairs and the JWKS a hospital registers."""

from __future__ import annotations

import json
from pathlib import Path

import click

from clinragen_fhir.fhir import keys as smart_keys


@click.group()
def keys() -> None:
    """SMART Backend Services keys: generate a key pair, print the public JWKS to register."""


@keys.command()
@click.option("--alg", type=click.Choice(["RS384", "ES384"]), default="RS384", show_default=True,
              help="RS384: RSA 3072; ES384: EC P-384.")
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Key directory (created 0700): the worker's private_key_dir.")
def generate(alg: str, out_dir: Path) -> None:
    """Write a new private key (mode 0600) and its public JWK; the kid is its RFC 7638
    thumbprint. The newest key in a directory signs; run `keys jwks` and register the JWKS
    before the worker sees the new key."""
    key, public = smart_keys.generate(alg, out_dir)  # type: ignore[arg-type]
    click.echo(f"kid {key.kid}")
    click.echo(f"private key {key.path} (0600)")
    click.echo(f"public key {public}")


@keys.command()
@click.argument("dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
def jwks(dirs: tuple[Path, ...]) -> None:
    """Print the public JWKS of every key in DIRS, newest first (what the hospital registers
    for the client, or serves at its jwks_url)."""
    click.echo(json.dumps(smart_keys.jwks(dirs), indent=2))
