"""Inline alerts: rules (what to compare), evaluate (decide, pure), store (write in the
batch's transaction), publish (announce after the commit), engine (ties them)."""
