"""One module per DVC stage: each reads params, calls the library and writes outputs.

Imported only by the CLI and by experiments that run whole pipelines (docs/design.md)."""
