"""What batches and times the model: the engine (slots, one batched tick), its compiled pieces and
CUDA graphs, the engine thread (worker), where a call meets it (port), a call's timeline
(session, framing), what a call leaves (recording, transcript), audio I/O and capacity.

Nothing here knows about HTTP, Gradio or Ray. The session's side (session, port, framing,
recording, transcript, audio) imports no torch: a page in front of a cluster runs it. Nothing is
imported here (see `personaplex`).
"""
