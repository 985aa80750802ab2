"""Tool calls and reasoning: how a model is shown tools and how its answers are read (formats.py chooses the
response template, reader.py reads an answer with it as it streams, arguments.py streams JSON arguments)."""
