"""RunPod Serverless entry point: `python handler.py [--test_input JSON] [--rp_serve_api]`.

The runpod SDK reads those flags itself; all the work lives in src/worker_transformers.
"""

import sys
from pathlib import Path

# Run from a checkout or an image without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

if __name__ == "__main__":
    from worker_transformers.startup import readahead

    # First, so the kernel reads the imports' pages while they run (readahead.py); then the imports.
    reading_ahead = readahead.start()

    from worker_transformers.worker import main

    main(readahead=reading_ahead)
