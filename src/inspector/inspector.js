// evo-realtime live event inspector. Served from the sidecar with a strict CSP: no inline
// script or style, so everything is built with DOM calls and CSS classes, never from HTML text.
// It is an ordinary socket.io client of the sidecar: key in `auth.apikey`, opted in to
// recovery with `auth.offset`, test messages through the `message/sendText` emit.
(function () {
  'use strict';

  var MAX_ROWS = 1000;          // events kept in the list (oldest dropped first)
  var MAX_PENDING = 5000;       // events held while paused
  var SEARCH_CHARS = 100000;    // JSON characters searched per event
  var PRETTY_CHARS = 2000000;   // JSON characters shown when expanded
  var HIGHLIGHT_CHARS = 200000; // larger JSON is shown without colours
  var WINDOW = 60;              // seconds in the rate chart
  var ACK_TIMEOUT_MS = 40000;   // a little above the sidecar's default upstream timeout
  var STORE_KEY = 'evo-realtime.inspector.apikey';
  var STORE_INSTANCE = 'evo-realtime.inspector.instance';

  // The sidecar may sit under a path prefix: derive its root from this page's path.
  var ROOT = location.pathname.replace(/\/_sidecar\/inspector\/?$/, '');

  function $(id) { return document.getElementById(id); }
  var el = {
    status: $('status'), statusText: $('status-text'),
    keyForm: $('key-form'), apikey: $('apikey'), list: $('list'), forget: $('forget'),
    instanceForm: $('instance-form'), instance: $('instance'),
    connect: $('connect'), disconnect: $('disconnect'), connectError: $('connect-error'),
    search: $('search'), filter: $('filter'), pause: $('pause'), clear: $('clear'),
    pausedNote: $('paused-note'), events: $('events'), empty: $('empty'), shown: $('shown'),
    rate: $('rate'), rateNow: $('rate-now'), counts: $('counts'), total: $('total'),
    sendForm: $('send-form'), number: $('number'), text: $('text'), send: $('send'),
    ack: $('ack'), ackStatus: $('ack-status'), ackBody: $('ack-body'),
    activity: $('activity'), activityList: $('activity-list'), activityNote: $('activity-note')
  };
  var ACTIVITY_EVERY_MS = 5000;  // how often the Instances panel asks /_sidecar/instances

  var state = {
    socket: null,
    manager: null,
    instance: '',
    lastOffset: '',      // the last offset seen: sent back on reconnect to recover
    everConnected: false,
    replaying: 0,        // events still to come from the last recovery
    paused: false,
    pending: [],
    rows: [],            // {li, record}, newest first (same order as the list)
    counts: new Map(),
    total: 0,
    buckets: new Array(WINDOW).fill(0),
    bucketSecond: Math.floor(Date.now() / 1000),
    queue: [],           // received, not yet drawn
    frame: 0,
    query: '',
    only: ''
  };

  // ---- storage (sessionStorage only; a private window may refuse it) ----

  function stored(name) {
    try { return sessionStorage.getItem(name) || ''; } catch (e) { return ''; }
  }
  function store(name, value) {
    try {
      if (value) sessionStorage.setItem(name, value); else sessionStorage.removeItem(name);
    } catch (e) { /* storage unavailable: the key lives in this page only */ }
  }

  // ---- connection state ----

  function setStatus(kind, text) {
    el.status.dataset.state = kind;
    el.statusText.textContent = text;
    el.send.disabled = !(state.socket && state.socket.connected);
  }

  function showError(text) {
    el.connectError.textContent = text;
    el.connectError.hidden = !text;
  }

  // ---- instances through the sidecar's proxied REST API ----

  function instanceName(item) {
    if (!item || typeof item !== 'object') return '';
    if (typeof item.name === 'string') return item.name;
    if (item.instance && typeof item.instance.instanceName === 'string') return item.instance.instanceName;
    if (typeof item.instanceName === 'string') return item.instanceName;
    return '';
  }
  function instanceStatus(item) {
    var s = item.connectionStatus || (item.instance && item.instance.status) || item.status;
    return typeof s === 'string' ? s : '';
  }

  function describeHttp(status) {
    if (status === 401 || status === 403) {
      return 'This API key was not accepted (HTTP ' + status + '). Use Evolution API\'s global ' +
        'key (AUTHENTICATION_API_KEY) or an instance token.';
    }
    if (status === 502) return 'Evolution API is unreachable from the sidecar (HTTP 502).';
    if (status === 504) return 'Evolution API did not answer in time (HTTP 504).';
    return 'Listing instances failed: HTTP ' + status + '.';
  }

  function listInstances(key, preferred) {
    showError('');
    el.list.disabled = true;
    el.list.textContent = 'Listing…';
    return fetch(ROOT + '/instance/fetchInstances', {
      headers: { apikey: key, accept: 'application/json' },
      cache: 'no-store',
      credentials: 'omit'
    }).then(function (response) {
      if (!response.ok) throw new Error(describeHttp(response.status));
      return response.json().catch(function () {
        throw new Error('Unexpected answer from GET /instance/fetchInstances (not JSON).');
      });
    }, function () {
      throw new Error('Could not reach the sidecar to list instances.');
    }).then(function (body) {
      var items = Array.isArray(body) ? body : (body && Array.isArray(body.response) ? body.response : null);
      if (!items) throw new Error('Unexpected answer from GET /instance/fetchInstances.');
      var names = [];
      el.instance.replaceChildren();
      items.forEach(function (item) {
        var name = instanceName(item);
        if (!name || names.indexOf(name) >= 0) return;
        names.push(name);
        var status = instanceStatus(item);
        el.instance.append(new Option(status ? name + ' · ' + status : name, name));
      });
      if (!names.length) throw new Error('This key sees no instance.');
      store(STORE_KEY, key);
      el.forget.hidden = false;
      el.instanceForm.hidden = false;
      refreshActivity(key);
      if (preferred && names.indexOf(preferred) >= 0) el.instance.value = preferred;
      setStatus('idle', names.length + (names.length === 1 ? ' instance' : ' instances') + ' found: pick one');
      return names;
    }).catch(function (err) {
      el.instanceForm.hidden = true;
      el.instance.replaceChildren();
      showError(err.message);
      setStatus('error', 'Not connected');
      throw err;
    }).finally(function () {
      el.list.disabled = false;
      el.list.textContent = 'List instances';
    });
  }

  // ---- instances' activity (global key only) ----

  var activityTimer = 0;
  function ago(secs) {
    if (secs < 60) return secs + ' s';
    if (secs < 3600) return Math.floor(secs / 60) + ' min';
    return Math.floor(secs / 3600) + ' h';
  }
  function renderActivity(body) {
    var rows = body && Array.isArray(body.instances) ? body.instances : [];
    var items = rows.map(function (row) {
      var li = document.createElement('li');
      li.className = row.silent ? 'silent' : '';
      var name = document.createElement('span');
      name.className = 'name';
      name.textContent = String(row.instance);
      var last = document.createElement('span');
      last.className = 'last';
      last.textContent = 'last event ' + ago(Number(row.last_event_secs_ago) || 0) + ' ago';
      var detail = document.createElement('span');
      detail.className = 'muted';
      var parts = [];
      if (row.state) parts.push(String(row.state));
      parts.push((Number(row.events_per_minute) || 0) + '/min');
      var clients = Number(row.clients) || 0;
      parts.push(clients + (clients === 1 ? ' client' : ' clients'));
      detail.textContent = parts.join(' · ');
      li.append(name, last, detail);
      if (row.silent) {
        var tag = document.createElement('span');
        tag.className = 'silent-tag';
        tag.textContent = 'silent';
        li.append(tag);
      }
      return li;
    });
    if (!items.length) {
      var none = document.createElement('li');
      none.className = 'muted';
      none.textContent = 'No event received yet.';
      items.push(none);
    }
    el.activityList.replaceChildren.apply(el.activityList, items);
    var after = body && body.silence_alert_secs;
    el.activityNote.textContent = after ? 'silence alert after ' + ago(after) : 'every 5 s';
  }
  function refreshActivity(key) {
    clearTimeout(activityTimer);
    if (!key) { el.activity.hidden = true; return; }
    fetch(ROOT + '/_sidecar/instances', {
      headers: { apikey: key, accept: 'application/json' },
      cache: 'no-store',
      credentials: 'omit'
    }).then(function (response) {
      // Instance tokens do not see other instances: the panel is for the global key.
      if (!response.ok) throw new Error('HTTP ' + response.status);
      return response.json();
    }).then(function (body) {
      el.activity.hidden = false;
      renderActivity(body);
      activityTimer = setTimeout(function () { refreshActivity(key); }, ACTIVITY_EVERY_MS);
    }, function () {
      el.activity.hidden = true;
    });
  }

  // ---- socket.io ----

  function disconnect() {
    var socket = state.socket;
    // Cleared first: the handlers below ignore a socket that is no longer the current one.
    state.socket = null;
    if (socket) socket.disconnect();
    el.keyForm.hidden = false;
    el.disconnect.hidden = true;
    el.connect.hidden = false;
    el.instance.disabled = false;
  }

  function connect(key, instance) {
    disconnect();
    showError('');
    // The same instance again (after a server disconnect, say) resumes from the last
    // offset seen; another instance starts afresh.
    if (state.instance !== instance) {
      clearEvents(true);
      state.lastOffset = '';
    }
    state.instance = instance;
    state.everConnected = false;
    state.replaying = 0;
    store(STORE_INSTANCE, instance);

    var manager = new io.Manager(location.origin, {
      path: ROOT + '/socket.io',
      reconnectionDelayMax: 5000
    });
    // The namespace is the instance name exactly (a URL would encode it).
    var socket = manager.socket('/' + instance, {
      // Called on every (re)connect: the last offset seen asks for what was missed.
      auth: function (cb) { cb({ apikey: key, offset: state.lastOffset }); }
    });
    state.socket = socket;
    // The key is in use: its form folds away until Disconnect (more room for events).
    el.keyForm.hidden = true;
    el.connect.hidden = true;
    el.disconnect.hidden = false;
    el.instance.disabled = true;
    setStatus('connecting', 'Connecting to ' + instance + '…');

    socket.on('connect', function () {
      if (state.socket !== socket) return;
      var again = state.everConnected;
      state.everConnected = true;
      showError('');
      // After a reconnect with an offset, `sidecar.recovery` follows and refines this.
      setStatus('connected', (again ? 'Reconnected to ' : 'Connected to ') + instance);
    });
    socket.on('disconnect', function (reason) {
      if (state.socket !== socket) return;
      if (reason === 'io client disconnect') return;
      if (socket.active) {
        setStatus('reconnecting', 'Connection lost: reconnecting…');
      } else {
        setStatus('error', 'Disconnected by the server');
        showError('The sidecar closed this connection (the key may have been revoked). Connect again to resume.');
        el.keyForm.hidden = false;
        el.connect.hidden = false;
        el.disconnect.hidden = true;
        el.instance.disabled = false;
      }
    });
    socket.on('connect_error', function (err) {
      if (state.socket !== socket) return;
      if (socket.active) {
        setStatus('reconnecting', 'Cannot reach the sidecar: retrying…');
        return;
      }
      // Refused by the sidecar: a bad key, or a namespace this key may not join.
      var message = err && err.message ? err.message : String(err);
      setStatus('error', 'Not connected');
      showError('The sidecar refused the connection: ' + message + '.');
      disconnect();
    });
    manager.on('reconnect_attempt', function (attempt) {
      if (state.socket !== socket) return;
      setStatus('reconnecting', 'Reconnecting… (attempt ' + attempt + ')');
    });
    socket.on('sidecar.recovery', function (info) {
      if (state.socket !== socket) return;
      var n = info && typeof info.replayed === 'number' ? info.replayed : 0;
      state.replaying = n;
      var events = n === 1 ? ' missed event replayed' : ' missed events replayed';
      if (info && info.recovered) {
        setStatus('recovered', 'Recovered: ' + n + events);
      } else {
        // The sidecar restarted, or the offset fell out of retention.
        setStatus('gap', 'Reconnected with a gap: events may be missing (' + n + ' replayed)');
      }
    });
    socket.onAny(function (event) {
      if (state.socket !== socket) return;
      if (event === 'sidecar.recovery') return;
      var payload = arguments[1];
      var offset = arguments.length > 2 ? arguments[arguments.length - 1] : undefined;
      if (typeof offset === 'string' && offset) state.lastOffset = offset;
      var replayed = false;
      if (state.replaying > 0) { state.replaying -= 1; replayed = true; }
      receive(event, payload, replayed, offset);
    });
  }

  // ---- summaries ----

  function jid(value) {
    if (typeof value !== 'string' || !value) return '';
    var at = value.indexOf('@');
    var user = at < 0 ? value : value.slice(0, at);
    var server = at < 0 ? '' : value.slice(at + 1);
    if (server === 'g.us') return 'group ' + user;
    if (server === 'broadcast') return user === 'status' ? 'status' : 'broadcast ' + user;
    if (server === 'lid') return user + ' (lid)';
    return /^\d+$/.test(user) ? '+' + user : user;
  }

  function clip(text, n) {
    text = String(text).replace(/\s+/g, ' ').trim();
    return text.length > n ? text.slice(0, n - 1) + '…' : text;
  }

  function messageText(message, type) {
    if (!message || typeof message !== 'object') return type ? '[' + type + ']' : '';
    var m = message;
    var text = m.conversation ||
      (m.extendedTextMessage && m.extendedTextMessage.text) ||
      (m.imageMessage && (m.imageMessage.caption || '[image]')) ||
      (m.videoMessage && (m.videoMessage.caption || '[video]')) ||
      (m.documentMessage && ('[document] ' + (m.documentMessage.fileName || ''))) ||
      (m.audioMessage && '[audio]') ||
      (m.stickerMessage && '[sticker]') ||
      (m.locationMessage && '[location]') ||
      (m.contactMessage && ('[contact] ' + (m.contactMessage.displayName || ''))) ||
      (m.reactionMessage && ('reacted ' + (m.reactionMessage.text || '(removed)'))) ||
      (m.pollCreationMessage && ('[poll] ' + (m.pollCreationMessage.name || ''))) ||
      (m.buttonsResponseMessage && m.buttonsResponseMessage.selectedDisplayText) ||
      (m.listResponseMessage && m.listResponseMessage.title) ||
      (m.templateButtonReplyMessage && m.templateButtonReplyMessage.selectedDisplayText);
    if (typeof text === 'string' && text.trim()) return text;
    return type ? '[' + type + ']' : '';
  }

  function first(data) {
    return Array.isArray(data) ? data[0] : data;
  }
  function more(data) {
    return Array.isArray(data) && data.length > 1 ? ' (+' + (data.length - 1) + ' more)' : '';
  }

  function summarize(event, payload) {
    var data = payload && typeof payload === 'object' ? payload.data : undefined;
    var d = first(data) || {};
    if (typeof d !== 'object') d = {};
    var key = d.key || {};
    switch (event) {
      case 'messages.upsert':
      case 'send.message':
      case 'messages.edited': {
        var chat = jid(key.remoteJid);
        var who = key.fromMe ? 'to ' + chat
          : 'from ' + (d.pushName ? d.pushName + (chat ? ' (' + chat + ')' : '') : chat);
        if (key.participant && !key.fromMe) who += ' via ' + jid(key.participant);
        var text = messageText(d.message, d.messageType);
        var line = who + (text ? ': “' + clip(text, 140) + '”' : '');
        if (event === 'send.message' && d.status) line += ' · ' + d.status;
        return line + more(data);
      }
      case 'messages.update': {
        var to = jid(d.remoteJid || key.remoteJid);
        return [d.status || (d.update && d.update.status) || 'update',
          to ? (d.fromMe || key.fromMe ? 'to ' : 'from ') + to : ''].filter(Boolean).join(' · ') + more(data);
      }
      case 'messages.delete':
        return 'deleted · ' + jid(d.remoteJid || key.remoteJid) + more(data);
      case 'connection.update': {
        var parts = ['state: ' + (d.state || '?')];
        if (d.profileName) parts.push(d.profileName + (d.wuid ? ' (' + jid(d.wuid) + ')' : ''));
        if (d.statusReason && d.state !== 'open') parts.push('reason ' + d.statusReason);
        return parts.join(' · ');
      }
      case 'qrcode.updated': {
        var qr = d.qrcode || {};
        return 'new QR code' + (qr.pairingCode ? ' · pairing code ' + qr.pairingCode : '') +
          ' · scan it in WhatsApp';
      }
      case 'presence.update': {
        var presences = d.presences && typeof d.presences === 'object' ? d.presences : {};
        var items = Object.keys(presences).map(function (k) {
          var p = presences[k] || {};
          return jid(k) + ' ' + (p.lastKnownPresence || '?');
        });
        return items.length ? items.join(', ') : jid(d.id);
      }
      case 'call':
        return 'call from ' + jid(d.from) + (d.status ? ' · ' + d.status : '');
      case 'groups.upsert':
      case 'groups.update':
        return (d.subject ? '“' + clip(d.subject, 80) + '” ' : '') + jid(d.id) + more(data);
      case 'logout.instance':
        return 'logged out';
      case 'messaging-history.set':
        // Evolution 2.4: history sync progress.
        return 'history sync ' + (d.progress != null ? d.progress + '%' : '') +
          ' · ' + [['messageCount', 'messages'], ['chatCount', 'chats'], ['contactCount', 'contacts']]
            .filter(function (f) { return typeof d[f[0]] === 'number'; })
            .map(function (f) { return d[f[0]] + ' ' + f[1]; }).join(', ');
      case 'messages.set':
      case 'chats.set':
      case 'contacts.set':
        // History batches; Evolution 2.3.7 puts `progress` next to `event`.
        return (Array.isArray(data) ? data.length + (data.length === 1 ? ' item' : ' items') : 'history batch') +
          (payload && payload.progress != null ? ' · ' + payload.progress + '%' : '');
      default: {
        if (Array.isArray(data)) return data.length + (data.length === 1 ? ' item' : ' items');
        var bits = [];
        ['state', 'status'].forEach(function (f) { if (typeof d[f] === 'string') bits.push(f + ': ' + d[f]); });
        ['remoteJid', 'id', 'from'].forEach(function (f) {
          if (!bits.length && typeof d[f] === 'string') bits.push(jid(d[f]));
        });
        if (!bits.length && payload && payload.sender) bits.push('sender ' + jid(payload.sender));
        if (!bits.length && data && typeof data === 'object') {
          bits.push(Object.keys(data).slice(0, 4).join(', '));
        }
        return bits.join(' · ');
      }
    }
  }

  // Colour class by the event's family (`messages.upsert` → messages).
  var FAMILIES = ['messages', 'send', 'connection', 'qrcode', 'presence', 'chats', 'contacts',
    'groups', 'call', 'labels', 'instance', 'logout', 'application'];
  function family(event) {
    var head = String(event).split('.')[0];
    if (head === 'messaging-history') return 'messages';
    return FAMILIES.indexOf(head) >= 0 ? head : 'other';
  }

  // ---- the list ----

  function pad(n, w) { n = String(n); while (n.length < w) n = '0' + n; return n; }
  function clock(date) {
    return pad(date.getHours(), 2) + ':' + pad(date.getMinutes(), 2) + ':' +
      pad(date.getSeconds(), 2) + '.' + pad(date.getMilliseconds(), 3);
  }

  function receive(event, payload, replayed, offset) {
    var now = new Date();
    var json;
    try { json = JSON.stringify(payload); } catch (e) { json = String(payload); }
    if (json === undefined) json = 'null';
    var summary = '';
    try { summary = summarize(event, payload); } catch (e) { summary = ''; }
    var record = {
      event: event, payload: payload, summary: summary, at: now,
      replayed: replayed, offset: typeof offset === 'string' ? offset : '',
      haystack: (event + ' ' + summary + ' ' + json.slice(0, SEARCH_CHARS)).toLowerCase()
    };
    count(event);
    if (state.paused) {
      state.pending.push(record);
      if (state.pending.length > MAX_PENDING) state.pending.shift();
      updatePaused();
      return;
    }
    state.queue.push(record);
    schedule();
  }

  function schedule() {
    if (!state.frame) state.frame = requestAnimationFrame(flush);
  }

  function flush() {
    state.frame = 0;
    var batch = state.queue;
    state.queue = [];
    if (!batch.length) return;
    if (batch.length > MAX_ROWS) batch = batch.slice(batch.length - MAX_ROWS);
    var fragment = document.createDocumentFragment();
    for (var i = batch.length - 1; i >= 0; i--) {
      var row = { li: renderRow(batch[i]), record: batch[i] };
      fragment.append(row.li);
      state.rows.unshift(row);
    }
    el.events.prepend(fragment);
    while (state.rows.length > MAX_ROWS) state.rows.pop().li.remove();
    updateShown();
  }

  function renderRow(record) {
    var li = document.createElement('li');
    li.className = 'event';
    li.dataset.event = record.event;
    var details = document.createElement('details');
    var summary = document.createElement('summary');
    var time = document.createElement('time');
    time.className = 'time';
    time.dateTime = record.at.toISOString();
    time.textContent = clock(record.at);
    var name = document.createElement('span');
    name.className = 'name k-' + family(record.event);
    name.textContent = record.event;
    var text = document.createElement('span');
    text.className = 'summary';
    text.textContent = record.summary || '—';
    summary.append(time, name);
    if (record.replayed) {
      var tag = document.createElement('span');
      tag.className = 'tag';
      tag.textContent = 'replayed';
      summary.append(tag);
    }
    summary.append(text);
    details.append(summary);
    details.addEventListener('toggle', function () {
      if (details.open && !details.querySelector('pre')) details.append(renderJson(record));
    });
    li.append(details);
    li.hidden = !matches(record);
    return li;
  }

  function renderJson(record) {
    var pre = document.createElement('pre');
    pre.className = 'json';
    pre.tabIndex = 0;
    pre.setAttribute('aria-label', record.event + ' payload');
    var text;
    try { text = JSON.stringify(record.payload, null, 2); } catch (e) { text = String(record.payload); }
    if (text === undefined) text = 'null';
    var cut = text.length > PRETTY_CHARS;
    if (cut) text = text.slice(0, PRETTY_CHARS);
    if (text.length <= HIGHLIGHT_CHARS) highlight(pre, text); else pre.textContent = text;
    if (record.offset) {
      pre.append(document.createTextNode('\n'));
      var meta = document.createElement('span');
      meta.className = 'j-meta';
      meta.textContent = '// offset ' + record.offset;
      pre.append(meta);
    }
    if (cut) {
      var more = document.createElement('span');
      more.className = 'j-meta';
      more.textContent = '\n… cut at ' + PRETTY_CHARS.toLocaleString() + ' characters';
      pre.append(more);
    }
    return pre;
  }

  var TOKEN = /("(?:\\u[0-9a-fA-F]{4}|\\[^u]|[^\\"])*")(\s*:)?|\b(true|false|null)\b|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/g;
  function highlight(pre, text) {
    var last = 0;
    var fragment = document.createDocumentFragment();
    TOKEN.lastIndex = 0;
    var m;
    while ((m = TOKEN.exec(text))) {
      if (m.index > last) fragment.append(document.createTextNode(text.slice(last, m.index)));
      var span = document.createElement('span');
      if (m[1]) {
        span.className = m[2] ? 'j-key' : 'j-str';
        span.textContent = m[1];
        fragment.append(span);
        if (m[2]) fragment.append(document.createTextNode(m[2]));
      } else {
        span.className = m[3] ? 'j-lit' : 'j-num';
        span.textContent = m[0];
        fragment.append(span);
      }
      last = TOKEN.lastIndex;
    }
    if (last < text.length) fragment.append(document.createTextNode(text.slice(last)));
    pre.append(fragment);
  }

  function matches(record) {
    if (state.only && record.event !== state.only) return false;
    if (!state.query) return true;
    var words = state.query.split(/\s+/);
    for (var i = 0; i < words.length; i++) {
      if (words[i] && record.haystack.indexOf(words[i]) < 0) return false;
    }
    return true;
  }

  function applyFilter() {
    state.query = el.search.value.trim().toLowerCase();
    state.only = el.filter.value;
    state.rows.forEach(function (row) { row.li.hidden = !matches(row.record); });
    renderCounts();
    updateShown();
  }

  function updateShown() {
    var total = state.rows.length;
    var shown = 0;
    for (var i = 0; i < total; i++) if (!state.rows[i].li.hidden) shown++;
    var filtered = state.query || state.only;
    el.shown.textContent = total ? (filtered ? shown + ' of ' + total + ' shown' : total + ' shown') : '';
    el.empty.hidden = shown > 0;
    if (!shown) {
      el.empty.textContent = total ? 'No event matches the search or the event filter.'
        : state.socket ? 'Connected: waiting for events from ' + state.instance + '.'
          : 'No events yet. Connect to an instance; its events appear here as Evolution API sends them.';
    }
  }

  function clearEvents(all) {
    state.rows.forEach(function (row) { row.li.remove(); });
    state.rows = [];
    state.queue = [];
    state.pending = [];
    if (all) {
      state.counts.clear();
      state.total = 0;
      state.buckets.fill(0);
      while (el.filter.options.length > 1) el.filter.remove(1);
      el.filter.value = '';
      state.only = '';
    }
    renderCounts();
    updatePaused();
    updateShown();
    drawChart();
  }

  // ---- pause ----

  function setPaused(paused) {
    state.paused = paused;
    el.pause.setAttribute('aria-pressed', String(paused));
    if (!paused && state.pending.length) {
      Array.prototype.push.apply(state.queue, state.pending);
      state.pending = [];
      schedule();
    }
    updatePaused();
  }

  function updatePaused() {
    var n = state.pending.length;
    el.pause.textContent = state.paused ? (n ? 'Resume (' + n + ' new)' : 'Resume') : 'Pause';
    el.pause.classList.toggle('active', state.paused);
    el.pausedNote.hidden = !state.paused;
    el.pausedNote.textContent = 'Paused: the list is frozen' +
      (n ? ', ' + n + (n === 1 ? ' new event waits.' : ' new events wait.') : '.') +
      ' Counts and the chart keep going.';
  }

  // ---- counts and the rate chart ----

  function count(event) {
    state.total += 1;
    tick();
    state.buckets[WINDOW - 1] += 1;
    var known = state.counts.has(event);
    state.counts.set(event, (state.counts.get(event) || 0) + 1);
    if (!known) addFilterOption(event);
    scheduleCounts();
  }

  function addFilterOption(event) {
    var options = Array.prototype.slice.call(el.filter.options, 1);
    var before = null;
    for (var i = 0; i < options.length; i++) if (options[i].value > event) { before = options[i]; break; }
    el.filter.add(new Option(event, event), before);
  }

  var countsTimer = 0;
  function scheduleCounts() {
    if (!countsTimer) countsTimer = setTimeout(function () { countsTimer = 0; renderCounts(); }, 250);
  }

  function renderCounts() {
    el.total.textContent = state.total + (state.total === 1 ? ' event' : ' events');
    var entries = Array.from(state.counts.entries()).sort(function (a, b) {
      return b[1] - a[1] || (a[0] < b[0] ? -1 : 1);
    });
    var items = entries.map(function (entry) {
      var li = document.createElement('li');
      var button = document.createElement('button');
      button.type = 'button';
      button.className = 'count';
      button.dataset.event = entry[0];
      button.setAttribute('aria-pressed', String(state.only === entry[0]));
      var name = document.createElement('span');
      name.className = 'name k-' + family(entry[0]);
      name.textContent = entry[0];
      var n = document.createElement('span');
      n.className = 'n';
      n.textContent = entry[1].toLocaleString();
      button.append(name, n);
      li.append(button);
      return li;
    });
    el.counts.replaceChildren.apply(el.counts, items);
  }

  // Shifts the per-second buckets up to the current second.
  function tick() {
    var second = Math.floor(Date.now() / 1000);
    var gap = second - state.bucketSecond;
    if (gap <= 0) return;
    if (gap >= WINDOW) state.buckets.fill(0);
    else { state.buckets.splice(0, gap); for (var i = 0; i < gap; i++) state.buckets.push(0); }
    state.bucketSecond = second;
  }

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function drawChart() {
    tick();
    var canvas = el.rate;
    var ratio = window.devicePixelRatio || 1;
    var width = canvas.clientWidth || 320;
    var height = canvas.clientHeight || 96;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    var ctx = canvas.getContext('2d');
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    // The current second is still filling: the rate is read from complete seconds.
    var done = state.buckets.slice(0, WINDOW - 1);
    var peak = Math.max.apply(null, state.buckets);
    var now = done[done.length - 1];
    var sum = done.reduce(function (a, b) { return a + b; }, 0);
    var top = niceMax(Math.max(peak, 1));

    var font = '11px ' + (cssVar('--mono') || 'monospace');
    ctx.font = font;
    var left = Math.ceil(ctx.measureText(String(top)).width) + 6;
    var bottom = 14;
    var plotW = width - left - 2;
    var plotH = height - bottom - 6;
    var y0 = 6 + plotH;

    ctx.strokeStyle = cssVar('--grid') || '#ddd';
    ctx.fillStyle = cssVar('--muted') || '#666';
    ctx.lineWidth = 1;
    ctx.textBaseline = 'middle';
    ctx.textAlign = 'right';
    [0, top / 2, top].forEach(function (v) {
      var y = Math.round(y0 - (v / top) * plotH) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(width, y); ctx.stroke();
      if (v === 0 || v === top || Number.isInteger(v)) ctx.fillText(String(v), left - 4, y);
    });
    ctx.textBaseline = 'alphabetic';
    ctx.textAlign = 'left';
    ctx.fillText('-60 s', left, height - 2);
    ctx.textAlign = 'right';
    ctx.fillText('now', width - 1, height - 2);

    var step = plotW / WINDOW;
    var bar = Math.max(1, step - (step > 4 ? 1.5 : 0.5));
    ctx.fillStyle = cssVar('--accent') || '#2563eb';
    for (var i = 0; i < WINDOW; i++) {
      var v = state.buckets[i];
      if (!v) continue;
      var h = Math.max(1.5, (v / top) * plotH);
      ctx.fillRect(left + i * step + (step - bar) / 2, y0 - h, bar, h);
    }

    el.rateNow.textContent = now + '/s now · peak ' + peak + '/s';
    canvas.setAttribute('aria-label', 'Events per second over the last minute: ' + now +
      ' in the last second, peak ' + peak + ', ' + sum + ' in the last minute.');
  }

  function niceMax(v) {
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  // ---- sending a test message ----

  function requestId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, function (b) { return pad(b.toString(16), 2); }).join('');
  }

  function showAck(kind, status, body) {
    el.ack.hidden = false;
    el.ack.dataset.kind = kind;
    el.ackStatus.textContent = status;
    el.ackBody.replaceChildren();
    if (body !== undefined) {
      var text;
      try { text = typeof body === 'string' ? body : JSON.stringify(body, null, 2); } catch (e) { text = String(body); }
      highlight(el.ackBody, text.length > HIGHLIGHT_CHARS ? text.slice(0, HIGHLIGHT_CHARS) : text);
    }
    el.ackBody.hidden = body === undefined;
  }

  function sendTest(event) {
    event.preventDefault();
    var socket = state.socket;
    if (!socket || !socket.connected) {
      showAck('error', 'Not connected: connect to an instance first.');
      return;
    }
    var number = el.number.value.replace(/[\s()+-]/g, '');
    var text = el.text.value;
    if (!number || !text.trim()) return;
    el.send.disabled = true;
    showAck('pending', 'Sending to ' + number + '…');
    var started = performance.now();
    socket.timeout(ACK_TIMEOUT_MS).emit('message/sendText',
      { number: number, text: text, requestId: requestId() },
      function (err, reply) {
        el.send.disabled = !(state.socket && state.socket.connected);
        var ms = Math.round(performance.now() - started);
        if (err) {
          showAck('error', 'No ack within ' + ACK_TIMEOUT_MS / 1000 + ' s.');
          return;
        }
        var status = reply && typeof reply.status === 'number' ? reply.status : 0;
        var ok = status >= 200 && status < 300;
        var label = 'Ack ' + (status || '?') + (ok ? ' · sent' : ' · failed') + ' · ' + ms + ' ms';
        showAck(ok ? 'ok' : 'error', label, reply && ('error' in reply) ? reply.error : reply && reply.body);
      });
  }

  // ---- wiring ----

  el.keyForm.addEventListener('submit', function (event) {
    event.preventDefault();
    var key = el.apikey.value.trim();
    if (!key) return;
    disconnect();
    listInstances(key, stored(STORE_INSTANCE)).then(function () { el.instance.focus(); }, function () {
      el.apikey.focus();
    });
  });
  el.instanceForm.addEventListener('submit', function (event) {
    event.preventDefault();
    var key = el.apikey.value.trim() || stored(STORE_KEY);
    if (key && el.instance.value) connect(key, el.instance.value);
  });
  el.disconnect.addEventListener('click', function () {
    disconnect();
    setStatus('idle', 'Disconnected');
    updateShown();
    el.connect.focus();
  });
  el.forget.addEventListener('click', function () {
    disconnect();
    store(STORE_KEY, '');
    store(STORE_INSTANCE, '');
    el.apikey.value = '';
    el.forget.hidden = true;
    el.instanceForm.hidden = true;
    el.instance.replaceChildren();
    refreshActivity('');
    setStatus('idle', 'Not connected');
    el.apikey.focus();
  });

  var searchTimer = 0;
  el.search.addEventListener('input', function () {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(applyFilter, 120);
  });
  el.filter.addEventListener('change', applyFilter);
  el.counts.addEventListener('click', function (event) {
    var button = event.target.closest('button.count');
    if (!button) return;
    el.filter.value = el.filter.value === button.dataset.event ? '' : button.dataset.event;
    applyFilter();
  });
  el.pause.addEventListener('click', function () { setPaused(!state.paused); });
  el.clear.addEventListener('click', function () { clearEvents(true); });
  el.sendForm.addEventListener('submit', sendTest);

  document.addEventListener('keydown', function (event) {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
    var target = event.target instanceof Element ? event.target : document.body;
    var typing = target.closest('input, textarea, select, [contenteditable=""], [contenteditable="true"]');
    if (event.key === 'Escape' && target === el.search) {
      el.search.value = '';
      applyFilter();
      return;
    }
    if (typing) return;
    if (event.key === '/') {
      event.preventDefault();
      el.search.focus();
      el.search.select();
    } else if (event.key === ' ' && !target.closest('button, summary, a, [role="button"]')) {
      event.preventDefault();
      setPaused(!state.paused);
    }
  });

  setInterval(drawChart, 1000);
  window.addEventListener('resize', drawChart);
  if (window.matchMedia) {
    var scheme = window.matchMedia('(prefers-color-scheme: dark)');
    if (scheme.addEventListener) scheme.addEventListener('change', drawChart);
  }

  // ---- start ----

  if (typeof io === 'undefined') {
    showError('socket.io-client did not load (inspector/socket.io.min.js).');
    return;
  }
  updatePaused();
  updateShown();
  renderCounts();
  drawChart();
  var savedKey = stored(STORE_KEY);
  if (savedKey) {
    el.apikey.value = savedKey;
    el.forget.hidden = false;
    var savedInstance = stored(STORE_INSTANCE);
    listInstances(savedKey, savedInstance).then(function (names) {
      if (savedInstance && names.indexOf(savedInstance) >= 0) connect(savedKey, savedInstance);
    }, function () { /* shown on the page */ });
  } else {
    el.apikey.focus();
  }
})();
