"""fast-sd: few-step Stable Diffusion behind one Cog predictor.

- lib.engine: the mode table, input validation, loading, the engine and its batcher, decoding, images, the safety
  checker, the fast path and device memory;
- lib.weights: the weights manifest and lock, the cache, downloads;
- lib.loras: style LoRAs;
- lib.jobs: async jobs driven by webhooks (never imported by predict.py);
- lib.testkit: synthetic models and test servers;
- lib.settings: every environment variable the package reads.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project: cog.yaml, predict.py, weights/, ...
CONFIGS = ROOT / "lib" / "configs"  # the real model configs, in the Hub layout
