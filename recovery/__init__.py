"""recovery: ARIES-style restart (analysis, redo, undo with CLRs) and the
checkpointer."""
