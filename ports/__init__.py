"""The imperative shell of jaxmask: checkpoints, the Flax Stable Diffusion
sampler, devices, files, CLI."""
