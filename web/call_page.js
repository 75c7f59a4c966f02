() => {
  // The page's script (web/call_page.py explains the messages it draws).

  // fastrtc first shows a tile that only asks for the microphone, then its start button: the tile
  // is labelled as the start button, and once the microphone is granted the call starts by itself.
  const CALL_BUTTON = "#webrtc button[aria-label='start stream']";
  document.addEventListener("click", (event) => {
    if (!event.target.closest("#webrtc div[title='grant webcam access'] button")) return;
    const since = Date.now();
    const poll = setInterval(() => {
      const start = document.querySelector(CALL_BUTTON);
      if (start) { clearInterval(poll); start.click(); }
      else if (Date.now() - since > 20000) clearInterval(poll);  // the microphone was refused
    }, 100);
  }, true);

  // The call as the server shows it: messages of type "personaplex" on the call's data channel.
  const MAX_TURNS = 20;
  const PLACEHOLDER = "<p class='placeholder'>The conversation shows here, turn by turn.</p>";
  let call = null;  // the call on the page now: {turns: Map key -> {role, html, start}, ended: bool}
  const slot = (name) => document.querySelector(`[data-pp='${name}']`);
  const put = (name, html) => { const el = slot(name); if (el) el.innerHTML = html; };

  function drawTurns() {
    const el = slot("conversation");
    if (!el || !call) return;
    const shown = [...call.turns.values()].sort((a, b) => a.start - b.start).slice(-MAX_TURNS);
    const atEnd = el.scrollHeight - el.scrollTop - el.clientHeight < 40;
    el.innerHTML = shown.length
      ? shown.map((t) => `<div class='turn ${t.role}' data-testid='${t.role}'>${t.html}</div>`).join("")
      : PLACEHOLDER;
    if (atEnd) el.scrollTop = el.scrollHeight;
  }

  function setVerdict(text) {
    const verdict = slot("live")?.querySelector(".verdict");
    if (verdict) { verdict.className = "verdict waiting"; verdict.textContent = text; }
  }

  // While a call goes on, its settings are the call's (page.css dims them and says so).
  const inCall = (on) => document.getElementById("settings")?.classList.toggle("in-call", on);

  function settle() {  // the call is over: its settings can change again
    inCall(false);
  }

  function begin() {
    call = {turns: new Map(), ended: false};
    inCall(true);
    put("conversation", PLACEHOLDER);
    put("details", "");
    setVerdict("connecting");
    return call;
  }

  function show(data) {
    if (data.live) put("live", data.live);
    if (data.details) put("details", data.details);
    if (data.turns) {
      for (const [key, role, html] of data.turns) call.turns.set(key, {role, html, start: Number(key.slice(1))});
      drawTurns();
    }
    if (data.ending) {
      call.ended = true;
      settle();
      document.getElementById("call_files")?.click();  // the recording and the transcript, for this page
    }
  }

  // An ending the server cannot tell the page (the page itself closed the connection, or lost it).
  function endHere(reason, message) {
    if (!call || call.ended) return;
    call.ended = true;
    settle();
    const live = slot("live")?.querySelector(".live");
    if (live) {
      live.dataset.ending = reason;
      live.querySelectorAll(".who").forEach((who) => {
        who.classList.remove("speaking");
        who.querySelector(".meter i").style.width = "0%";
        who.querySelector(".state").textContent = "—";
      });
      live.querySelectorAll(".warn").forEach((note) => note.remove());
      const note = document.createElement("p");
      note.className = "warn";
      note.textContent = "⚠ " + message;
      live.appendChild(note);
    }
    setVerdict("ended");
    const connection = slot("details")?.querySelector("tr td + td");
    if (connection) connection.textContent = "closed; the call is ended";
  }

  document.addEventListener("click", (event) => {
    if (event.target.closest(CALL_BUTTON) && call && !call.ended) endHere("stopped", "You ended the call.");
  }, true);

  const createDataChannel = RTCPeerConnection.prototype.createDataChannel;
  RTCPeerConnection.prototype.createDataChannel = function (...args) {
    const channel = createDataChannel.apply(this, args);
    const pc = this;
    const mine = begin();
    channel.addEventListener("message", (event) => {
      let message;
      try { message = JSON.parse(event.data); } catch { return; }
      if (call === mine && message?.type === "personaplex" && message.data && !(mine.ended && !message.data.ending)) {
        show(message.data);
      }
    });
    pc.addEventListener("connectionstatechange", () => {
      if (call === mine && (pc.connectionState === "failed" || pc.connectionState === "disconnected")) {
        endHere("connection", "The connection was lost: check your network and start the call again.");
      }
    });
    return channel;
  };
}
