"""How good stored latents are, seen as video: quality metrics and writing clips. No Ray here.

metrics.py   PSNR and SSIM in plain torch
media.py     clips and images written like Open-Sora's `save_sample`, preview grids
"""
