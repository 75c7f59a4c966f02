"""What calls leave: recordings on disk with a bounded memory and length, with their transcript,
and a store that hands a recording only to the page session that made the call."""

from __future__ import annotations

import time
import tracemalloc
import wave

import numpy as np

from personaplex.model.config import FRAME_SIZE
from personaplex.runtime.recording import CallRecording, FileStore

FRAME = np.full(FRAME_SIZE, 0.25, dtype=np.float32)


def test_a_long_call_holds_no_audio_in_memory_and_its_recording_is_capped(tmp_path):
    recording = CallRecording(tmp_path, max_seconds=60)
    for _ in range(100):  # warm up the allocator and the file object
        recording.add(FRAME, FRAME, "")
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for i in range(7500):  # 10 minutes of frames, ten times the cap
        recording.add(FRAME, FRAME if i % 2 else None, " word" if i % 50 == 0 else "")
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert after - before < 200_000  # the turns of the first minute, not audio (10 min would be 115 MB)
    recording.close()
    assert recording.frames == 750 and recording.truncated
    with wave.open(str(recording.wav_path)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (2, 24000, 750 * FRAME_SIZE)
    text = recording.transcript_path.read_text()  # the user spoke all along; the model from 8 s on (after the warm-up)
    assert text.startswith("[0:00] You: (spoke for 60.0 s)\n[0:08] Model: word\n[0:12] Model: word\n"), text


def test_a_recording_is_found_only_with_its_owners_token(tmp_path):
    store = FileStore(tmp_path)
    recording = store.recording("owner-a", "call-1")
    assert store.find("owner-a", "call-1") is recording
    for owner, call in [("owner-b", "call-1"), (None, "call-1"), ("", "call-1"), ("owner-a", "call-2"), ("owner-a", None)]:
        assert store.find(owner, call) is None
    assert recording.folder.parent == tmp_path and len(recording.folder.name) >= 20  # an unguessable name


def test_old_and_surplus_folders_are_deleted_but_not_a_call_in_progress(tmp_path):
    store = FileStore(tmp_path, keep=3, max_age_s=100)
    live = store.recording("a", "live")  # still being written
    done = []
    for i in range(4):
        rec = store.recording("a", f"done-{i}")
        rec.close()
        done.append(rec)
    # 5 folders, keep 3: the two oldest closed ones go, the call in progress stays
    assert live.folder.exists() and [r.folder.exists() for r in done] == [False, False, True, True]
    store.prune(now=1e12)  # much later: everything closed is old
    assert live.folder.exists() and not any(r.folder.exists() for r in done)
    live.close()
    store.prune(now=1e12)
    assert not live.folder.exists() and store.find("a", "live") is None


def test_more_calls_than_the_store_keeps_and_a_new_folder_beside_them_all_stay(tmp_path):
    """With more calls in progress than `keep` (64 slots, 32 kept), every recording is written and
    an offline run's new folder is not deleted before its files have left."""
    store = FileStore(tmp_path, keep=2, max_age_s=100, grace_s=60)
    live = [store.recording("a", f"call-{i}") for i in range(4)]
    offline = store.folder()
    assert all(r.folder.exists() for r in live) and offline.exists()
    store.prune(now=time.monotonic() + 61)  # a minute later the surplus goes
    assert not offline.exists() and all(r.folder.exists() for r in live)


def test_a_store_of_its_own_deletes_its_folder_when_it_goes():
    import gc

    store = FileStore()
    (store.folder() / "model.wav").write_bytes(b"x")
    root = store.root
    assert root.exists()
    del store
    gc.collect()
    assert not root.exists()
