"""PersonaPlex-7B in PyTorch: the release weights, streaming Mimi and LM, a batched engine, its servers.

Three wings, each importing only the ones below it:
  * `personaplex.model`: the model as math and its loading (config, Mimi, the LM, generation,
    sampling, personas); nothing there knows about compiling, threads or calls;
  * `personaplex.runtime`: what batches and times the model (the engine and its graphs, the
    engine thread, a call's port and session, recordings, capacity);
  * `personaplex.serve`: what the outside world calls (the service and its torch-free contract,
    `/api/chat`, the remote service, the Ray Serve cluster, the offline CLI).
`personaplex.errors` is the ground floor of all three. Nothing is imported here: a page in front
of a cluster imports the contract without torch.
"""
