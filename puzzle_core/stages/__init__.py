"""Pipeline stages, one module each, with ``run(ctx) -> list[Path]``."""
