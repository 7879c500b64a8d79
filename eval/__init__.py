"""Shared evaluation harnesses behind `ctxaware eval` (installed as `ctxaware.eval`)."""
