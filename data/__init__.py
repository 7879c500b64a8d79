"""What ships with the package: the embedded tiny model, its tokenizer and small data sets (installed as
`ctxaware.data`)."""

from pathlib import Path


DATA_DIR = Path(__file__).resolve().parent
