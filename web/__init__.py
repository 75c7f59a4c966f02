"""The page around `app.py`: what Gradio and fastrtc need to serve strangers, and what the page shows.

`handler` (a live call over WebRTC, an adapter around `personaplex.serve.call.Call`), `events`
(what each control and API endpoint does), `values` (what the controls mean), `call_page`,
`call_page.js`, `page.css` and `health` (the call's live view), `connections` (who owns which
call), `limits` and `gradio_queue` (what strangers can send), `half_rate` (the microphone to
24 kHz). It speaks to the server side through `personaplex.serve` (the contract) and uses the
torch-free helpers below it (audio formats, a transcript's turns). Nothing in `personaplex/`
imports from here.
"""
