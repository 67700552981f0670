"""TinyWorld: a small, invented, deterministic world and every data set gptlab's pipeline needs.

``write_world(out_dir, seed, preset)`` writes the ground truth (world.json), a pretraining
corpus, benchmarks (world_mmlu, arithmetic, word tasks), SFT conversations and preference
pairs, with train/test splits that never leak. ``Oracle(world_dir)`` is the hidden "human"
preference that scores and compares answers. See docs/tinyworld.md.
"""

from gptlab.world.generator import format_summary, write_world
from gptlab.world.oracle import Oracle
from gptlab.world.presets import PRESETS, Mixture, WorldSize

__all__ = ["write_world", "format_summary", "Oracle", "PRESETS", "WorldSize", "Mixture"]
