// The websocket to dispatchd: hello/welcome, close codes, reconnect with backoff.

const BACKOFF_S = [1, 2, 5, 10]; // after the immediate retry; 10 s from then on
const WELCOME_WITHIN_MS = 10000;

export class Connection {
  /**
   * handlers: onState(state: 'connecting'|'connected'|'closed'), onMessage(),
   * onWelcome(frame), onFrame(frame), onStop(reason: 'refused'|'removed'|'replaced')
   */
  constructor(url, handlers) {
    this.url = url;
    this.h = handlers;
    this.ws = null;
    this.token = '';
    this.ready = false; // welcome received on the current socket
    this.stopped = true;
    this.attempt = 0;
    this.timer = 0;
    this.welcomeTimer = 0;
  }

  start(token) {
    this.token = token;
    this.stopped = false;
    this.attempt = 0;
    this.clearTimers();
    this.drop();
    this.open();
  }

  stop() {
    this.stopped = true;
    this.clearTimers();
    this.drop();
    this.h.onState('closed');
  }

  /** Try now (e.g. the browser says it is online again). */
  kick() {
    if (this.stopped || this.ready) return;
    if (this.ws && this.ws.readyState === WebSocket.CONNECTING) return;
    this.clearTimers();
    this.attempt = 0;
    this.drop();
    this.open();
  }

  /** Sends a frame on a welcomed socket; false when it could not. */
  send(frame) {
    if (!this.ready || !this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    try {
      this.ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  open() {
    this.h.onState('connecting');
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch {
      this.retry();
      return;
    }
    this.ws = ws;
    ws.onopen = () => {
      if (ws !== this.ws) return;
      // Browsers cannot set headers: the token goes in the first frame.
      try { ws.send(JSON.stringify({ type: 'hello', token: this.token })); } catch { /* close follows */ }
      this.welcomeTimer = setTimeout(() => {
        if (ws === this.ws && !this.ready) try { ws.close(4000, 'no welcome'); } catch { /* ignore */ }
      }, WELCOME_WITHIN_MS);
    };
    ws.onmessage = (ev) => {
      if (ws !== this.ws) return;
      this.h.onMessage();
      let frame;
      try { frame = JSON.parse(ev.data); } catch { return; } // binary or not JSON: ignore
      if (frame === null || typeof frame !== 'object' || Array.isArray(frame)) return;
      if (frame.type === 'welcome') {
        clearTimeout(this.welcomeTimer);
        this.ready = true;
        this.attempt = 0; // backoff starts afresh after a welcome
        this.h.onState('connected');
        this.h.onWelcome(frame);
        return;
      }
      this.h.onFrame(frame);
    };
    ws.onerror = () => { /* a close event follows */ };
    ws.onclose = (ev) => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.ready = false;
      clearTimeout(this.welcomeTimer);
      if (ev.code === 4401) return this.end('refused');
      if (ev.code === 4403) return this.end('removed');
      if (ev.code === 4409) return this.end('replaced'); // reconnecting would kick the other one
      this.retry(); // 1001 (server restarting) and everything else
    };
  }

  end(reason) {
    this.stopped = true;
    this.clearTimers();
    this.h.onState('closed');
    this.h.onStop(reason);
  }

  retry() {
    if (this.stopped) return;
    const n = this.attempt++;
    const base = n === 0 ? 0 : BACKOFF_S[Math.min(n - 1, BACKOFF_S.length - 1)] * 1000;
    const delay = base * (0.8 + Math.random() * 0.4); // ±20 %
    this.h.onState('connecting');
    this.timer = setTimeout(() => {
      this.timer = 0;
      if (!this.stopped) this.open();
    }, delay);
  }

  drop() {
    const ws = this.ws;
    this.ws = null;
    this.ready = false;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(1000); } catch { /* ignore */ }
    }
  }

  clearTimers() {
    clearTimeout(this.timer);
    clearTimeout(this.welcomeTimer);
    this.timer = 0;
  }
}
