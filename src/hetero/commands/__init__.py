"""CLI subcommands, one module per topic; each defines `register(app)` and is discovered by hetero.cli."""
