"""The plain way to start a transformers worker: the cold-start benchmark's baseline.

    python bench/naive_start.py MODEL_FOLDER

Imports torch, transformers and runpod, loads with `from_pretrained` then `.to(device)`, and runs the same
generation as the worker's warm-up (the chat template around "Hi", two greedy tokens). Prints its own phase
times as one JSON line, then `ready`.
"""

import json
import sys
import time

started = time.perf_counter()

import runpod  # noqa: E402, F401  (a worker imports it before it starts taking jobs)
import torch  # noqa: E402
import transformers  # noqa: E402, F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

imported = time.perf_counter()
folder = sys.argv[1]
device = "cuda" if torch.cuda.is_available() else "cpu"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).to(device)
loaded = time.perf_counter()
text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
generated = time.perf_counter()

phases = {"imports": imported - started, "load": loaded - imported, "generate": generated - loaded}
print(json.dumps(phases), flush=True)
print("ready", flush=True)
