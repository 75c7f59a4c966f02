"""The model as math and its loading: config, streaming state, transformer, attention, Mimi (seanet,
quantizer, mimi), the LM (lm, generate, sampling), text and personas, loading the release.

Nothing here knows about compiling, CUDA graphs, threads or sessions; modules import torch and
each other only, except `loading` (files, the hub). Nothing is imported here (see `personaplex`).
"""
