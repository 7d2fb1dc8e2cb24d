"""Fine-tuning: LoRA or full UNet training on one dataset version, published to the store.

``trainer.train`` is the stage; ``encoded`` turns a dataset split into VAE latents and
caption embeddings once (the encoders are frozen); ``checkpoints`` saves and resumes.
"""
