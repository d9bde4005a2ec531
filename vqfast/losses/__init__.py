"""Training losses: the VQGAN objective (pixel + LPIPS + PatchGAN with the adaptive weight)."""
from vqfast.losses.discriminator import ActNorm, NLayerDiscriminator
from vqfast.losses.lpips import LPIPS
from vqfast.losses.vqgan_loss import VQGANLoss, adaptive_weight, hinge_d_loss, vanilla_d_loss

__all__ = ["VQGANLoss", "LPIPS", "NLayerDiscriminator", "ActNorm", "adaptive_weight", "hinge_d_loss",
           "vanilla_d_loss"]
