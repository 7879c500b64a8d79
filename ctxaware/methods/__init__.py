"""Model surgery and adapters, one module per method."""
