// The full-screen offer dialog: role="alertdialog", focus kept inside,
// live countdown to ack_by, Accept / Decline (with reasons), expiry, Dismiss.

import { ago, countdown, fillSeverity, str } from './format.js';

const $ = (id) => document.getElementById(id);
const FOCUSABLE = 'button, [href], input, textarea, select, [tabindex]:not([tabindex="-1"])';

export class OfferDialog {
  /** handlers: onAccept(offer), onDecline(offer, reason), onDismiss(offer); inert: elements to disable behind it */
  constructor(handlers, inert) {
    this.h = handlers;
    this.inert = inert;
    this.el = $('offer');
    this.offer = null;
    this.expired = false;
    this.returnFocus = null;

    $('offer-accept').addEventListener('click', () => {
      if (this.offer && !this.expired) this.h.onAccept(this.offer);
    });
    $('offer-decline').addEventListener('click', () => {
      if (!this.offer || this.expired) return;
      this.showReasons(true);
    });
    $('decline-back').addEventListener('click', () => this.showReasons(false));
    for (const b of this.el.querySelectorAll('[data-reason]')) {
      b.addEventListener('click', () => {
        if (this.offer && !this.expired) this.h.onDecline(this.offer, b.dataset.reason);
      });
    }
    $('offer-dismiss').addEventListener('click', () => {
      if (this.offer) this.h.onDismiss(this.offer);
    });

    // Keep keyboard focus inside while open.
    this.el.addEventListener('keydown', (e) => this.onKey(e));
    document.addEventListener('focusin', (e) => {
      if (this.isOpen() && !this.el.contains(e.target)) this.focusFirst();
    });
  }

  isOpen() {
    return !this.el.hidden;
  }

  show(offer) {
    const wasOpen = this.isOpen();
    if (!wasOpen) this.returnFocus = document.activeElement;
    this.offer = offer;
    this.expired = false;

    this.el.className = `offer offer-${(offer.severity || 'unknown').toLowerCase()}${offer.major ? ' offer-major' : ''}`;
    fillSeverity($('offer-sev'), offer.severity);
    $('offer-cat').textContent = offer.category || 'dispatch';
    $('offer-major').hidden = !offer.major;
    setText('offer-summary', offer.summary);
    setText('offer-instructions', offer.instructions, 'offer-instructions-row');
    setText('offer-incident', offer.incident_id, 'offer-incident-row');
    setText('offer-caller', offer.caller, 'offer-caller-row');
    setText('offer-queue', offer.queue, 'offer-queue-row');
    setText('offer-attempt', offer.attempt > 1 ? `offer ${offer.attempt}` : '', 'offer-attempt-row');

    $('offer-accept').disabled = false;
    $('offer-decline').disabled = false;
    $('offer-actions').hidden = false;
    $('decline-box').hidden = true;
    $('offer-expired').hidden = true;
    $('offer-dismiss').hidden = true;

    for (const el of this.inert) el.inert = true;
    this.el.hidden = false;
    document.body.classList.add('modal-open');
    this.tick(Date.now());
    $('offer-accept').focus();
  }

  /** Live texts: "opened … ago", "Answer within m:ss", the bar. */
  tick(now) {
    const o = this.offer;
    if (!o || !this.isOpen()) return;
    const opened = $('offer-opened');
    opened.hidden = !Number.isFinite(o.openedAt);
    if (!opened.hidden) opened.textContent = `opened ${ago(now - o.openedAt)}`;

    const bar = $('offer-bar');
    const fill = $('offer-bar-fill');
    if (!Number.isFinite(o.ackBy)) {
      $('offer-countdown').textContent = 'Answer as soon as possible';
      bar.hidden = true;
      return;
    }
    const left = Math.max(0, o.ackBy - now);
    const total = Math.max(o.ackBy - o.firstSeen, left, 1000);
    const pct = Math.round((left / total) * 100);
    $('offer-countdown').textContent = this.expired ? 'Time is up' : `Answer within ${countdown(left)}`;
    bar.hidden = false;
    bar.setAttribute('aria-valuenow', String(pct));
    bar.setAttribute('aria-valuetext', `${countdown(left)} left`);
    fill.style.width = `${pct}%`;
    bar.classList.toggle('urgent', left < 10000);
  }

  /** ack_by passed: no answer possible any more. */
  expire() {
    if (!this.offer) return;
    this.expired = true;
    $('offer-accept').disabled = true;
    $('offer-decline').disabled = true;
    $('offer-actions').hidden = false;
    $('decline-box').hidden = true;
    $('offer-expired').hidden = false;
    $('offer-dismiss').hidden = false;
    this.tick(Date.now());
    $('offer-dismiss').focus();
  }

  /** Closes; focus goes to `focusTarget`, or back where it was. */
  close(focusTarget) {
    if (!this.isOpen()) return;
    this.el.hidden = true;
    this.offer = null;
    this.expired = false;
    for (const el of this.inert) el.inert = false;
    document.body.classList.remove('modal-open');
    const back = focusTarget || this.returnFocus;
    this.returnFocus = null;
    if (back && back.isConnected && typeof back.focus === 'function' && back.getClientRects().length) back.focus();
    else document.getElementById('main')?.focus();
  }

  showReasons(on) {
    $('offer-actions').hidden = on;
    $('decline-box').hidden = !on;
    (on ? this.el.querySelector('[data-reason]') : $('offer-decline')).focus();
  }

  focusables() {
    return [...this.el.querySelectorAll(FOCUSABLE)].filter(
      (e) => !e.disabled && !e.closest('[hidden]') && e.getClientRects().length > 0,
    );
  }

  focusFirst() {
    const list = this.focusables();
    const preferred = this.expired ? $('offer-dismiss') : $('offer-accept');
    (list.includes(preferred) ? preferred : list[0] || this.el).focus();
  }

  onKey(e) {
    if (e.key === 'Escape' && !$('decline-box').hidden) {
      e.preventDefault();
      this.showReasons(false);
      return;
    }
    if (e.key !== 'Tab') return;
    const list = this.focusables();
    if (list.length === 0) {
      e.preventDefault();
      return;
    }
    const i = list.indexOf(document.activeElement);
    if (e.shiftKey && (i <= 0)) {
      e.preventDefault();
      list[list.length - 1].focus();
    } else if (!e.shiftKey && (i === -1 || i === list.length - 1)) {
      e.preventDefault();
      list[0].focus();
    }
  }
}

/** Sets text, hiding the element (or its row) when empty. */
function setText(id, value, rowId) {
  const text = str(value);
  $(id).textContent = text;
  (rowId ? $(rowId) : $(id)).hidden = text === '';
}
