"""Models built on vqfast's quantizers: the taming-transformers VQGAN (with loaders for taming,
diffusers and LlamaGen checkpoints) and the VQ-VAE of van den Oord et al. 2017."""
from vqfast.models.loaders import from_diffusers, from_llamagen, from_taming, taming_loss_state_dict
from vqfast.models.vqgan import VQGAN, Decoder, Encoder, L2NormVectorQuantizer
from vqfast.models.vqvae import VQVAE, make_quantizer

__all__ = ["VQGAN", "Encoder", "Decoder", "L2NormVectorQuantizer", "from_taming", "from_diffusers", "from_llamagen",
           "taming_loss_state_dict", "VQVAE", "make_quantizer"]
