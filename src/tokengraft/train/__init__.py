"""Supervised fine-tuning with new tokens: LLaVA-format data, modes ``rows``/``lora``/``full``,
new-token metrics, checkpoints that hold only what trained, resume, many processes.

``load_run(path)`` (in :mod:`tokengraft.train.run`) turns a run folder back into a merged model."""
