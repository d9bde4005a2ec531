"""Applications of a trained tokenizer (issue 7): the commands behind ``python -m vqfast``.

* ``train_prior``  -- ``train-prior``: codes of the tokenizer's crops computed once, a ``CodePrior`` on them.
* ``sample``       -- ``sample``: codes drawn from the prior, decoded by the tokenizer, as a PNG grid.
* ``compress``     -- ``compress`` / ``decompress``: the code grid range-coded with the prior's probabilities.
* ``rate_distortion`` -- ``rate-distortion``: bits/pixel and PSNR/SSIM of raw and prior-coded indices
  beside JPEG and WebP at matched bits/pixel, and the PSNR-against-bpp plot.
* ``restore``      -- ``restore`` / ``train-superres``: denoising and 2x / 4x super-resolution.
* ``evaluate``     -- ``eval``: PSNR, SSIM, LPIPS, codebook usage/perplexity, FID/IS with local weights.
* ``demo``         -- ``demo-apps``: all of the above on the embedded photographs within a CPU budget.
* ``codes``        -- what they share: loading a tokenizer or prior run, images <-> code sequences.
"""
