"""A tiny model kit: small source and target causal LMs built offline and deterministically.

Three source models of different architectures and tokenizer kinds, each specialised on one
text domain, plus a target model with its own tokenizer trained briefly on the mixture. Each is
saved with ``save_pretrained`` so it loads like a hub model, and all are vLLM architectures.
"""

from fusion_etl.kit.build import KIT_VERSION, Kit, KitModel, KitSize, build_kit, kit_pools
from fusion_etl.kit.eval import bits_per_byte

__all__ = ["KIT_VERSION", "Kit", "KitModel", "KitSize", "bits_per_byte", "build_kit", "kit_pools"]
