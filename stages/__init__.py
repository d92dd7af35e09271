"""Thin CLIs, one per DVC stage: parse, load the stage's params section, call the library, write outs atomically."""
