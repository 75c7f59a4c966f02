"""The web app's own layer between the browser and `personaplex.service`: what Gradio and fastrtc
need around them to serve strangers (request limits, who owns which call, the page's live view).

Nothing in `personaplex/` imports from here; `app.py` puts it together.
"""
