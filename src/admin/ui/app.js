// retryq console. Plain script, no build step: everything it shows is read
// from the daemon's API (only what /v1/openapi.json describes) and
// re-read after every action, so the page never shows a state it has not
// read. The token lives in sessionStorage and travels only in the
// Authorization header (never in a URL); the live feed is read with
// fetch() streaming because EventSource cannot send that header.
'use strict';

(() => {
  const TOKEN_KEY = 'retryq.token';
  const PAYLOAD_CAP = 64 * 1024;
  const EVENTS_KEPT = 100;
  const $ = (id) => document.getElementById(id);

  let token = sessionStorage.getItem(TOKEN_KEY);
  let loginNeeded = false;
  let info = null;
  let offset = 0;
  let openId = null;
  let stream = null;
  let refreshTimer = null;
  let refreshing = false;
  let refreshAgain = false;
  let ticker = null;

  // ---- API ------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, kind, message) {
      super(message);
      this.status = status;
      this.kind = kind;
    }
  }

  function authHeaders() {
    return token ? { Authorization: 'Bearer ' + token } : {};
  }

  // One API call. A failure is recorded as "the last failed call" (kept
  // visible until the next one replaces it) unless `quiet`.
  async function api(method, path, body, quiet) {
    const headers = authHeaders();
    const init = { method, headers, cache: 'no-store', credentials: 'omit' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      const err = new ApiError(0, 'network', 'the daemon did not answer (' + e.message + ')');
      if (!quiet) recordFailure(method, path, err);
      throw err;
    }
    const text = await resp.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = text; }
    }
    if (!resp.ok) {
      const kind = (data && data.error) || resp.statusText || 'error';
      const message = (data && data.message) || (typeof data === 'string' ? data : '');
      const err = new ApiError(resp.status, kind, message);
      if (!quiet) recordFailure(method, path, err);
      if (resp.status === 401 && !quiet) needLogin('The daemon refused the token: ' + message);
      throw err;
    }
    return data;
  }

  function recordFailure(method, path, err) {
    $('last-error-text').textContent =
      `${clock(new Date())} ${method} ${path} → ${err.status || 'no answer'} ${err.kind}: ${err.message}`;
    $('last-error').hidden = false;
  }

  function outcome(text) {
    const box = $('outcome');
    box.textContent = `${clock(new Date())} ${text}`;
    box.hidden = false;
  }

  // ---- formatting -----------------------------------------------------

  function clock(date) {
    return date.toLocaleTimeString([], { hour12: false });
  }

  function when(iso) {
    if (!iso) return '–';
    const date = new Date(iso);
    const today = new Date().toDateString() === date.toDateString();
    return today ? clock(date) : date.toLocaleString([], { hour12: false });
  }

  function span(ms) {
    const s = Math.round(Math.abs(ms) / 1000);
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ${m % 60} min`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }

  function relative(iso) {
    if (!iso) return '–';
    const ms = new Date(iso).getTime() - Date.now();
    if (Math.abs(ms) < 1000) return `now (${when(iso)})`;
    return ms > 0 ? `in ${span(ms)} (${when(iso)})` : `${span(ms)} ago (${when(iso)})`;
  }

  function bytes(n) {
    if (n == null) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') node.className = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      if (child == null) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function setState(node, text, cls) {
    node.textContent = text;
    node.className = cls ? 'state-' + cls : '';
  }

  // ---- login ----------------------------------------------------------

  function needLogin(message) {
    stopStream();
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    loginNeeded = true;
    $('app').hidden = true;
    $('nav').hidden = true;
    $('logout').hidden = true;
    $('login').hidden = false;
    const error = $('login-error');
    error.textContent = message || '';
    error.hidden = !message;
    $('token').focus();
  }

  async function login(event) {
    event.preventDefault();
    const candidate = $('token').value.trim();
    if (!candidate) return;
    const previous = token;
    token = candidate;
    try {
      await api('GET', '/v1/stats', undefined, true);
    } catch (err) {
      token = previous;
      const error = $('login-error');
      error.textContent = err.status === 401
        ? `The daemon refused this token (${err.message}).`
        : `Cannot log in: ${err.status || ''} ${err.message}`;
      error.hidden = false;
      $('token').select();
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, candidate);
    $('token').value = '';
    showApp();
  }

  function logout() {
    needLogin('Logged out.');
  }

  // ---- overview -------------------------------------------------------

  async function loadStats() {
    const s = await api('GET', '/v1/stats');
    $('count-pending').textContent = s.pending_items;
    $('count-processing').textContent = s.processing_items;
    $('count-failed').textContent = s.failed_items;
    $('count-total').textContent = s.total_items;
    const max = info && info.max_bytes;
    $('bytes-text').textContent = max
      ? `${bytes(s.total_bytes)} of ${bytes(max)} (${((100 * s.total_bytes) / max).toFixed(1)}%)`
      : `${bytes(s.total_bytes)} (no limit)`;
    const meter = $('bytes-meter');
    meter.max = max || Math.max(1, s.total_bytes);
    meter.value = s.total_bytes;
    $('oldest').textContent = s.oldest_item
      ? `${span(Date.now() - new Date(s.oldest_item).getTime())} old (${when(s.oldest_item)})`
      : 'the queue is empty';
    const w = s.worker;
    if (!w) {
      setState($('pause-state'), 'the worker is not running', 'paused');
      setState($('circuit-state'), 'unknown', '');
      $('store-state').textContent = '–';
    } else {
      if (w.paused) {
        const since = w.paused_since ? ` at ${when(w.paused_since)}` : '';
        setState($('pause-state'), `paused: ${w.pause_reason || 'no reason given'}${since}`, 'paused');
      } else if (w.circuit_state === 'open') {
        setState($('pause-state'), 'waiting: the circuit is open (the upstream looks down)', 'open');
      } else {
        setState($('pause-state'), 'delivering', 'running');
      }
      const circuit = w.circuit_state || 'unknown';
      setState($('circuit-state'), circuit.replace('_', '-'), circuit);
      $('store-state').textContent = w.store_error
        ? `refusing writes since ${when(w.store_failing_since)}: ${w.store_error}`
        : 'accepting writes';
    }
    $('overview-read').textContent = `read at ${clock(new Date())}`;
  }

  async function loadNextDue() {
    const page = await api('GET', '/v1/items?status=pending&order_by=next_retry&limit=1');
    const first = page.items[0];
    $('next-due').textContent = first ? `${relative(first.next_retry)}` : 'nothing pending';
  }

  async function loadInfo() {
    info = await api('GET', '/v1/info');
    const body = $('plugins').tBodies[0];
    body.replaceChildren();
    for (const p of info.plugins) {
      body.append(el('tr', {},
        el('td', {}, p.role), el('td', {}, p.name), el('td', {}, p.version),
        el('td', { class: 'mono' }, p.path), el('td', { class: 'mono' }, p.sha256 || 'unreadable')));
    }
    if (!info.plugins.length) {
      body.append(el('tr', {}, el('td', { colspan: '5' }, 'no plugin loaded (an in-process transport)')));
    }
  }

  async function loadHistory() {
    const h = await api('GET', '/v1/stats/history');
    drawChart(h.buckets);
    const last = h.buckets[h.buckets.length - 1] || { delivered: 0, failed: 0 };
    $('chart-summary').textContent =
      `Last hour: ${h.delivered} delivered, ${h.failed} failed attempts ` +
      `(${h.dead_lettered} dead-lettered), ${h.enqueued} enqueued. ` +
      `This minute: ${last.delivered} delivered, ${last.failed} failed.`;
  }

  function drawChart(buckets) {
    const NS = 'http://www.w3.org/2000/svg';
    const W = 1200;
    const H = 200;
    const left = 48;
    const bottom = 26;
    const top = 8;
    const plotH = H - bottom - top;
    const slot = (W - left) / Math.max(1, buckets.length);
    const max = Math.max(1, ...buckets.map((b) => Math.max(b.delivered, b.failed)));
    const svg = document.createElementNS(NS, 'svg');
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    svg.setAttribute('aria-hidden', 'true');
    const add = (tag, attrs, text) => {
      const node = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      if (text != null) node.textContent = text;
      svg.append(node);
    };
    add('line', { x1: left, y1: top + plotH, x2: W, y2: top + plotH, stroke: '#57606a' });
    add('line', { x1: left, y1: top, x2: left, y2: top + plotH, stroke: '#57606a' });
    add('text', { x: left - 4, y: top + 10, 'text-anchor': 'end', 'font-size': 16, fill: '#1b1f24' }, max);
    add('text', { x: left - 4, y: top + plotH, 'text-anchor': 'end', 'font-size': 16, fill: '#1b1f24' }, 0);
    add('text', { x: left, y: H - 6, 'font-size': 16, fill: '#1b1f24' }, '−60 min');
    add('text', { x: W, y: H - 6, 'text-anchor': 'end', 'font-size': 16, fill: '#1b1f24' }, 'now');
    buckets.forEach((b, i) => {
      const x = left + i * slot;
      const bar = (value, dx, color) => {
        if (!value) return;
        const h = Math.max(1, (value / max) * plotH);
        add('rect', { x: x + dx, y: top + plotH - h, width: Math.max(1, slot / 2 - 1), height: h, fill: color });
      };
      bar(b.delivered, 0.5, '#1a7f37');
      bar(b.failed, slot / 2, '#b3261e');
    });
    const legend = el('div', { class: 'legend' },
      el('span', {}, el('span', { class: 'swatch delivered' }), 'delivered'),
      el('span', {}, el('span', { class: 'swatch failed' }), 'failed attempts'));
    $('chart').replaceChildren(svg, legend);
  }

  // ---- items ----------------------------------------------------------

  function itemQuery() {
    const q = new URLSearchParams();
    const status = $('f-status').value;
    const type = $('f-type').value.trim();
    if (status) q.set('status', status);
    if (type) q.set('type', type);
    if ($('f-ready').checked) q.set('ready', 'true');
    q.set('order_by', $('f-order').value);
    if ($('f-desc').checked) q.set('desc', 'true');
    q.set('limit', $('f-limit').value);
    q.set('offset', String(offset));
    return q;
  }

  async function loadItems() {
    const q = itemQuery();
    const page = await api('GET', '/v1/items?' + q.toString());
    const body = $('item-table').tBodies[0];
    body.replaceChildren();
    for (const item of page.items) {
      const actions = el('div', { class: 'actions' });
      if (item.status === 'failed') {
        actions.append(el('button', { type: 'button', onclick: () => retryOne(item.id), 'aria-label': `Retry item ${item.id}` }, 'Retry'));
      }
      actions.append(el('button', { type: 'button', class: 'danger', onclick: () => deleteOne(item.id), 'aria-label': `Delete item ${item.id}` }, 'Delete'));
      const error = item.last_error || '';
      body.append(el('tr', { 'data-id': item.id, 'data-status': item.status },
        el('td', { class: 'mono' }, el('button', { type: 'button', class: 'link', onclick: () => openItem(item.id), 'aria-label': `Show item ${item.id}` }, item.id)),
        el('td', {}, item.type),
        el('td', {}, item.status),
        el('td', {}, `${item.attempts} / ${item.max_attempts}`),
        el('td', {}, item.status === 'failed' ? '–' : relative(item.next_retry)),
        el('td', {}, when(item.created_at)),
        el('td', { class: 'err', title: error }, error.length > 200 ? error.slice(0, 200) + '…' : error),
        el('td', {}, actions)));
    }
    if (!page.items.length) {
      body.append(el('tr', {}, el('td', { colspan: '8' }, offset ? 'no more items' : 'no item matches')));
    }
    const limit = Number(page.limit);
    const filters = [...q.entries()].filter(([k]) => !['limit', 'offset'].includes(k)).map(([k, v]) => `${k}=${v}`).join(', ');
    $('items-caption').textContent = `${page.count} items shown (${filters})`;
    $('page-info').textContent = page.count ? `items ${offset + 1}–${offset + page.count}` : '';
    $('prev').disabled = offset === 0;
    $('next').disabled = page.count < limit;
  }

  async function openItem(id) {
    let item;
    try {
      item = await api('GET', `/v1/items/${encodeURIComponent(id)}?payload=true`);
    } catch (err) {
      if (err.status === 404) {
        closeItem();
        outcome(`Item ${id} no longer exists (delivered, expired or deleted).`);
      }
      return;
    }
    openId = id;
    const meta = $('item-meta');
    meta.replaceChildren();
    const row = (k, v) => meta.append(el('div', {}, el('dt', {}, k), el('dd', {}, v == null || v === '' ? '–' : v)));
    row('ID', item.id);
    row('Type', item.type);
    row('Status', item.status);
    row('Attempts', `${item.attempts} of ${item.max_attempts}`);
    row('Last error', item.last_error);
    row('Last attempt', when(item.last_attempt));
    row('Next retry', item.status === 'failed' ? 'never (a dead letter)' : relative(item.next_retry));
    row('Created', when(item.created_at));
    row('Updated', when(item.updated_at));
    row('Fingerprint', item.fingerprint);
    row('Agent', item.agent_id);
    row('Scanner', item.scanner_name);
    row('Target', item.target_path);
    if (item.lease_until) row('Leased until', when(item.lease_until));
    if (item.attributes) row('Attributes', Object.entries(item.attributes).map(([k, v]) => `${k}=${v}`).join(', '));
    row('Size', bytes(item.size_bytes));
    let text = JSON.stringify(item.report, null, 2);
    if (text === undefined) text = String(item.report);
    if (text.length > PAYLOAD_CAP) {
      text = text.slice(0, PAYLOAD_CAP) + `\n… cut here: ${PAYLOAD_CAP} of ${text.length} characters shown`;
    }
    $('item-payload').textContent = text;
    $('item-title').textContent = `Item ${item.id}`;
    $('item-retry').hidden = item.status !== 'failed';
    const view = $('item-view');
    view.hidden = false;
    view.focus();
  }

  function closeItem() {
    openId = null;
    $('item-view').hidden = true;
  }

  // ---- actions --------------------------------------------------------

  function confirmDialog(text) {
    const dialog = $('confirm');
    $('confirm-text').textContent = text;
    dialog.returnValue = 'cancel';
    dialog.showModal();
    return new Promise((resolve) => {
      dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
    });
  }

  // Runs an action from `button`: disabled while it runs, its outcome
  // shown, then everything re-read.
  async function act(button, run) {
    if (button) button.disabled = true;
    try {
      const text = await run();
      if (text) outcome(text);
    } catch (_) {
      // Already recorded as the last failed call.
    } finally {
      if (button) button.disabled = false;
      await refreshAll();
    }
  }

  function retryOne(id) {
    return act(null, async () => {
      await api('POST', `/v1/items/${encodeURIComponent(id)}/retry`);
      if (openId === id) await openItem(id);
      return `Item ${id} is pending again, due now.`;
    });
  }

  async function deleteOne(id) {
    if (!(await confirmDialog(`Delete item ${id}? It will never be delivered.`))) return;
    await act(null, async () => {
      await api('DELETE', `/v1/items/${encodeURIComponent(id)}`);
      if (openId === id) closeItem();
      return `Item ${id} deleted.`;
    });
  }

  function retryAll() {
    return act($('retry-all'), async () => {
      const r = await api('POST', '/v1/items/retry-failed');
      return `${r.revived} dead letter${r.revived === 1 ? '' : 's'} revived, due now.`;
    });
  }

  async function purge() {
    let count = '';
    try {
      count = (await api('GET', '/v1/stats')).failed_items + ' ';
    } catch (_) { /* the dialog still asks */ }
    if (!(await confirmDialog(`Purge ${count}dead letters for good? They will never be delivered.`))) {
      outcome('Purge cancelled.');
      return;
    }
    await act($('purge'), async () => {
      const r = await api('DELETE', '/v1/items?status=failed');
      return `${r.purged} dead letter${r.purged === 1 ? '' : 's'} purged.`;
    });
  }

  function processNow() {
    return act($('process-now'), async () => {
      const r = await api('POST', '/v1/process-now');
      const kinds = Object.entries(r.by_kind || {}).map(([k, n]) => `${n} ${k}`).join(', ');
      return `Delivery round: ${r.processed} item${r.processed === 1 ? '' : 's'} processed${kinds ? ' (' + kinds + ')' : ''}.`;
    });
  }

  function pause() {
    return act($('pause'), async () => {
      const reason = $('pause-reason').value.trim();
      const r = await api('POST', '/v1/pause', reason ? { reason } : undefined);
      return `Delivery paused: ${r.pause_reason || reason || 'by an operator'}.`;
    });
  }

  function resume() {
    return act($('resume'), async () => {
      const r = await api('POST', '/v1/resume');
      return r.paused ? 'Resume asked, but delivery is still paused.' : 'Delivery resumed.';
    });
  }

  // ---- refresh and live feed ------------------------------------------

  async function refreshAll() {
    // One refresh at a time; a request during one runs once more after it.
    if (refreshing) { refreshAgain = true; return; }
    refreshing = true;
    try {
      if (!info) await loadInfo().catch(() => {});
      await Promise.allSettled([loadStats(), loadItems(), loadHistory(), loadNextDue()]);
    } finally {
      refreshing = false;
    }
    if (refreshAgain) {
      refreshAgain = false;
      await refreshAll();
    }
  }

  function scheduleRefresh() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(() => { refreshTimer = null; refreshAll(); }, 250);
  }

  function setLive(on, text) {
    const live = $('live');
    live.textContent = text || (on ? 'live' : 'not connected');
    live.className = 'live ' + (on ? 'on' : 'off');
  }

  function describe(kind, d) {
    const id = d.item_id ? ` ${d.item_id}` : '';
    switch (kind) {
      case 'state': return `connected: ${d.paused ? 'paused (' + (d.pause_reason || '') + ')' : 'delivering'}, circuit ${d.circuit_state}`;
      case 'delivery_paused': return `delivery paused: ${d.pause_reason || ''}`;
      case 'delivery_resumed': return 'delivery resumed';
      case 'circuit_opened': return 'circuit opened: the upstream looks down';
      case 'circuit_half_open': return 'circuit half-open: probing the upstream';
      case 'circuit_closed': return 'circuit closed';
      case 'lagged': return `missed ${d.missed} events; the page was re-read`;
      case 'enqueued': return `enqueued${id} (${d.item_type})`;
      default: {
        const extra = [];
        if (d.attempts != null) extra.push(`attempt ${d.attempts}`);
        if (d.latency_ms != null) extra.push(`${d.latency_ms} ms`);
        if (d.error) extra.push(d.error);
        return `${kind.replace('_', ' ')}${id}${extra.length ? ' (' + extra.join(', ') + ')' : ''}`;
      }
    }
  }

  function onEvent(kind, data) {
    const list = $('events');
    const at = data.at ? clock(new Date(data.at)) : clock(new Date());
    list.prepend(el('li', { 'data-kind': kind }, `${at} `, el('span', { class: 'kind' }, describe(kind, data))));
    while (list.children.length > EVENTS_KEPT) list.lastElementChild.remove();
    if (kind !== 'state') scheduleRefresh();
  }

  function handleBlock(block) {
    let kind = 'message';
    let data = '';
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) continue;
      if (line.startsWith('event: ')) kind = line.slice(7);
      else if (line.startsWith('data: ')) data += line.slice(6);
    }
    if (!data) return;
    try { onEvent(kind, JSON.parse(data)); } catch (_) { /* not ours */ }
  }

  function stopStream() {
    if (stream) stream.abort();
    stream = null;
  }

  async function startStream() {
    stopStream();
    const ctrl = new AbortController();
    stream = ctrl;
    try {
      const resp = await fetch('/v1/events', { headers: authHeaders(), signal: ctrl.signal, cache: 'no-store', credentials: 'omit' });
      if (resp.status === 401) {
        recordFailure('GET', '/v1/events', new ApiError(401, 'unauthorized', 'the token was refused'));
        needLogin('The daemon refused the token.');
        return;
      }
      if (!resp.ok) throw new ApiError(resp.status, 'error', 'the event stream was refused');
      setLive(true);
      scheduleRefresh();
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          handleBlock(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
      }
    } catch (err) {
      if (ctrl.signal.aborted) return;
      if (err instanceof ApiError) recordFailure('GET', '/v1/events', err);
    }
    if (stream !== ctrl) return;
    setLive(false, 'reconnecting…');
    setTimeout(() => { if (stream === ctrl) startStream(); }, 2000);
  }

  // ---- start ----------------------------------------------------------

  function showApp() {
    $('login').hidden = true;
    $('login-error').hidden = true;
    $('app').hidden = false;
    $('nav').hidden = false;
    $('logout').hidden = !loginNeeded;
    refreshAll();
    startStream();
    if (!ticker) ticker = setInterval(() => { if (!$('app').hidden) refreshAll(); }, 5000);
  }

  async function boot() {
    $('login-form').addEventListener('submit', login);
    $('logout').addEventListener('click', logout);
    $('pause').addEventListener('click', pause);
    $('resume').addEventListener('click', resume);
    $('process-now').addEventListener('click', processNow);
    $('retry-all').addEventListener('click', retryAll);
    $('purge').addEventListener('click', purge);
    $('item-close').addEventListener('click', closeItem);
    $('item-retry').addEventListener('click', () => openId && retryOne(openId));
    $('item-delete').addEventListener('click', () => openId && deleteOne(openId));
    $('filters').addEventListener('submit', (e) => { e.preventDefault(); offset = 0; act(null, async () => null); });
    $('prev').addEventListener('click', () => { offset = Math.max(0, offset - Number($('f-limit').value)); refreshAll(); });
    $('next').addEventListener('click', () => { offset += Number($('f-limit').value); refreshAll(); });
    document.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && !$('item-view').hidden && !$('confirm').open) closeItem();
    });
    // Does this daemon want a token? Ask without one (or with the one this
    // tab kept) and see.
    try {
      await api('GET', '/v1/stats', undefined, true);
      loginNeeded = Boolean(token);
      showApp();
    } catch (err) {
      if (err.status === 401) {
        needLogin(token ? 'The saved token was refused; log in again.' : '');
      } else {
        recordFailure('GET', '/v1/stats', err);
        showApp();
      }
    }
  }

  document.addEventListener('DOMContentLoaded', boot);
})();
