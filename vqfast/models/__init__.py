"""Models built on vqfast's quantizers: the taming-transformers VQGAN (with loaders for taming,
diffusers and LlamaGen checkpoints)."""
from vqfast.models.loaders import from_diffusers, from_llamagen, from_taming, taming_loss_state_dict
from vqfast.models.vqgan import VQGAN, Decoder, Encoder, L2NormVectorQuantizer

__all__ = ["VQGAN", "Encoder", "Decoder", "L2NormVectorQuantizer", "from_taming", "from_diffusers", "from_llamagen",
           "taming_loss_state_dict"]
