"""The `stagediff` command. With a Prefect API configured (`PREFECT_API_URL`, or in the active profile),
`generate` runs as the `generate` flow, recorded on that API (the stages in this process); everything
else, and `generate` without an API, is `stagediff.cli`, which never imports Prefect."""

from __future__ import annotations

import sys

from stagediff import cli
from stagediff.prefect_api import prefect_api_url


def prefect_api_configured() -> bool:
    """True when Prefect would talk to an API server: `PREFECT_API_URL` in the environment or in the
    active profile of `$PREFECT_HOME/profiles.toml` (read here: importing Prefect takes seconds)."""
    return prefect_api_url()[0] is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["generate"] or not prefect_api_configured():
        return cli.main(argv)
    return cli.main(argv, generate=run_recorded)


def run_recorded(args) -> str:
    """The generate flow for the command's batch, in this process; returns the manifest's URI."""
    from flows.generate import generate

    return generate(**cli.generate_parameters(args), dispatch="in-process")


if __name__ == "__main__":
    sys.exit(main())
